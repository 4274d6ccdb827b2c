"""Smoke run of the benchmark: it runs end to end and reports every figure (no timing asserted)."""

import importlib.util
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
    wide = result["ours_batch16"]
    assert set(wide["p3"]) == {"c1", "c16"} and wide["p3"]["c16"]["aggregate_tokens_per_s"] > 0
    p7 = wide["p7"]
    assert abs(p7["prompt_tokens"] - 2000) < 100 and p7["joiner_ttft_ms"] > 0
    assert p7["gaps_before"] > 0 and p7["gaps_during"] > 0 and p7["gap_max_during_ms"] >= p7["gap_p99_during_ms"]
    video = wide["p7_video"]
    assert video["prompt_tokens"] > 100 and video["joiner_ttft_ms"] > 0 and video["gaps_during"] > 0
    table = (tmp_path / "latest.md").read_text()
    assert "| P1 one stream, tok/s (in memory) |" in table and "| P5 threads before / after |" in table
    assert "event gap p99 during / before the join" in table and "| P3 16 streams (MAX_BATCH_SIZE=16)" in table
    assert "video prompt joins 8 streams" in table


def test_bench_client_finds_text_as_a_json_parse_would():
    """The client tests lines for text instead of parsing them (bench/README.md); the test
    must agree with json.loads on every kind of chunk, escaped quotes in text included."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": "a", "reasoning": "a"}, {"content": "b"},
              {"content": '"content":"'}, {"content": '"'}, {}, {"tool_calls": [{"index": 0}]}, {"content": None}]
    for delta in deltas:
        for logprobs in (None, {"content": [{"token": "x"}]}):
            chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}]}
            line = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
            has_text = bool(delta.get("content") or delta.get("reasoning_content"))
            assert bool(bench.TEXT_FIELD.search(line)) == has_text, line
            assert bool(bench.TEXT_FIELD.search(json.dumps(chunk))) == has_text, line
