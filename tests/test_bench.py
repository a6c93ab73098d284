"""The benchmark's code path, on tiny models on the CPU, so it cannot rot (its numbers mean nothing here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_both_trainers_in_smoke_mode(comfy_host: Path, tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    command = [sys.executable, "bench/bench.py", "--smoke", "--models", "flux", "--variants", "bf16",
               "--json", str(results)]
    environment = os.environ | {"COMFYUI_PATH": str(comfy_host), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    (row,) = json.loads(results.read_text())["rows"]
    for side in ("ours", "theirs"):
        assert "error" not in row[side], row[side]
        assert row[side]["median_s"] > 0
    assert row["ours"]["forward_flops"] > 0
    assert "Flux dev" in finished.stdout and "ours/theirs" in finished.stdout
