"""`musiclora evaluate` and `musiclora adaptation-table`.

Both are top-level commands (mounted in `cli/main.py`). `make adaptation-table` runs the study with
OMP_WAIT_POLICY=PASSIVE set by the Makefile (no import side effects here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from musiclora.cli.errors import console, fail


def _embedder_list(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise typer.BadParameter("give at least one embedder, e.g. clap,encodec,crepe-tiny")
    return names


def evaluate(
    adapter: str = typer.Option(..., help="adapter folder (path or s3:// URL, peft format with card.json)"),
    prompts: str = typer.Option(
        ..., help="prompts JSONL: {prompt, seed?, melody?, melody_start_s?, id?} a line"
    ),
    reference: str = typer.Option(
        ..., help="reference music: shards URL (manifest.json), audio folder or file"
    ),
    out: Path = typer.Option(Path(".musiclora/outputs/eval"), help="report folder"),
    base: str = typer.Option(None, help="base model (hub id, folder, 'tiny'); default: the adapter card's"),
    family: str = typer.Option(None, help="model family; default: the adapter card's"),
    clap: str = typer.Option(
        None,
        help="CLAP checkpoint for the CLAP score and the clap embedder: a hub id or folder, e.g. "
        "laion/larger_clap_music. Without it both are left out (the reason is printed). "
        "'tiny' = a random tiny CLAP for tests, labelled not a real score",
    ),
    embedders: str = typer.Option(
        None,
        help="KAD/FAD embedders, comma-separated; the first gives kad / fad: "
        "clap, encodec, encodec:<hub id>, crepe-tiny, crepe-full, mel-stats "
        "[default: clap,encodec,crepe-tiny, each where available]",
    ),
    duration_s: float = typer.Option(4.0, min=0.5, max=60.0, help="seconds generated per prompt"),
    guidance_scale: float = typer.Option(3.0, min=0.0),
    max_reference_clips: int = typer.Option(32, min=2),
    reference_split: str = typer.Option(None, help="shards split (default: val if present, else train)"),
    music: bool = typer.Option(
        True, help="compute harmonic accuracy, melodic complexity, rhythmic inconsistency"
    ),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N [default: cuda when visible, else cpu]"),
    dtype: str = typer.Option(None, help="float32, float16 or bfloat16 [default: bfloat16 on a GPU, else float32]"),
) -> None:
    """Generate with the base and the adapter on the same prompts and seeds; score; write the report."""
    from musiclora.audio import AudioDecodeError
    from musiclora.eval.evaluate import EvalSettings
    from musiclora.eval.evaluate import evaluate as run_evaluate
    from musiclora.storage import StorageError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # a bad --dtype is a pydantic ValidationError, a ValueError
        settings = EvalSettings(
            base=base, family=family, clap=clap, embedders=_embedder_list(embedders), duration_s=duration_s,
            guidance_scale=guidance_scale, max_reference_clips=max_reference_clips,
            reference_split=reference_split, music=music, device=device, dtype=dtype,
        )
        result = run_evaluate(adapter, prompts, reference, out, settings)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, AudioDecodeError, StorageError) as exc:
        fail(exc)
    from musiclora.eval.embeddings import describe_embedder
    from musiclora.eval.report import clean_json

    ev = result.evaluator
    print(
        json.dumps(
            clean_json(
                {
                    "files": result.info["files"],
                    "embedders": {k: describe_embedder(e)["label"] for k, e in ev.embedders.items()},
                    "left_out": ev.left_out,
                    "base": result.scores["base"].metrics,
                    "adapter": result.scores["adapter"].metrics,
                }
            )
        )
    )


def adaptation_table(
    out: Path = typer.Option(Path(".musiclora/outputs/adaptation"), help="output folder"),
    cache_dir: Path = typer.Option(Path(".musiclora/cache/corpus"), help="corpus cache"),
    base_steps: int = typer.Option(None, min=1, help="training steps of the base LM"),
    lora_steps: int = typer.Option(None, min=1, help="LoRA steps on the target style"),
    full_steps: int = typer.Option(None, min=1, help="full fine-tuning steps on the target style"),
    base_tracks: int = typer.Option(None, min=2, help="base-style tracks used"),
    eval_prompts: int = typer.Option(None, min=2, help="generated clips per model for KAD"),
    preset: str = typer.Option(None, help="LoRA preset: attn, attn+ffn, attn+ffn+heads, attn+cond"),
    seeds: str = typer.Option(None, help="comma-separated seeds, e.g. 0,1,2"),
) -> None:
    """Tiny base learns one style of the real corpus; LoRA and full fine-tuning adapt it to a held-out style."""
    from musiclora.studies.adaptation import AdaptationSettings, run_adaptation

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    given = {
        "base_steps": base_steps,
        "lora_steps": lora_steps,
        "full_steps": full_steps,
        "base_tracks": base_tracks,
        "eval_prompts": eval_prompts,
        "preset": preset,
    }
    if seeds is not None:
        try:
            given["seeds"] = tuple(int(x) for x in seeds.split(",") if x.strip())
        except ValueError:
            fail(ValueError(f"--seeds: expected comma-separated integers such as 0,1,2, got {seeds!r}"))
    settings = AdaptationSettings(
        cache_dir=str(cache_dir), **{k: v for k, v in given.items() if v is not None}
    )
    try:
        result = run_adaptation(settings, out)
    except (ValueError, RuntimeError, ModuleNotFoundError) as exc:
        fail(exc)
    print(result["markdown"])
    console.print(
        f"written: {out / 'adaptation_table.md'}, {out / 'adaptation.json'}, {out / 'loss_curves.png'}"
    )
