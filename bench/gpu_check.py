"""GPU check on ONE CUDA machine, without Ray or S3: the project's own train step, validation and
generation at real model shapes. Prints one JSON object (and writes it to $OUT/gpu_check.json
when OUT is set).

    python3 bench/gpu_check.py                      # CUDA, real shapes, bf16 (see bench/README.md)
    python3 bench/gpu_check.py --smoke --device cpu # tiny models, 2 steps, gloo: the CPU self-test

Sections (each in its own process, so one failure or OOM is reported and the rest still run):
  musicgen_lora  MusicGen-Melody at the real 1.5 B shape (random weights from the shipped
                 facebook/musicgen-melody config), bf16, LoRA preset of ray_jobs/configs/musicgen_melody.yaml
  musicgen_full  the same step with full fine-tuning of the decoder (audiocraft's fine-tuning target)
  audioldm_lora  the AudioLDM-S UNet at its real shape, LoRA preset of ray_jobs/configs/audioldm.yaml

Each runs: build -> LoRA (or unfreeze) -> DeepSpeed ZeRO-2 on a single-rank process group that
this script starts itself (NCCL on CUDA, gloo on CPU) -> train/loop.py's `train_step` (batch to
the engine's device, `family.loss`, backward, step) -> `validation_loss` (train/validate.py) -> the family's
`generate` with and without the adapter.

Figures: step time; decoder tokens/s (MusicGen: one token = one frame position of the decoder,
its K codebooks summed into one embedding) and audio-seconds/s; MFU by the formula of
bench/train_step.py (FLOPs per token 4 N + 6 N_lora for LoRA, 6 N for full fine-tuning; N the
parameters the tokens pass through; Kaplan et al. 2020, PaLM appendix B) and MFU from FLOPs
counted by torch's FlopCounterMode over one real step (includes attention and convolutions);
peak GPU memory; generation real-time factor (wall seconds / audio seconds) with and without
the adapter. Targets on one H100/H200: MFU >= 40 % for musicgen_lora, LoRA >= 2x faster per
step than full fine-tuning.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import numpy as np
import torch

SECTIONS = ("musicgen_lora", "musicgen_full", "audioldm_lora")
SPEC = {  # section -> family, train config it takes the adapter from, mode, trained prefix for full FT
    "musicgen_lora": {"config": "musicgen_melody", "mode": "lora"},
    "musicgen_full": {"config": "musicgen_melody", "mode": "full", "full_prefix": "decoder."},
    "audioldm_lora": {"config": "audioldm", "mode": "lora"},
    # variants of the LoRA step that show where its time goes (no generation; run them by name)
    "musicgen_lora_b16": {"config": "musicgen_melody", "mode": "lora", "batch_scale": 2, "generate": False},
    "musicgen_lora_nodrop": {"config": "musicgen_melody", "mode": "lora", "lora_dropout": 0.0, "generate": False},
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
"""Dense bf16 tensor-core peak per device, TFLOP/s (NVIDIA data sheets, without sparsity)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank(device: torch.device) -> None:
    """Start a world-size-1 torch.distributed group (NCCL on CUDA, gloo on CPU), as Ray Train would."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


# --------------------------------------------------------------------------- models and batches


def build_loaded(family, smoke: bool, device: torch.device, dtype: torch.dtype):
    """The family's model: the tiny preset (smoke) or the real shape from the shipped config,
    built directly on `device` with random weights; returns a `Loaded`."""
    from musiclora.models.base import Loaded

    if smoke:
        loaded = family.load(family.tiny_id)
        loaded.model.to(device)
        return Loaded(loaded.model.to(dtype), loaded.tokenizer, "tiny", family.name)
    builder = {"musicgen-melody": _real_musicgen, "audioldm": _real_audioldm}[family.name]
    with torch.device(device):
        model, tokenizer = builder(family)
    return Loaded(model.to(dtype).eval(), tokenizer, family.default_base, family.name)


def _real_musicgen(family):
    from transformers import MusicgenMelodyConfig, MusicgenMelodyForConditionalGeneration

    from musiclora.models.configs import config_dir
    from musiclora.models.tiny_tokenizer import build_t5_tokenizer

    config = MusicgenMelodyConfig.from_pretrained(config_dir(family.default_base))
    model = MusicgenMelodyForConditionalGeneration(config)  # transformers picks SDPA where a part supports it
    for key in ("pad_token_id", "decoder_start_token_id", "bos_token_id"):
        setattr(model.generation_config, key, config.decoder.pad_token_id)
    return model, build_t5_tokenizer()  # ids < 32128: any tokenizer works for random weights


def _real_audioldm(family):
    """AudioLDM-S: real-shape UNet, VAE, vocoder and CLAP text tower; the tiny preset's CLAP
    tokenizer and audio tower (the reference-audio path is not timed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    from musiclora.models.audioldm_components import AudioLDM, clap_text_embeddings
    from musiclora.models.audioldm_tiny import build_tiny_audioldm
    from musiclora.models.configs import config_dir

    root = Path(config_dir(family.default_base))
    read = lambda name: json.loads((root / name / "config.json").read_text())
    with torch.device("cpu"):
        tiny, tokenizer = build_tiny_audioldm()
    unet = UNet2DConditionModel.from_config(read("unet"))
    vae = AutoencoderKL.from_config(read("vae"))
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**read("vocoder")))
    text = ClapTextModelWithProjection(ClapTextConfig(**read("text_encoder")))
    model = AudioLDM(unet, vae, text.eval(), vocoder, tiny.scheduler)
    model.extras.update(tiny.extras)
    model.extras["uncond"] = clap_text_embeddings(text, tokenizer, [""])[0]
    return model, tokenizer


