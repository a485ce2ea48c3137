"""tools/bench.py on the demo architecture, CPU, tiny sizes: every row runs and is reported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_rows_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--arch", "demo", "--device", "cpu", "--size", "32",
         "--steps", "1", "--batch", "2", "--chunk", "2,3", "--grad-ckpt", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["arch"] == "demo" and data["size"] == 32 and data["device"] == "cpu"
    rows = [(r["row"], r["batch"]) for r in data["rows"]]
    assert rows == [("train released", 1), ("train fast", 2), ("train fast + ckpt", 2),
                    ("eval released", 1), ("eval fast", 2), ("eval fast", 3)]
    for r in data["rows"]:
        assert "error" not in r, r
        assert r["rate"] > 0 and r["seconds"] > 0 and r["peak_gib"] > 0
    assert [r["grad_ckpt"] for r in data["rows"]] == [False, False, True, False, False, False]
    # the printed table has one line per row and the speed-up against the released row
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + len(rows)
    assert table[1].endswith("| 1.0x |")


def test_bench_baseline_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--baselines", "panet", "alpnet", "adnet", "universeg",
         "--no-sdfsmis", "--device", "cpu", "--size", "32", "--steps", "1", "--batch", "2", "--chunk", "3",
         "--universeg-width", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(r["row"], r["batch"]) for r in data["rows"]] == [
        (f"{m} {k}", b) for m in ("panet", "alpnet", "adnet", "universeg") for k, b in (("train", 2), ("eval", 3))]
    for r in data["rows"]:
        assert "error" not in r, r
        assert r["rate"] > 0 and r["peak_gib"] > 0
