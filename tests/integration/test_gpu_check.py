"""bench/gpu_check.py must not rot between GPU runs: its CPU smoke mode runs every section
(tiny models, 2 steps, gloo, no Ray) through the same code the GPU run takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_gpu_check_smoke_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--device", "cpu",
                           "--section-timeout", "600"], check=False, capture_output=True, text=True, timeout=1500, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report == json.loads(proc.stdout)
    assert set(report["sections"]) == {"musicgen_lora", "musicgen_full", "audioldm_lora"}
    for name, section in report["sections"].items():
        assert "error" not in section, (name, section.get("error"), section.get("traceback"))
        assert section["loss_changed"] and section["step_time_s"] > 0 and section["val_loss"] > 0, name
        assert section["flops_per_step_counted"] > 0 and section["engine_device"] == "cpu", name
    lora, full = report["sections"]["musicgen_lora"], report["sections"]["musicgen_full"]
    assert lora["params_trained"] < full["params_trained"] <= full["params_total"]
    assert report["lora_vs_full_step_speedup"] > 0
    for name in ("musicgen_lora", "audioldm_lora"):
        gen = report["sections"][name]["generate"]
        for key in ("with_adapter", "without_adapter"):
            assert gen[key].get("finite") and gen[key]["rtf"] > 0, (name, key, gen[key])