def synthetic_samples(family, loaded, n: int, seconds: float) -> list[dict[str, Any]]:
    """`n` decoded shard samples of `seconds` each, as the shard reader yields them (no codec run:
    random codes / latents of the shapes the family's `encode_segments` writes)."""
    rng = np.random.default_rng(0)
    spec = family.feature_spec(loaded)
    caption = {"caption": "a slow orchestral piece with strings and a solo flute"}
    if spec["codec"] == "encodec":
        k, t = spec["num_codebooks"], round(seconds * spec["frame_rate"])
        t_c = int(np.ceil(seconds * spec["codec_sample_rate"] / 4096))  # chroma hop 4096 (235 frames per 30 s)
        chroma = np.eye(12, dtype=np.uint8)[rng.integers(0, 12, t_c)]
        return [{"codes.npy": rng.integers(0, spec["codebook_size"], (k, t)).astype(np.int16), "chroma.npy": chroma,
                 "json": {**caption, "num_frames": t}} for _ in range(n)]
    t = round(seconds * spec["frame_rate"])
    t -= t % 2  # the UNet halves T' three times after the VAE: keep it a multiple of 8 below
    t = max(8, t - t % 8)
    f = 64 // spec["vae_scale_factor"]
    d = spec["clap_dim"]
    emb = lambda: (v := rng.standard_normal(d).astype(np.float32)) / np.linalg.norm(v)
    return [{"latents.npy": rng.standard_normal((spec["latent_channels"], t, f)).astype(np.float16),
             "clap_text.npy": emb(), "clap_audio.npy": emb(), "json": {**caption, "num_frames": t}} for _ in range(n)]


# --------------------------------------------------------------------------- one section


