"""Ray job entry point: LoRA training from a YAML config.

    ray job submit --address http://127.0.0.1:8265 -- python ray_jobs/train.py \
        --config ray_jobs/configs/musicgen_melody_tiny.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import json

from musiclora.config import TrainConfig, load_config
from musiclora.train.trainer import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TrainConfig YAML")
    parser.add_argument("--dry-run", action="store_true", help="check the config (no weights, no workers) and exit")
    parser.add_argument("--offline", action="store_true", help="with --dry-run: do not touch object storage")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. adapter.r=16")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides, TrainConfig)
    if args.dry_run:
        from musiclora.train.dryrun import dry_run_train, emit

        raise SystemExit(emit(dry_run_train(cfg, args.config, offline=args.offline)))
    summary = run_training(cfg)
    summary.pop("losses", None)
    print("MUSICLORA_RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
