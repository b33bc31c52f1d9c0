"""Ray job entry point: audio + metadata -> WebDataset shards in object storage.

    ray job submit --address http://127.0.0.1:8265 -- python ray_jobs/prepare.py \
        --config ray_jobs/configs/prepare_musicgen_melody_tiny.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import json

from musiclora.config import PrepareConfig, load_config
from musiclora.data.prepare import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="PrepareConfig YAML")
    parser.add_argument("--tracks-per-task", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=None, help="encoder actors (default: the config's encoder_actors)")
    parser.add_argument("--dry-run", action="store_true", help="check the config (no weights, no workers) and exit")
    parser.add_argument("--offline", action="store_true", help="with --dry-run: do not touch object storage")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. segment_s=10")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides, PrepareConfig)
    if args.dry_run:
        from musiclora.train.dryrun import dry_run_prepare, emit

        raise SystemExit(emit(dry_run_prepare(cfg, args.config, offline=args.offline)))
    manifest = prepare(cfg, tracks_per_task=args.tracks_per_task, concurrency=args.concurrency)
    keep = ("family", "num_tracks", "num_skipped", "num_samples", "audio_seconds", "prepare_wall_s")
    print("MUSICLORA_RESULT " + json.dumps({k: manifest[k] for k in keep}), flush=True)


if __name__ == "__main__":
    main()