def _train_config(name: str, smoke: bool, batch_size: int, device: torch.device):
    from musiclora.config import TrainConfig, load_config

    path = REPO / "ray_jobs" / "configs" / f"{name}{'_tiny' if smoke else ''}.yaml"
    cuda = device.type == "cuda"
    return load_config(path, [f"data.batch_size={batch_size}", f"run.use_gpu={str(cuda).lower()}",
                              f"deepspeed.precision={'bf16' if cuda else 'fp32'}", "deepspeed.zero_stage=2",
                              "run.num_workers=1", "optim.grad_accum=1"], TrainConfig)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_section(name: str, args) -> dict[str, Any]:
    """Build, train `args.steps` steps, validate, generate; returns the section's figures."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    from musiclora.train.device import set_ds_accelerator

    set_ds_accelerator(device.type == "cuda")
    import deepspeed

    from musiclora.adapters import apply_lora
    from musiclora.models.families import get_family
    from musiclora.train.deepspeed import build_ds_config, build_optimizer, model_dtype
    from musiclora.train.device import deepspeed_args
    from musiclora.train.loop import train_step
    from musiclora.train.validate import validation_loss

    spec = SPEC[name]
    out: dict[str, Any] = {"section": name, "mode": spec["mode"]}
    init_single_rank(device)
    family_name = "audioldm" if spec["config"] == "audioldm" else "musicgen-melody"
    batch_size = args.batch_size if family_name == "musicgen-melody" else args.audioldm_batch_size
    batch_size *= spec.get("batch_scale", 1)
    seconds = args.seconds if family_name == "musicgen-melody" else args.audioldm_seconds
    cfg = _train_config(spec["config"], args.smoke, batch_size, device)
    if "lora_dropout" in spec:
        cfg.adapter.lora_dropout = spec["lora_dropout"]
    family = get_family(cfg.model.family).configure(cfg.model.options)
    dtype = model_dtype(cfg)
    t0 = time.time()
    loaded = build_loaded(family, args.smoke, device, dtype)
    out["build_s"] = time.time() - t0
    model = loaded.model
    if spec["mode"] == "lora":
        model = apply_lora(model, family, cfg.adapter)
        model.to(device, dtype)
    else:
        for pname, p in family.lora_root(model).named_parameters():
            p.requires_grad_(pname.startswith(spec.get("full_prefix", "")))
    if args.gradient_checkpointing:
        family.enable_gradient_checkpointing(model)
    model.train()
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    root = family.lora_root(model)
    flow = getattr(_unwrap_base(root), "decoder", None) or _unwrap_base(root)  # what the tokens pass through
    n_flow = sum(p.numel() for p in flow.parameters())
    out.update(params_total=n_total, params_trained=n_train, params_flow=n_flow, dtype=str(dtype),
               batch_size=batch_size, segment_s=seconds, adapter=cfg.adapter.model_dump(),
               attn_implementation=getattr(getattr(flow, "config", None), "_attn_implementation", None))

    ds_config = build_ds_config(cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds_config,
                                      args=deepspeed_args(device))
    out["engine_device"] = str(engine.device)
    samples = synthetic_samples(family, loaded, batch_size, seconds)
    batch = family.collate(samples, loaded)  # on the CPU, as the shard loader yields it
    tokens = family.num_tokens(batch)
    k = int(batch["codes"].shape[1]) if "codes" in batch else 1
    positions = tokens // k  # decoder positions carrying targets (MusicGen: frames; AudioLDM: latent frames)

    losses = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            t_start = time.time()
        losses.append(float(train_step(engine, family, batch)))
    _sync(device)
    wall = time.time() - t_start
    step_s = wall / args.steps
    out.update(step_time_s=step_s, losses=losses, loss_changed=losses[0] != losses[-1],
               tokens_per_step=positions, tokens_per_s=positions / step_s, codec_tokens_per_s=tokens / step_s,
               audio_s_per_s=batch_size * seconds / step_s)
    flops_formula = (6 * n_flow if spec["mode"] == "full" else 4 * n_flow + 6 * n_train) * positions
    out["flops_per_step_formula"] = flops_formula
    if args.count_flops:
        out["flops_per_step_counted"] = _count_step_flops(engine, family, batch)
    if device.type == "cuda":
        name_gpu = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k_, v in PEAK_TFLOPS.items() if k_ in name_gpu), None)
        out.update(gpu=name_gpu, peak_tflops=peak, peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30)
        if peak:
            out["mfu_formula"] = flops_formula / step_s / (peak * 1e12)
            if out.get("flops_per_step_counted"):
                out["mfu_counted"] = out["flops_per_step_counted"] / step_s / (peak * 1e12)

    t0 = time.time()
    n = len(samples)
    out["val_loss"] = validation_loss(engine, family, [{"batch": batch, "weight": n}, {"batch": batch, "weight": n}])
    out["val_s"] = time.time() - t0
    if args.profile and device.type == "cuda":
        out["profile"] = _profile_step(engine, family, batch, device)
    if spec["mode"] == "lora" and spec.get("generate", True) and not args.skip_generate:
        out["generate"] = _generation(engine, family, loaded, args)
    return out


def _profile_step(engine, family, batch, device, top: int = 20) -> dict[str, Any]:
    """Where one training step's time goes: GPU busy share of the wall time and the top CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile

    from musiclora.train.loop import train_step

    _sync(device)
    t0 = time.time()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(engine, family, batch)
        _sync(device)
    wall = time.time() - t0
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    busy_us = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {"wall_s": wall, "gpu_busy_s": busy_us / 1e6, "gpu_busy_share": busy_us / 1e6 / max(wall, 1e-9),
            "kernels": [{"name": e.key[:120], "ms": e.self_device_time_total / 1e3, "calls": e.count,
                         "share": e.self_device_time_total / max(busy_us, 1)} for e in events[:top]]}


