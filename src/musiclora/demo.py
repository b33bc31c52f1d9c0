"""`musiclora demo`: the main job end to end on embedded defaults, stopping what it started.

store up -> Ray head up -> real corpus -> tiny base folder -> `ray job submit` prepare ->
`ray job submit` train -> generate base and adapter clips (WAV + spectrogram) -> plain-peft
check of the published adapter -> summary -> Ray and store down.

`family` picks the model family (`musicgen-melody` by default, or `audioldm`, which also
generates from a reference clip of the corpus); `DEMOS` holds what differs per family.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from musiclora.local_ray import LocalRay
from musiclora.store import EmbeddedStore

console = Console()
REPO = Path(__file__).resolve().parents[2]
PROMPT = "orchestral game soundtrack, epic battle music"


@dataclass(frozen=True)
class DemoSpec:
    """What the demo runs for one family: job configs (under ray_jobs/configs) and the plain-load check."""

    prepare_config: str
    train_config: str
    plain_check: str
    """Script under examples/ taking <base-folder> <adapter-url>; exits 0 when the adapter loads
    without musiclora and changes the output."""
    reference_clip: bool = False
    """Also generate from a reference clip of the corpus (audio conditioning)."""


DEMOS = {
    "musicgen-melody": DemoSpec("prepare_musicgen_melody_tiny.yaml", "musicgen_melody_tiny.yaml", "plain_peft_load.py"),
    "audioldm": DemoSpec("prepare_audioldm_tiny.yaml", "audioldm_tiny.yaml", "plain_audioldm_load.py",
                         reference_clip=True),
    "audioldm2": DemoSpec("prepare_audioldm2_tiny.yaml", "audioldm2_tiny.yaml", "plain_audioldm2_load.py"),
    "stable-audio-open": DemoSpec("prepare_stable_audio_open_tiny.yaml", "stable_audio_open_tiny.yaml",
                                  "plain_stable_audio_load.py"),
}


def _step(msg: str) -> None:
    console.rule(f"[bold cyan]{msg}")


SHOWN = ("MUSICLORA_RESULT", "[musiclora]", "Error", "error:", "succeeded", "failed")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class JobEcho:
    """Which lines of a job's log the demo shows, each once, as plain text.

    A Ray Train worker's `print` reaches the job log twice when Train V2's print patch is on (it
    both prints and logs the message; Ray forwards both to the driver under the same colour-coded
    `(RayTrainWorker pid=...)` prefix). The demo's cluster turns the patch off
    (RAY_TRAIN_ENABLE_PRINT_PATCH=0); a line whose message (from `[musiclora]` on) was already
    shown is still skipped, so the console gets each once whatever the cluster does.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def show(self, line: str) -> str | None:
        """The line to print (ANSI codes removed), or None: not shown, or already shown."""
        plain = ANSI.sub("", line).rstrip()
        if not any(k in plain for k in SHOWN):
            return None
        key = plain[plain.index("[musiclora]"):] if "[musiclora]" in plain else plain
        if key in self.seen:
            return None
        self.seen.add(key)
        return plain


def submit(ray_head: LocalRay, args: list[str], log_path: Path) -> dict:
    """`ray job submit` a python entry point, follow its logs to the end, return its MUSICLORA_RESULT.

    The log file gets every line (ANSI colour codes removed); the console the lines `JobEcho` picks.

    Raises:
        RuntimeError: the job failed (the tail of its log is in the message).
    """
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "job", "submit", "--address", ray_head.dashboard_url, "--", sys.executable, *args]
    console.print("[dim]$ " + " ".join(cmd))
    env = {**os.environ, **ray_head.env()}
    lines: list[str] = []
    echo = JobEcho()
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            line = ANSI.sub("", line)
            log.write(line)
            lines.append(line)
            shown = echo.show(line)
            if shown is not None:
                console.print("  " + shown, markup=False, highlight=False)
    result = next((json.loads(l.split("MUSICLORA_RESULT ", 1)[1]) for l in lines if "MUSICLORA_RESULT " in l), None)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"job {args[0]} failed (exit {proc.returncode}); log {log_path}:\n" + "".join(lines[-40:]))
    return result


