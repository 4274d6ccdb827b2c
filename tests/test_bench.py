"""Smoke run of the benchmark: it runs end to end and reports every figure (no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_reports_every_measure(tmp_path, tiny_model_dir):
    env = {**os.environ, "MODEL_REPO_ID": str(tiny_model_dir)}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["raw"]["tokens_per_s"] > 0
    ours = result["ours"]
    assert ours["p1"]["tokens_per_s"] > 0 and result["ours_sqlite"]["p1"]["tokens_per_s"] > 0
    assert ours["p2"]["text_ms"] > 0 and ours["p2"]["image_ms"] > 0
    assert set(ours["p3"]) == {"c1", "c4", "c8", "random_arrivals_8"}
    assert all(v["aggregate_tokens_per_s"] > 0 for v in ours["p3"].values())
    assert ours["p4"]["events"] > 1 and ours["p4"]["last_byte_ms"] >= ours["p4"]["first_byte_ms"]
    assert ours["p5"]["sessions"] == 20 and ours["p5"]["threads_after"] > 0
    table = (tmp_path / "latest.md").read_text()
    assert "| P1 one stream, tok/s (in memory) |" in table and "| P5 threads before / after |" in table
