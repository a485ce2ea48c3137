"""tools/genaug_utility.py on crafted seeds.json files: rows, medians and ranges, paired wins, the
seeds common to every input, and refusal of an arm trained with other settings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _res(i, c):
    return {"in_domain": {"mean": i, "per_class": {}}, "cross_domain": {"mean": c, "per_class": {}}}


def _write(path: Path, seeds: dict, overrides=(), variants=None, test_time=None):
    path.mkdir(parents=True)
    data = {"overrides": list(overrides), "init": "generator", "test_time": test_time or {},
            "support_copy": {**_res(0.6, 0.5), "variants": {"mask_support": {"cross_domain": {"mean": 0.4}}}},
            "seeds": {s: {**_res(*v), **({"variants": variants[s]} if variants else {})} for s, v in seeds.items()}}
    (path / "seeds.json").write_text(json.dumps(data))
    return path


def test_utility_table(tmp_path):
    variants = {s: {"synthetic_support": _res(0.1 * k, 0.2), "mask_support": {"cross_domain": {"mean": 0.3}}}
                for k, s in enumerate(["0", "1", "2"], 1)}
    base = _write(tmp_path / "base", {"0": (0.5, 0.5), "1": (0.6, 0.4), "2": (0.7, 0.3)}, variants=variants,
                  test_time={"synthetic_support": 2})
    arm = _write(tmp_path / "arm", {"0": (0.6, 0.4), "1": (0.5, 0.5), "2": (0.8, 0.2), "3": (0.9, 0.9)},
                 overrides=["genaug.ratio=0.25", "genaug.data=[x]"])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "genaug_utility.py"), "--base", str(base), "--arm",
                        f"episodes={arm}", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    table = json.loads((out / "utility.json").read_text())
    assert table["seeds"] == ["0", "1", "2"]  # seed 3 is not in the base
    names = [row["name"] for row in table["rows"]]
    assert names == ["SD-FSMIS", "SD-FSMIS + episodes", "SD-FSMIS + synthetic support (M = 2)",
                     "SD-FSMIS, supports generated from CT masks (no MR annotation)"]
    md = (out / "utility.md").read_text()
    arm_line = next(ln for ln in md.splitlines() if ln.startswith("| SD-FSMIS + episodes"))
    assert "| 60.00 (50.00-80.00) | 40.00 (20.00-50.00) | 2 of 3 / 1 of 3 |" in arm_line
    mask_line = next(ln for ln in md.splitlines() if "CT masks (no MR" in ln)
    assert "– / 30.00" in mask_line and "| – | 30.00 (30.00-30.00) | – / 0 of 3 |" in mask_line
    assert "support-copy of the CT masks | – / 40.00" in md and (out / "utility.png").is_file()
    # an arm trained with another recipe is refused
    other = _write(tmp_path / "other", {"0": (0.6, 0.4)}, overrides=["genaug.ratio=0.25", "train.lr=1"])
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "genaug_utility.py"), "--base", str(base), "--arm",
                        f"x={other}", "--out", str(tmp_path / "o2")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "train.lr=1" in r.stderr


def test_utility_refuses_an_input_folder_as_output(tmp_path):
    base = _write(tmp_path / "base", {"0": (0.5, 0.5)})
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "genaug_utility.py"), "--base", str(base), "--out",
                        str(base / "table")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "input folder" in r.stderr and not (base / "table").exists()
