"""bench/run.py runs on a CPU-only install, prints its table and writes JSON and PNG plots."""
import json
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "run.py"


def test_quick_benchmark_subset_writes_table_json_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--repeat", "2", "--shape", "20x6x65536", "32x64x56x56",
         "--dtype", "float32", "--layout", "nhwc", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "copy bandwidth (same run): cpu" in run.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in result["rows"] if r.get("op")]
    assert {(r["case"], r["op"]) for r in rows} == {("32x64x56x56", op) for op in (
        "train", "infer", "backward", "train_relu", "train_add_relu", "backward_relu")}
    for r in rows:
        assert r["pybn_s"] > 0 and r["roofline"] > 0
        assert "numpy" in r["peers"] and "torch" in r["peers"]  # measured, or missing with a reason
        assert ("s" in r["peers"]["pybn_separate"]) == (r["op"].endswith("relu"))
        assert all(("s" in p) != ("missing" in p) for p in r["peers"].values())
    assert result["environment"]["cpu_isa"] and result["copy_bandwidth_GBps"]["cpu"] > 0
    for png in ("roofline.png", "speedup_cpu.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_loop_benchmark_runs_and_writes_json(tmp_path):
    loop = BENCH.parent / "train_loop.py"
    run = subprocess.run([sys.executable, str(loop), "--shape", "8x4x16x16", "--steps", "3", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "train_loop.json").read_text())
    assert set(result["ratio"]) == {"train", "backward", "infer"} and all(v > 0 for v in result["ratio"].values())
    assert "fresh / out=" in run.stdout and "pool:" in run.stdout
