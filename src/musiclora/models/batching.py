"""Per-row LoRA adapters for batched generation (peft's mixed adapter batches).

peft's LoRA layers take `adapter_names=[...]`, one name per batch row, and then add each row's own
adapter (`"__base__"`: none) to the base layer's output (peft `LoraLayer._mixed_batch_forward`,
docs "Inference with different LoRA adapters in the same batch"). `PeftModel.forward` passes it
on through forward pre-hooks on every LoRA layer; a family's sampling loop calls sub-modules (the
MusicGen decoder, the AudioLDM UNet) directly, so `row_adapters` installs the same hooks around
any code that runs the LoRA root.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

BASE_ROW = "__base__"
"""The adapter name of a row that runs the base model alone (peft's spelling)."""


@contextlib.contextmanager
def row_adapters(root: nn.Module, names: Sequence[str] | None) -> Iterator[None]:
    """Inside the block, every LoRA layer of `root` applies `names[i]` to batch row i.

    Every module the block calls with LoRA inside must then get a batch of exactly `len(names)`
    rows (the hooks check it). The model must be in eval mode and no adapter may be merged.

    Args:
        root: the family's LoRA root (`ModelFamily.lora_root`): a peft `PeftModel`, or a plain
            module when no adapter is attached.
        names: one peft adapter name per row, or `BASE_ROW`; None leaves the model as it is
            (its active adapter on every row).

    Raises:
        ValueError: a name that is not attached (peft names it), names given to a model in
            training mode, or an adapter name for a root that has no adapter at all.
    """
    if names is None:
        yield
        return
    from peft import PeftModel

    if not isinstance(root, PeftModel):
        wanted = sorted({n for n in names if n != BASE_ROW})
        if wanted:
            raise ValueError(f"adapters {wanted} requested for rows of a model that has no adapter attached")
        yield
        return
    with root.base_model._enable_peft_forward_hooks(adapter_names=list(names)):
        yield