def _unwrap_base(root):
    return root.get_base_model() if hasattr(root, "get_base_model") else root


def _count_step_flops(engine, family, batch) -> int | None:
    """FLOPs of one forward + backward counted by torch (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from musiclora.train.device import batch_to_device

    counter = FlopCounterMode(display=False)
    with counter:
        loss = family.loss(engine, batch_to_device(batch, engine.device))
        engine.backward(loss)
    engine.zero_grad() if hasattr(engine, "zero_grad") else None
    return int(counter.get_total_flops())


def _merged(root):
    """Context: the active adapter folded into the base weights (peft `merge_adapter`), unfolded after."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        root.merge_adapter()
        try:
            yield
        finally:
            root.unmerge_adapter()

    return ctx


def _generation(engine, family, loaded, args) -> dict[str, Any]:
    """Real-time factor of the family's `generate` with the trained adapter and with it disabled."""
    from musiclora.models.base import GenerationRequest

    model = engine.module
    model.eval()
    duration = args.gen_seconds
    request = GenerationRequest(prompt="a calm piano melody", duration_s=duration, seed=0)
    out: dict[str, Any] = {"duration_s": duration}
    root = family.lora_root(model)
    warm = GenerationRequest(prompt="warm-up", duration_s=min(duration, 0.5), seed=0)
    family.generate(model, loaded.tokenizer, warm)  # kernels and caches ready before anything is timed
    runs = (("with_adapter", None), ("without_adapter", root.disable_adapter), ("with_adapter_merged", _merged(root)))
    for key, ctx in runs:
        try:
            _sync(engine.device)
            t0 = time.time()
            if ctx is None:
                wav, sr = family.generate(model, loaded.tokenizer, request)
            else:
                with ctx():
                    wav, sr = family.generate(model, loaded.tokenizer, request)
            _sync(engine.device)
            wall = time.time() - t0
            audio_s = wav.shape[-1] / sr  # [L] or [C, L] (a stereo family): seconds are the last axis
            out[key] = {"wall_s": wall, "audio_s": audio_s, "rtf": wall / max(audio_s, 1e-9),
                        "channels": 1 if wav.ndim == 1 else int(wav.shape[0]), "finite": bool(np.isfinite(wav).all())}
        except Exception as exc:  # noqa: BLE001 - reported in the JSON, the check goes on
            out[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    return out


# --------------------------------------------------------------------------- driver


def _child(args) -> None:
    try:
        result = run_section(args.section, args)
    except Exception as exc:  # noqa: BLE001
        result = {"section": args.section, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-4000:]}
    Path(args.result).write_text(json.dumps(result, default=str))
    gc.collect()


