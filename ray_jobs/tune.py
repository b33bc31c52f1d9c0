"""Ray job entry point: a Tune search over LoRA hyper-parameters; the winner goes to the registry.

    ray job submit --address http://127.0.0.1:8265 -- python ray_jobs/tune.py \
        --config ray_jobs/configs/tune_musicgen_melody_tiny.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import json

from musiclora.tune.report import save_summary
from musiclora.tune.search import load_tune_config, run_tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TuneConfig YAML")
    parser.add_argument("--dry-run", action="store_true", help="check the config and its train config, then exit")
    parser.add_argument("--offline", action="store_true", help="with --dry-run: do not touch object storage")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the Tune config")
    args = parser.parse_args()
    tune_cfg, base = load_tune_config(args.config, args.overrides)
    if args.dry_run:
        from musiclora.train.dryrun import dry_run_tune, emit

        raise SystemExit(emit(dry_run_tune(tune_cfg, base, args.config, offline=args.offline)))
    summary = {"name": tune_cfg.name, **run_tune(tune_cfg, base)}
    summary["summary_url"] = save_summary(tune_cfg.storage_path, tune_cfg.name, summary)
    print("MUSICLORA_RESULT " + json.dumps({k: summary[k] for k in ("name", "best", "registry", "summary_url")},
                                           default=str), flush=True)


if __name__ == "__main__":
    main()
