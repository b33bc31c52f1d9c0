"""A fixed pool of LoRA adapter slots, so loading the 100th adapter costs what the first did.

peft's `load_adapter` injects a new named adapter: it walks every module of the model several
times (`inject_adapter`, `set_adapter`, `_mark_only_adapters_as_trainable`, `eval`,
`set_peft_model_state_dict`), and every adapter adds modules to every LoRA layer (one entry in each
`lora_A` / `lora_B` ModuleDict). So the walks, and the load, grow with the adapters attached: on
the tiny MusicGen-Melody the 100th `load_adapter` takes 10x the first (peft issue: 27 -> 70 ms).

`LoraSlots` creates `capacity` peft adapters ("slots") once, at start-up, with a fixed rank and
target modules; loading an adapter copies its safetensors into a free slot's `lora_A` / `lora_B`
weights in place (zero-padded when its rank is lower) and sets the slot's scaling
(lora_alpha / r, or / sqrt(r) with rsLoRA), from a module index built once: no module walk, no
new module, so the load time stays flat however many adapters came and went. A slot runs like any
peft adapter (per-row `adapter_names` included); freeing one zeroes its B, a no-op adapter.

torch.compile: a swap changes parameter values only, never modules, parameter identities or
shapes, so it gives a compiled graph no reason to recompile. Serving does not compile today
(CPU replicas; and peft's mixed-batch forward chooses rows per adapter name in Python, which
would specialise a compiled graph on each batch's adapter mix), so this is not measured here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

SLOT_PREFIX = "slot"
_A, _B = ".lora_A.weight", ".lora_B.weight"


class SlotMismatch(ValueError):
    """The adapter does not fit the slots (rank, targets or a LoRA variant); attach it with peft instead."""


class LoraSlots:
    """`capacity` pre-created LoRA adapters on a peft root, loaded in place.

    Args:
        root: the family's LoRA root (a plain module: this wraps it in a `PeftModel`).
        capacity: number of slots, >= 1.
        r: rank of every slot; adapters of rank <= r fit.
        target_modules: peft `target_modules` of the slots; an adapter must target a subset.

    Attributes:
        root: the `PeftModel` to put in place of the family's root (`ModelFamily.with_lora_root`).

    Raises:
        TypeError: a root that is a PeftModel already.
        ValueError: capacity or r below 1, or targets that
            match no module (peft's message).
    """

    def __init__(self, root: nn.Module, capacity: int, r: int, target_modules: list[str]):
        from peft import LoraConfig, PeftModel
        from peft.tuners.lora import LoraLayer

        if capacity < 1 or r < 1:
            raise ValueError(f"LoRA slots need capacity >= 1 and r >= 1, got {capacity} and {r}")
        if isinstance(root, PeftModel):
            raise TypeError("LoRA slots go on a root without adapters, not on a PeftModel")
        config = LoraConfig(r=r, lora_alpha=r, target_modules=list(target_modules), inference_mode=True)
        self.r = r
        self.names = [f"{SLOT_PREFIX}{i}" for i in range(capacity)]
        self.root = PeftModel(root, config, self.names[0])
        for name in self.names[1:]:
            self.root.add_adapter(name, config)
        self.root.eval()
        self.layers = {name: m for name, m in self.root.named_modules() if isinstance(m, LoraLayer)}
        self._free = list(reversed(self.names))
        with torch.no_grad():
            for name in self.names:
                self._clear(name)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def free_count(self) -> int:
        """Slots without an adapter."""
        return len(self._free)

    @torch.no_grad()
    def load(self, adapter_dir: str) -> str:
        """Copy a peft LoRA adapter folder into a free slot; returns the slot's adapter name.

        Raises:
            SlotMismatch: no free slot, or the adapter does not fit: rank above `r`, a module the
                slots do not target, a tensor of another shape, or a LoRA variant the slots do not
                run (DoRA, rank/alpha patterns, biases, modules_to_save, fan_in_fan_out).
            ValueError: no LoRA tensors in the folder.
            FileNotFoundError: no adapter_config.json / adapter_model.safetensors.
        """
        from safetensors.torch import load_file

        folder = Path(adapter_dir)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        rank, scaling = self._check_config(cfg)
        tensors = load_file(str(folder / "adapter_model.safetensors"), device="cpu")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            suffix = _A if key.endswith(_A) else _B if key.endswith(_B) else None
            module = key[: -len(suffix)] if suffix else None
            if module not in self.layers:
                raise SlotMismatch(f"tensor {key} is not a LoRA weight of a slot-targeted module")
            pairs.setdefault(module, {})[suffix] = value
        if not pairs:
            raise ValueError(f"adapter {adapter_dir}: no LoRA tensors in adapter_model.safetensors")
        if not self._free:
            raise SlotMismatch(f"all {len(self.names)} LoRA slots hold adapters")
        slot = self._free[-1]
        for module, ab in pairs.items():
            layer = self.layers[module]
            a, b = ab.get(_A), ab.get(_B)
            wa, wb = layer.lora_A[slot].weight, layer.lora_B[slot].weight
            if a is None or b is None or a.shape != (rank, wa.shape[1]) or b.shape != (wb.shape[0], rank):
                raise SlotMismatch(f"LoRA weights of {module} do not have rank {rank} and the layer's shape")
        self._free.pop()
        self._clear(slot)
        for module, ab in pairs.items():
            layer = self.layers[module]
            layer.lora_A[slot].weight[:rank].copy_(ab[_A])
            layer.lora_B[slot].weight[:, :rank].copy_(ab[_B])
            layer.scaling[slot] = scaling
        return slot

    @torch.no_grad()
    def release(self, slot: str) -> None:
        """Empty a slot (its B becomes zero: a no-op adapter) and make it free.

        Raises:
            ValueError: not a slot name, or already free.
        """
        if slot not in self.names or slot in self._free:
            raise ValueError(f"{slot!r} is not a loaded LoRA slot")
        self._clear(slot)
        self._free.append(slot)

    def _clear(self, slot: str) -> None:
        for layer in self.layers.values():
            layer.lora_A[slot].weight.zero_()
            layer.lora_B[slot].weight.zero_()
            layer.scaling[slot] = 1.0

    def _check_config(self, cfg: dict) -> tuple[int, float]:
        if cfg.get("peft_type", "LORA") != "LORA":
            raise SlotMismatch(f"peft_type {cfg.get('peft_type')!r} is not LORA")
        variants = {k: cfg.get(k) for k in ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias",
                                            "modules_to_save", "fan_in_fan_out", "layer_replication")}
        used = sorted(k for k, v in variants.items() if v)
        if used or cfg.get("bias", "none") != "none":
            raise SlotMismatch(f"LoRA options the slots do not run: {used or ['bias']}")
        rank = int(cfg["r"])
        if rank > self.r:
            raise SlotMismatch(f"adapter rank {rank} is above the slots' rank {self.r}")
        alpha = float(cfg.get("lora_alpha", rank))
        return rank, alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