def _child_args(args) -> list[str]:
    """The resolved options, as a section process's command line."""
    out = ["--device", args.device]
    for key in ("steps", "warmup", "batch_size", "seconds", "audioldm_batch_size", "audioldm_seconds", "gen_seconds",
                "peak_tflops"):
        if getattr(args, key) is not None:
            out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    flags = {"--smoke": args.smoke, "--gradient-checkpointing": args.gradient_checkpointing,
             "--no-count-flops": not args.count_flops, "--skip-generate": args.skip_generate,
             "--profile": args.profile}
    return out + [flag for flag, on in flags.items() if on]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models, 2 steps (CPU self-test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="MusicGen batch (default 8; smoke 2)")
    ap.add_argument("--seconds", type=float, default=None, help="MusicGen segment, s (default 30; smoke 1)")
    ap.add_argument("--audioldm-batch-size", type=int, default=None, help="default 16; smoke 2")
    ap.add_argument("--audioldm-seconds", type=float, default=None, help="default 10.24; smoke 1.28")
    ap.add_argument("--gen-seconds", type=float, default=None, help="generated audio per call (default 10; smoke 0.2)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-count-flops", dest="count_flops", action="store_false")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one step: GPU busy share, top CUDA kernels")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device bf16 dense peak (default by GPU name)")
    ap.add_argument("--section-timeout", type=int, default=300, help="seconds per section process")
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    smoke = args.smoke
    for key, full, tiny in (("steps", 10, 2), ("warmup", 3, 1), ("batch_size", 8, 2), ("seconds", 30.0, 1.0),
                            ("audioldm_batch_size", 16, 2), ("audioldm_seconds", 10.24, 1.28),
                            ("gen_seconds", 10.0, 0.2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if smoke else full)
    if args.section:
        _child(args)
        return {}
    report: dict[str, Any] = {"torch": torch.__version__, "device": args.device, "smoke": smoke,
                              "cuda": torch.version.cuda, "sections": {}}
    passthrough = _child_args(args)
    for name in [s for s in args.sections.split(",") if s]:
        result_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_{os.getpid()}_{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--section", name, "--result", str(result_file)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, check=False, timeout=args.section_timeout, capture_output=True, text=True)
            result = (json.loads(result_file.read_text()) if result_file.exists()
                      else {"error": f"section process exited {proc.returncode} without a result"})
            if proc.returncode or "error" in result:
                result["stderr_tail"] = proc.stderr[-3000:]
        except subprocess.TimeoutExpired as exc:
            result = {"error": f"timed out after {args.section_timeout} s",
                      "stderr_tail": (exc.stderr or b"")[-3000:].decode(errors="replace")
                      if isinstance(exc.stderr, bytes) else str(exc.stderr)[-3000:]}
        result["wall_s"] = time.time() - t0
        result_file.unlink(missing_ok=True)
        report["sections"][name] = result
        print(json.dumps({name: {k: v for k, v in result.items() if k not in ("traceback", "stderr_tail", "losses")}},
                         default=str), file=sys.stderr, flush=True)
        _write_out(report)  # partial results survive a run cut short
    s = report["sections"]
    lora, full = s.get("musicgen_lora", {}), s.get("musicgen_full", {})
    if lora.get("step_time_s") and full.get("step_time_s"):
        report["lora_vs_full_step_speedup"] = full["step_time_s"] / lora["step_time_s"]
        if lora.get("peak_mem_gb") and full.get("peak_mem_gb"):
            report["lora_vs_full_peak_mem_ratio"] = lora["peak_mem_gb"] / full["peak_mem_gb"]
    report["targets"] = {"musicgen_lora_mfu_formula_ge_0.40": (lora.get("mfu_formula") or 0) >= 0.40,
                         "musicgen_lora_mfu_counted_ge_0.40": (lora.get("mfu_counted") or 0) >= 0.40,
                         "lora_ge_2x_faster_than_full": report.get("lora_vs_full_step_speedup", 0) >= 2.0}
    print(json.dumps(report, indent=2, default=str), flush=True)
    _write_out(report)
    return report


def _write_out(report: dict[str, Any]) -> None:
    """`$OUT/gpu_check.json` when OUT is set."""
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