def run_demo(workdir: Path, max_tracks: int | None = None, steps: int | None = None,
             family: str = "musicgen-melody") -> int:
    """Run the demo in `workdir`; returns 0 on success. Everything started is stopped at the end.

    Raises:
        ValueError: `family` has no demo (names the ones that do).
    """
    from musiclora.data.corpus import build_corpus
    from musiclora.models.families import get_family

    if family not in DEMOS:
        raise ValueError(f"demo: no demo for family {family!r}; expected one of {sorted(DEMOS)}")
    spec = DEMOS[family]

    t_start = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "outputs"
    out.mkdir(exist_ok=True)
    store = EmbeddedStore(workdir / "store")
    ray_head = LocalRay(workdir / "ray", num_cpus=5)
    try:
        _step("1/7 object store (SeaweedFS on 127.0.0.1)")
        store.start()
        os.environ.update(store.env())
        console.print(f"S3 endpoint {store.endpoint_url}")

        _step("2/7 Ray head on 127.0.0.1")
        cluster_env = {**store.env(), "DS_ACCELERATOR": "cpu",
                       "TORCH_EXTENSIONS_DIR": str(workdir / "torch_extensions"),
                       "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false",
                       "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # else each worker print reaches the log twice
        ray_head.start(extra_env=cluster_env)
        console.print(f"dashboard {ray_head.dashboard_url}")

        _step("3/7 real music corpus (Debian music packages)")
        corpus = build_corpus("demo", cache_dir=workdir / "cache" / "corpus", max_tracks=max_tracks)
        metadata = Path(corpus.metadata_path)
        console.print(f"{corpus.num_tracks} tracks, {corpus.total_duration_s / 60:.1f} min -> {metadata}")

        _step(f"4/7 tiny {family} base (save_pretrained folder)")
        base = workdir / "models" / f"{family}-tiny"
        if not base.exists() or not any(base.iterdir()):
            get_family(family).save_tiny(str(base))
        console.print(str(base))

        _step("5/7 prepare: shards into s3:// (ray job submit)")
        shards = f"s3://musiclora/shards/{family}/demo"
        prep = submit(ray_head, [str(REPO / "ray_jobs/prepare.py"), "--config",
                                 str(REPO / "ray_jobs/configs" / spec.prepare_config),
                                 f"metadata={metadata}", f"base={base}", f"output_url={shards}"], out / "prepare.log")

        _step("6/7 LoRA training: 2 Ray Train workers, DeepSpeed ZeRO-2 (ray job submit)")
        run_name = fresh_run_name(family)
        console.print(f"run {run_name} (a new name each demo: a second demo trains again instead of "
                      "resuming the finished run)")
        overrides = [f"model.base={base}", f"data.shards_url={shards}", f"run.name={run_name}"]
        if steps:
            overrides.append(f"optim.max_steps={steps}")
        trained = submit(ray_head, [str(REPO / "ray_jobs/train.py"), "--config",
                                    str(REPO / "ray_jobs/configs" / spec.train_config), *overrides],
                         out / "train.log")

        _step("7/7 generate with and without the adapter")
        from musiclora.generate import generate

        adapter = trained["adapter_url"]
        with_adapter = generate(PROMPT, str(out / "demo_adapter.wav"), adapter=adapter, duration_s=4.0)
        base_only = generate(PROMPT, str(out / "demo_base.wav"), family=family, base=str(base), duration_s=4.0)
        from_reference = None
        if spec.reference_clip:
            clip = _reference_clip(corpus.metadata_path, out / "reference.wav")
            from_reference = generate("", str(out / "demo_reference.wav"), adapter=adapter, duration_s=4.0,
                                      reference=clip)
        plain = subprocess.run([sys.executable, str(REPO / "examples" / spec.plain_check), str(base), adapter],
                               capture_output=True, text=True, env={**os.environ, **store.env()}, check=False)
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
        if from_reference:
            table.add_row("audio (reference)", f"{from_reference['wav']} + {from_reference['png']} "
                                               f"from {from_reference['reference']}")
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


def fresh_run_name(family: str, now: float | None = None) -> str:
    """`<family>-tiny-demo-<UTC date-time>`: a run name no earlier demo in this checkout used.

    Re-using the config's fixed name would make Ray Train resume the finished run at its last step
    (zero steps trained, the same adapter published again).
    """
    return f"{family}-tiny-demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def _reference_clip(metadata_path, out_wav: Path, start_s: float = 30.0, duration_s: float = 10.0) -> str:
    """Cut `duration_s` seconds (from `start_s`, or the start of a shorter track) of the corpus's
    first track into a 16-bit WAV to condition generation on; returns its path."""
    import soundfile as sf

    from musiclora.audio import load_audio, to_mono

    first = json.loads(Path(metadata_path).read_text().splitlines()[0])
    wav, sr = load_audio(first["path"])
    mono = to_mono(wav)
    start = int(start_s * sr) if mono.size > int((start_s + duration_s) * sr) else 0
    sf.write(str(out_wav), mono[start : start + int(duration_s * sr)], sr, subtype="PCM_16")
    return str(out_wav)
