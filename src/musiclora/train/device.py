"""The one device rule: tensors go where the code runs.

Inside a Ray Train worker the device is the GPU Ray assigned to it (`ray.train.torch.get_device()`);
anywhere else it is `cuda` when a GPU is visible, else the CPU. DeepSpeed's accelerator follows
the same rule through `DS_ACCELERATOR` (`cuda` for GPU runs, `cpu` otherwise).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def local_device() -> torch.device:
    """The device this process computes on.

    Returns:
        The Ray Train worker's device when called inside a Train worker (its assigned GPU, or the
        CPU for `use_gpu: false`), else `cuda:<current>` when CUDA is available, else `cpu`.
    """
    device = _ray_train_device()
    if device is not None:
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ray_train_device() -> torch.device | None:
    """The device Ray Train gave this worker, or None outside a Train worker (or without Ray)."""
    try:
        import ray.train
        import ray.train.torch

        ray.train.get_context().get_world_size()  # raises outside a Train worker session
        return ray.train.torch.get_device()
    except Exception:  # noqa: BLE001 - no Ray, or not inside a Train worker
        return None


def ds_accelerator(use_gpu: bool) -> str:
    """The `DS_ACCELERATOR` value for a run: `cuda` when it uses GPUs, else `cpu`."""
    return "cuda" if use_gpu else "cpu"


def set_ds_accelerator(use_gpu: bool) -> None:
    """Point DeepSpeed at this run's accelerator before `import deepspeed` picks one.

    Raises:
        RuntimeError: DeepSpeed already chose another accelerator in this process (it is chosen
            once, on first use), e.g. a worker started with `DS_ACCELERATOR=cpu` for a GPU run.
    """
    want = ds_accelerator(use_gpu)
    os.environ["DS_ACCELERATOR"] = want
    import sys

    if "deepspeed.accelerator.real_accelerator" in sys.modules:
        from deepspeed.accelerator import real_accelerator

        chosen = real_accelerator.ds_accelerator
        if chosen is not None and chosen._name != want:
            raise RuntimeError(
                f"DeepSpeed already uses accelerator {chosen._name!r} in this process but run.use_gpu asks for "
                f"{want!r}; start the workers with DS_ACCELERATOR={want}"
            )


def deepspeed_args(device: torch.device):
    """The `args` for `deepspeed.initialize` that pin the engine to `device`.

    DeepSpeed otherwise takes `cuda:<LOCAL_RANK>`, which need not be the GPU Ray Train assigned
    to this worker when several workers share a node; `device_rank` is DeepSpeed's own override
    (`DeepSpeedEngine._set_distributed_vars`). None on the CPU (nothing to pin).
    """
    from types import SimpleNamespace

    if device.type != "cuda":
        return None
    return SimpleNamespace(device_rank=device.index if device.index is not None else torch.cuda.current_device())


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a collated batch to `device` (non-blocking from pinned memory).

    Args:
        batch: a family's `collate` output, str -> tensor (other values are passed through).
        device: the target device, e.g. `engine.device`.

    Returns:
        A new dict with the same keys; tensors on `device`, dtypes unchanged.
    """
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
