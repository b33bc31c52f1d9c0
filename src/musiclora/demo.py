"""`musiclora demo`: the main job end to end on embedded defaults, stopping what it started.

store up -> Ray head up -> real corpus -> tiny base folder -> `ray job submit` prepare ->
`ray job submit` train -> generate base and adapter clips (WAV + spectrogram) -> plain-peft
check of the published adapter -> summary -> Ray and store down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from musiclora.local_ray import LocalRay
from musiclora.storage import EmbeddedStore

console = Console()
REPO = Path(__file__).resolve().parents[2]
PROMPT = "orchestral game soundtrack, epic battle music"


def _step(msg: str) -> None:
    console.rule(f"[bold cyan]{msg}")


def submit(ray_head: LocalRay, args: list[str], log_path: Path) -> dict:
    """`ray job submit` a python entry point, follow its logs to the end, return its MUSICLORA_RESULT.

    Raises:
        RuntimeError: the job failed (the tail of its log is in the message).
    """
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "job", "submit", "--address", ray_head.dashboard_url, "--", sys.executable, *args]
    console.print("[dim]$ " + " ".join(cmd))
    env = {**os.environ, **ray_head.env()}
    lines: list[str] = []
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if any(k in line for k in ("MUSICLORA_RESULT", "[musiclora]", "Error", "error:", "succeeded", "failed")):
                console.print("  " + line.rstrip(), markup=False, highlight=False)
    result = next((json.loads(l.split("MUSICLORA_RESULT ", 1)[1]) for l in lines if "MUSICLORA_RESULT " in l), None)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"job {args[0]} failed (exit {proc.returncode}); log {log_path}:\n" + "".join(lines[-40:]))
    return result


def run_demo(workdir: Path, max_tracks: int | None = None, steps: int | None = None) -> int:
    """Run the demo in `workdir`; returns 0 on success. Everything started is stopped at the end."""
    from musiclora.data.corpus import build_corpus
    from musiclora.models.registry import get_family

    t_start = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "outputs"
    out.mkdir(exist_ok=True)
    store = EmbeddedStore(workdir / "store")
    ray_head = LocalRay(workdir / "ray", num_cpus=4)
    try:
        _step("1/7 object store (SeaweedFS on 127.0.0.1)")
        store.start()
        os.environ.update(store.env())
        console.print(f"S3 endpoint {store.endpoint_url}")

        _step("2/7 Ray head on 127.0.0.1")
        cluster_env = {**store.env(), "DS_ACCELERATOR": "cpu",
                       "TORCH_EXTENSIONS_DIR": str(workdir / "torch_extensions"),
                       "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
        ray_head.start(extra_env=cluster_env)
        console.print(f"dashboard {ray_head.dashboard_url}")

        _step("3/7 real music corpus (Debian music packages)")
        corpus = build_corpus("demo", cache_dir=workdir / "cache" / "corpus", max_tracks=max_tracks)
        metadata = Path(corpus.metadata_path)
        console.print(f"{corpus.num_tracks} tracks, {corpus.total_duration_s / 60:.1f} min -> {metadata}")

        _step("4/7 tiny MusicGen-Melody base (save_pretrained folder)")
        base = workdir / "models" / "musicgen-melody-tiny"
        if not (base / "config.json").exists():
            get_family("musicgen-melody").save_tiny(str(base))
        console.print(str(base))

        _step("5/7 prepare: shards into s3:// (ray job submit)")
        shards = "s3://musiclora/shards/musicgen-melody/demo"
        prep = submit(ray_head, [str(REPO / "ray_jobs/prepare.py"), "--config",
                                 str(REPO / "ray_jobs/configs/prepare_musicgen_melody_tiny.yaml"),
                                 f"metadata={metadata}", f"base={base}", f"output_url={shards}"], out / "prepare.log")

        _step("6/7 LoRA training: 2 Ray Train workers, DeepSpeed ZeRO-2 (ray job submit)")
        overrides = [f"model.base={base}", f"data.shards_url={shards}"]
        if steps:
            overrides.append(f"optim.max_steps={steps}")
        trained = submit(ray_head, [str(REPO / "ray_jobs/train.py"), "--config",
                                    str(REPO / "ray_jobs/configs/musicgen_melody_tiny.yaml"), *overrides],
                         out / "train.log")

        _step("7/7 generate with and without the adapter")
        from musiclora.generate import generate

        adapter = trained["adapter_url"]
        with_adapter = generate(PROMPT, str(out / "demo_adapter.wav"), adapter=adapter, duration_s=4.0)
        base_only = generate(PROMPT, str(out / "demo_base.wav"), family="musicgen-melody", base=str(base),
                             duration_s=4.0)
        plain = subprocess.run([sys.executable, str(REPO / "examples/plain_peft_load.py"), str(base), adapter],
                               capture_output=True, text=True, env={**os.environ, **store.env()})
        console.print(plain.stdout.strip() or plain.stderr[-2000:], markup=False, highlight=False)

        table = Table(title=f"musiclora demo ({(time.time() - t_start) / 60:.1f} min)", show_lines=False)
        table.add_column("what")
        table.add_column("where / figure")
        table.add_row("corpus", f"{corpus.num_tracks} tracks, {corpus.total_duration_s / 60:.1f} min, {metadata}")
        table.add_row("shards", f"{shards} ({prep['num_samples']['train']} samples, {prep['num_skipped']} skipped)")
        table.add_row("training loss", f"{trained['first_loss_mean']:.3f} -> {trained['last_loss_mean']:.3f} "
                                       f"over {trained['steps']} steps")
        table.add_row("adapter", f"{adapter}/ (adapter_config.json, adapter_model.safetensors, card.json, loss.png)")
        table.add_row("audio (adapter)", f"{with_adapter['wav']} + {with_adapter['png']}")
        table.add_row("audio (base)", f"{base_only['wav']} + {base_only['png']}")
        table.add_row("logs", f"{out / 'prepare.log'}, {out / 'train.log'}")
        console.print(table)
        ok = trained["last_loss_mean"] < trained["first_loss_mean"] and plain.returncode == 0
        if not ok:
            console.print("[red]demo check failed: loss did not fall or the plain peft load failed")
        return 0 if ok else 1
    finally:
        _step("stopping what the demo started")
        ray_head.stop()
        store.stop()
