"""`make gpu-check` stays ready without a GPU: its script parses, and its Python parts run
on CPU at tiny sizes (the full dry run is slow: ``-m slow``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_the_script_parses():
    assert shutil.which("bash")
    run = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_train_step_runs_at_the_tiny_shape(tmp_path):
    """The training-step benchmark writes its rows (the tree penalty and the two baselines)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    train_step.main(["--tiny", "--only", "tree", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "train_step.json").read_text())
    assert [r["penalty"] for r in payload["rows"]] == ["none", "full_kl", "tree"]
    assert abs(payload["top1"] - 0.47) < 0.1 and 0 < payload["kl_per_token"] <= 0.02
    assert all(r["step_s"] > 0 for r in payload["rows"])


@pytest.mark.slow
def test_the_dry_run_writes_every_result(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "GPU_PYTHON": sys.executable, "BENCH_RESULTS": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert {"regularizers_cuda.json", "chunked_head_cuda.json", "train_step.json", "gpu_check_cuda.md"} <= {p.name for p in tmp_path.iterdir()}
