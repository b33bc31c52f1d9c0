"""One base model held once, LoRA adapters attached and detached by id, requests run as one batch.

`ModelHost` is the model side of the service, used by the Ray Serve model deployment
(`serve/app.py`) and by the in-process backend of the tests and the UI's local mode. It only talks
to the family interface (`get_family(name).load / .attach_adapter / .detach_adapter /
.generate_batch` with `GenerationRequest`s), so every family works the same way.

Threading: every touch of the model (attaching, detaching, switching and running adapters)
happens on the host's single `executor` thread; downloads from the registry run in the caller's
thread. Adapters are peft named adapters on one `PeftModel` over the family's LoRA root, so the base
weights are in memory once. `run` hands a whole batch to `family.generate_batch`, one batched
generation in which every row uses its own adapter (or none), seed and guidance scale, so a
request gives the same audio alone and inside any batch. With `lora_slots`, adapters are copied
into LoRA slots made at start-up (`musiclora.models.lora_slots`), so a load costs the same however
many adapters came before; those that do not fit a slot go through peft's `load_adapter`. The
model sits on the configured device (`device`, default cuda if available); only finished audio
comes back.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from musiclora.adapter_registry import AdapterNotFoundError, Registry, parse_ref
from musiclora.audio import num_channels, save_audio
from musiclora.models.base import GenerationRequest

MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac"}


class AdapterLoadError(RuntimeError):
    """A registry adapter exists but cannot be loaded onto this base (shape or module mismatch)."""


@dataclass
class GenParams(GenerationRequest):
    """One generation request as the model side sees it: the `GenerationRequest` plus the response
    format (plain data: it crosses Ray's wire).

    Attributes:
        audio_format: `wav` or `flac` (16-bit PCM either way).

    Raises:
        ValueError: as `GenerationRequest`.
    """

    audio_format: str = "wav"


@dataclass
class GenResult:
    """Encoded audio and what was done.

    Attributes:
        audio: the encoded file (WAV or FLAC bytes, 16-bit PCM) with the family's channels.
        media_type: `audio/wav` or `audio/flac`.
        sample_rate: Hz.
        num_samples: samples per channel in the clip (the waveform's last axis).
        adapter: `name@version` used, or None for the base.
        steps: the steps passed to the family, or None when the family takes none.
        compute_s: seconds the batched generation this clip was part of took.
        batch_size: requests generated together in that batch (any adapters).
    """

    audio: bytes
    media_type: str
    sample_rate: int
    num_samples: int
    adapter: str | None
    steps: int | None
    compute_s: float
    batch_size: int
    channels: int = 1
    """Audio channels in the file: 1 (mono) or 2 (stereo, Stable Audio Open)."""


def encode_audio(audio: np.ndarray, sample_rate: int, audio_format: str = "wav") -> tuple[bytes, str]:
    """Encode a float waveform (clipped to [-1, 1]) as 16-bit PCM WAV or FLAC, keeping its channels.

    Args:
        audio: what `ModelFamily.generate` returns: mono [L] or channels-first [C, L] (C = 1 or 2).
        sample_rate: Hz.
        audio_format: `wav` or `flac`.

    Returns:
        (file bytes, media type).

    Raises:
        ValueError: unknown `audio_format`, or `audio` not [L] / [C <= 2, L] (see `save_audio`).
    """
    if audio_format not in MEDIA_TYPES:
        raise ValueError(f"audio format {audio_format!r} is not supported; expected one of {sorted(MEDIA_TYPES)}")
    buf = io.BytesIO()
    save_audio(buf, audio, sample_rate, audio_format)
    return buf.getvalue(), MEDIA_TYPES[audio_format]


@dataclass
class _Attached:
    internal: str  # peft adapter name (peft names may not contain '.', registry names may)
    cached: bool = True  # held by the replica's LRU cache
    refs: int = 0  # requests queued or running with it


class ModelHost:
    """A base model of one family plus the registry adapters attached to it.

    Args:
        family: model family name (`get_family`).
        base: base model id, folder or `tiny`.
        registry_url: adapter registry root (default: `default_registry_url()`).
        revision: hub revision of the base.
        torch_threads: intra-op threads for torch (None: torch's default).
        device: cpu, cuda or cuda:N (None: cuda if available, else cpu).
        dtype: parameter dtype, float32, float16 or bfloat16.
        lora_slots: LoRA slots created at start-up (`musiclora.models.lora_slots`): an adapter that
            fits is copied into a free slot, so load time stays flat however many adapters came
            and went; 0: every adapter goes through peft's `load_adapter`. Adapters that do not fit
            (rank, targets, LoRA variant, no free slot) fall back to peft's path.
        slot_rank: rank of the slots (adapters of lower rank are zero-padded).
        slot_targets: the slots' target modules: a family preset name or a module list.

    Raises:
        ValueError: unknown family, base, device, dtype or slot preset.
    """

    def __init__(self, family: str, base: str, registry_url: str | None = None, revision: str | None = None,
                 torch_threads: int | None = None, device: str | None = None, dtype: str = "float32",
                 lora_slots: int = 0, slot_rank: int = 8, slot_targets: str | list[str] = "attn"):
        import torch

        from musiclora.adapters import load_for_inference
        from musiclora.generate import parse_dtype, resolve_device

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = resolve_device(device)
        self.family, self.loaded = load_for_inference(None, base, family, parse_dtype(dtype), self.device, revision)
        self.base = base
        self.registry = Registry(registry_url)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{self.family.name}")
        self._model = self.loaded.model  # what generates: the base, or the base with adapters attached
        self.slots = None
        if lora_slots:
            from musiclora.models.lora_slots import LoraSlots

            targets = self.family.target_modules(slot_targets) if isinstance(slot_targets, str) else list(slot_targets)
            self.slots = LoraSlots(self.family.lora_root(self._model), lora_slots, slot_rank, targets)
            self._model = self.family.with_lora_root(self._model, self.slots.root)
        self._attached: dict[str, _Attached] = {}
        self._lock = threading.Lock()
        self._counter = 0

    # ------------------------------------------------------------------ adapters

    def fetch(self, adapter_id: str) -> str:
        """Download `name@version` of this host's family into a fresh temp folder; returns the folder.

        Raises:
            InvalidReferenceError: `adapter_id` is not `name@version`.
            AdapterNotFoundError: not in the registry under this family.
        """
        ref = parse_ref(adapter_id)
        if ref.version is None:
            raise AdapterNotFoundError(f"adapter id {adapter_id!r} names no version; expected name@version")
        version = self.registry.resolve(ref, family=self.family.name)
        return self.registry.download(version, tempfile.mkdtemp(prefix="musiclora-serve-"))

    def attach(self, adapter_id: str, local_dir: str) -> None:
        """Attach a downloaded adapter (model thread only; use `load` from elsewhere). Deletes `local_dir`.

        Raises:
            AdapterLoadError: peft cannot put it on this base.
        """
        try:
            with self._lock:
                state = self._attached.get(adapter_id)
                if state is not None:
                    state.cached = True
                    return
                self._counter += 1
                internal = f"adapter{self._counter}"
            internal = self._attach_on_model_thread(internal, local_dir, adapter_id)
            with self._lock:
                self._attached[adapter_id] = _Attached(internal)
        finally:
            shutil.rmtree(local_dir, ignore_errors=True)

    def _attach_on_model_thread(self, internal: str, local_dir: str, adapter_id: str) -> str:
        """Attach into a LoRA slot when one fits, else with peft; returns the peft adapter name."""
        from musiclora.models.lora_slots import SlotMismatch

        try:
            if self.slots is not None:
                try:
                    return self.slots.load(local_dir)
                except SlotMismatch:
                    pass  # peft's own path below
            self._model = self.family.attach_adapter(self._model, local_dir, internal)
            return internal
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise AdapterLoadError(
                f"adapter {adapter_id} cannot be loaded onto {self.family.name} base {self.base!r}: {exc}"
            ) from exc

    def load_blocking(self, adapter_id: str) -> None:
        """Fetch and attach from any thread except the executor's (blocks until attached)."""
        local = self.fetch(adapter_id)
        self.executor.submit(self.attach, adapter_id, local).result()

    def uncache(self, adapter_id: str) -> None:
        """The cache let go of `adapter_id`: detach it once no queued request holds it (thread-safe)."""
        with self._lock:
            state = self._attached.get(adapter_id)
            if state is None:
                return
            state.cached = False
            idle = state.refs == 0
        if idle:
            self.executor.submit(self._detach_if_unused, adapter_id)

    def hold(self, adapter_id: str) -> None:
        """Mark one queued request for `adapter_id` (keeps it attached until `run` is done with it).

        Raises:
            AdapterNotFoundError: not attached (load it first).
        """
        with self._lock:
            state = self._attached.get(adapter_id)
            if state is None:
                raise AdapterNotFoundError(f"adapter {adapter_id} is not loaded on this replica")
            state.refs += 1

    def attached(self) -> list[str]:
        """Adapter ids attached now."""
        with self._lock:
            return list(self._attached)

    def _detach_if_unused(self, adapter_id: str) -> None:
        with self._lock:
            state = self._attached.get(adapter_id)
            if state is None or state.cached or state.refs:
                return
            del self._attached[adapter_id]
        if self.slots is not None and state.internal in self.slots:
            self.slots.release(state.internal)
            return
        # the last one takes LoRA off the model again (peft cannot run with no adapter left)
        self._model = self.family.detach_adapter(self._model, state.internal)

    # ------------------------------------------------------------------ generation

    def run(self, items: list[tuple[str | None, GenParams]]) -> list[GenResult | Exception]:
        """Run requests for any adapters (None: the base) as one batched generation.

        Call on `executor` only. Every adapter id must have been `hold`-ed once per item; the holds
        are released here. A failing request gives its exception in its slot; the others still run.

        Returns:
            one result (or exception) per item, in the order of `items`.
        """
        from musiclora.models.batching import BASE_ROW

        out: list[GenResult | Exception | None] = [None] * len(items)
        names: list[str] = []
        with self._lock:
            for i, (adapter_id, _) in enumerate(items):
                state = self._attached.get(adapter_id) if adapter_id is not None else None
                if adapter_id is not None and state is None:
                    out[i] = AdapterNotFoundError(f"adapter {adapter_id} is not loaded on this replica")
                names.append(BASE_ROW if state is None else state.internal)
        live = [i for i in range(len(items)) if out[i] is None]
        try:
            if live:
                self._run_batch(items, names, live, out)
        finally:
            held: dict[str, int] = {}
            for adapter_id, _ in items:
                if adapter_id is not None:
                    held[adapter_id] = held.get(adapter_id, 0) + 1
            for adapter_id, n in held.items():
                self._release(adapter_id, n)
        return out  # type: ignore[return-value]

    def _run_batch(self, items, names: list[str], live: list[int], out: list) -> None:
        start = time.perf_counter()
        try:
            results = self.family.generate_batch(
                self._model, self.loaded.tokenizer, [items[i][1] for i in live], [names[i] for i in live]
            )
        except Exception as exc:  # noqa: BLE001 - the error goes back to the batch's callers
            results = [exc] * len(live)
        compute_s = time.perf_counter() - start
        for i, result in zip(live, results):
            if isinstance(result, Exception):
                out[i] = result
                continue
            p = items[i][1]
            audio, sr = result  # [L] or [C, L]
            try:
                data, media_type = encode_audio(audio, sr, p.audio_format)
            except ValueError as exc:  # the family gave a layout it should not: a server fault (500), not the request's
                out[i] = RuntimeError(f"{self.family.name} returned audio that cannot be encoded: {exc}")
                continue
            out[i] = GenResult(data, media_type, int(sr), int(np.shape(audio)[-1]), items[i][0],
                               p.steps if self.family.takes_steps else None, compute_s, len(live),
                               channels=num_channels(audio))

    def _release(self, adapter_id: str, n: int) -> None:
        with self._lock:
            state = self._attached.get(adapter_id)
            if state is not None:
                state.refs -= n
        self._detach_if_unused(adapter_id)
