"""LoRA adapters: apply (peft), check, count, save as a standard peft folder + card, load, merge.

An adapter folder is exactly what `peft` writes (`adapter_config.json`,
`adapter_model.safetensors`) plus musiclora's `card.json`, so it loads with plain
`PeftModel.from_pretrained(base, folder)` and no musiclora import.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from musiclora.config import AdapterConfig
from musiclora.models.base import Loaded, ModelFamily
from musiclora.storage import get_fs, join_url

CARD = "card.json"


def matching_modules(model: nn.Module, target_modules: list[str]) -> list[str]:
    """Names of `nn.Linear` modules whose name ends with one of `target_modules` (peft's suffix rule)."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if any(name == t or name.endswith("." + t) for t in target_modules):
            out.append(name)
    return out


def check_targets(model: nn.Module, family: ModelFamily, cfg: AdapterConfig) -> list[str]:
    """Resolve the adapter's target modules and make sure every pattern matches something.

    A pattern that matches nothing gives a silent no-op adapter, a known trap: refuse it.

    Returns:
        the resolved `target_modules` list.

    Raises:
        ValueError: unknown preset, or a pattern that matches no linear layer (names the pattern).
    """
    targets = family.target_modules(cfg.preset, cfg.target_modules)
    for pattern in targets:
        if not matching_modules(model, [pattern]):
            raise ValueError(
                f"adapter target module {pattern!r} matches no linear layer of the {family.name} model; "
                f"check adapter.target_modules / adapter.preset ({cfg.preset!r})"
            )
    return targets


def apply_lora(model: nn.Module, family: ModelFamily, cfg: AdapterConfig) -> nn.Module:
    """Put LoRA (peft) on the family preset's modules inside the family's LoRA root.

    Only `lora_` parameters stay trainable. A fresh adapter leaves outputs unchanged (peft
    initialises B to zero). `family.lora_root(result)` is the `PeftModel` to save from.

    Returns:
        the model to train: the PeftModel itself when the root is the whole model, else `model`
        with its root attribute replaced by the PeftModel.

    Raises:
        ValueError: as `check_targets`.
    """
    from peft import LoraConfig, get_peft_model

    root = family.lora_root(model)
    targets = check_targets(root, family, cfg)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
    peft_root = get_peft_model(root, lora)
    if family.lora_root_attr is None:
        return peft_root
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in peft_root.named_parameters():
        p.requires_grad_("lora_" in name)
    return family.with_lora_root(model, peft_root)


def trainable_report(model: nn.Module) -> dict[str, Any]:
    """Trainable vs total parameter counts and the trainable share in percent."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "trainable_pct": round(100.0 * trainable / max(total, 1), 4)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The `lora_` tensors of a peft model, as peft names them in `adapter_model.safetensors`."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(peft_model, url: str, card: dict[str, Any] | None = None, state_dict: dict | None = None) -> str:
    """Write a standard peft adapter folder (+ card.json) to a local path or fsspec URL.

    Args:
        peft_model: the `PeftModel` (or its DeepSpeed-unwrapped module).
        url: destination folder (s3://..., file://..., or a path).
        card: JSON-serialisable facts about the adapter (base, family, preset, data, metrics).
        state_dict: full (gathered) adapter tensors; required under ZeRO-3, where the local
            parameters are empty partitions.

    Returns:
        `url`.

    Raises:
        ValueError: an adapter tensor is empty (a ZeRO-3 partition saved without gathering).
    """
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        from safetensors.torch import load_file

        for name, tensor in load_file(str(Path(tmp) / "adapter_model.safetensors")).items():
            if tensor.numel() == 0:
                raise ValueError(f"adapter tensor {name} is empty: gather ZeRO-3 parameters before saving")
        if card is not None:
            (Path(tmp) / CARD).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        upload_dir(tmp, url)
    return url


def upload_dir(local_dir: str, url: str) -> None:
    """Copy the files of a flat local folder to a folder URL."""
    fs, base = get_fs(url)
    fs.makedirs(base, exist_ok=True)
    for f in sorted(Path(local_dir).iterdir()):
        if f.is_file():
            fs.put_file(str(f), get_fs(join_url(url, f.name))[1])


def download_dir(url: str, local_dir: str) -> str:
    """Copy the files directly under a folder URL into `local_dir`; return `local_dir`.

    Raises:
        FileNotFoundError: nothing at `url`.
    """
    fs, base = get_fs(url)
    if not fs.exists(base):
        raise FileNotFoundError(f"no adapter folder at {url}")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    for entry in fs.ls(base, detail=True):
        if entry["type"] == "file":
            fs.get_file(entry["name"], str(Path(local_dir) / Path(entry["name"]).name))
    return local_dir


def fetch_adapter(url: str) -> str:
    """A local folder holding the adapter at `url`: the folder itself when local, else a fresh download.

    Raises:
        FileNotFoundError: nothing at `url`, or no `adapter_config.json` there.
    """
    local = url.removeprefix("file://")
    if not Path(local).is_dir():
        local = download_dir(url, tempfile.mkdtemp(prefix="musiclora-adapter-"))
    if not (Path(local) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{url} is not a peft adapter folder: adapter_config.json missing")
    return local


def load_adapter(model: nn.Module, url: str, family: ModelFamily, adapter_name: str = "default") -> nn.Module:
    """Download an adapter folder (local path or fsspec URL) and attach it with `family.attach_adapter`.

    Returns:
        the model to generate with (see `ModelFamily.attach_adapter`).

    Raises:
        FileNotFoundError: no adapter folder at `url`.
        ValueError: the folder does not fit the family's LoRA root (as `attach_adapter`).
    """
    return family.attach_adapter(model, fetch_adapter(url), adapter_name)


def load_for_inference(
    adapter: str | None = None,
    base: str | None = None,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    merge: bool = False,
) -> tuple[ModelFamily, Loaded]:
    """Load a base model on `device`, with the adapter attached when one is given.

    Args:
        adapter: adapter folder (path or URL) or None for the base alone; its card.json supplies
            `family` and `base` when they are not given.
        base / family: the base model and its family (default family: musicgen-melody).
        dtype: parameter dtype; device: where the model runs (`torch.device` spelling).
        merge: fold the adapter into the base weights (peft `merge_adapter`), so generation runs
            no separate LoRA branch: on an H200, MusicGen-Melody (1.5 B) decoded 10 s with an unmerged
            adapter at a real-time factor of 4.5 and merged at 1.15, the base's 1.08
            (bench/results/gpu_check_h200_2026-11-30_run2.json). Only for one adapter; the
            outputs equal the unmerged ones up to float rounding.

    Returns:
        (the family, `Loaded` whose `model` is the one to generate with, adapter attached).

    Raises:
        ValueError: no base given and no card naming one; unknown family; an adapter that does not
            fit the family's LoRA root.
        FileNotFoundError: no adapter folder at `adapter`.
    """
    from musiclora.models.families import get_family

    card = read_card(adapter) if adapter else {}
    name = family or card.get("family") or "musicgen-melody"
    base = base or card.get("base_model")
    if not base:
        where = f" at {adapter}" if adapter else ""
        raise ValueError(f"no base model given and the adapter card{where} names none (pass the base model)")
    fam = get_family(name)
    loaded = fam.load(base, dtype=dtype, revision=revision)
    model = loaded.model.to(device)
    if adapter:
        model = load_adapter(model, adapter, fam)
        if merge:
            fam.lora_root(model).merge_adapter()
    return fam, Loaded(model=model, tokenizer=loaded.tokenizer, base=base, family=name)


def read_card(url: str) -> dict[str, Any]:
    """The adapter's card.json as a dict ({} when the folder has none)."""
    fs, path = get_fs(join_url(url, CARD))
    if not fs.exists(path):
        return {}
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def merge(peft_model) -> nn.Module:
    """Fold the LoRA weights into the base weights (`merge_and_unload`); returns the plain model."""
    return peft_model.merge_and_unload()
