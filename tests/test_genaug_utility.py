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


def test_a_sweep_run_in_parts_is_one_input(tmp_path):
    tt = {"synthetic_support": 2, "generator_ct": "a"}
    v = {"synthetic_support": _res(0.1, 0.2)}
    b1 = _write(tmp_path / "b1", {"0": (0.5, 0.5), "1": (0.6, 0.4)}, variants={"0": v, "1": v}, test_time=tt)
    b2 = _write(tmp_path / "b2", {"2": (0.7, 0.3)}, variants={"2": v}, test_time={**tt, "generator_ct": "b"})
    a1 = _write(tmp_path / "a1", {"0": (0.6, 0.4), "1": (0.5, 0.5)}, overrides=["genaug.ratio=0.25", "genaug.data=[x]"])
    a2 = _write(tmp_path / "a2", {"2": (0.8, 0.2)}, overrides=["genaug.ratio=0.25", "genaug.data=[y]"])

    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "tools" / "genaug_utility.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT)

    out = tmp_path / "out"
    r = run("--base", b1, "--base", b2, "--arm", f"episodes={a1},{a2}", "--out", out)
    assert r.returncode == 0, r.stderr
    table = json.loads((out / "utility.json").read_text())
    assert table["seeds"] == ["0", "1", "2"]
    assert table["rows"][1]["in"] == {"0": 60.0, "1": 50.0, "2": 80.0}
    assert len(table["arms"]["episodes"]["parts"]) == 2 and len(table["base"]) == 2
    # the same NAME twice is the same as NAME=DIR,DIR
    r = run("--base", b1, "--base", b2, "--arm", f"episodes={a1}", "--arm", f"episodes={a2}", "--out", out)
    assert r.returncode == 0 and json.loads((out / "utility.json").read_text())["rows"][1] == table["rows"][1]
    # a seed given by two parts is refused
    r = run("--base", b1, "--base", b1, "--out", tmp_path / "o1")
    assert r.returncode == 2 and "seed(s) 0, 1 already given" in r.stderr and not (tmp_path / "o1").exists()
    # a part on other data (support-copy differs) or with another recipe is refused
    d = json.loads((b2 / "seeds.json").read_text())
    d["support_copy"]["in_domain"]["mean"] = 0.1
    b3 = tmp_path / "b3"
    b3.mkdir()
    (b3 / "seeds.json").write_text(json.dumps(d))
    r = run("--base", b1, "--base", b3, "--out", tmp_path / "o2")
    assert r.returncode == 2 and "support-copy's Dice differs" in r.stderr
    a3 = _write(tmp_path / "a3", {"2": (0.8, 0.2)}, overrides=["genaug.ratio=0.5", "genaug.data=[y]"])
    r = run("--base", b1, "--arm", f"episodes={a1},{a3}", "--out", tmp_path / "o3")
    assert r.returncode == 2 and "overrides differ" in r.stderr and "genaug.ratio=0.5" in r.stderr


def test_a_card_mri_sweep_has_in_domain_columns_only(tmp_path):
    def write(path, seeds, overrides=(), dataset="cmr"):
        path.mkdir(parents=True)
        data = {"dataset": dataset, "splits": {"in_domain": "Card-MRI fold 0"}, "overrides": list(overrides),
                "init": "random", "test_time": {"synthetic_support": 2},
                "support_copy": {"in_domain": {"mean": 0.27}},
                "seeds": {k: {"in_domain": {"mean": v}, "variants": {"synthetic_support": {"in_domain": {"mean": v / 2}}}}
                          for k, v in seeds.items()}}
        (path / "seeds.json").write_text(json.dumps(data))
        return path

    base = write(tmp_path / "base", {"0": 0.5, "1": 0.4})
    arm = write(tmp_path / "arm", {"0": 0.6, "1": 0.3}, overrides=["genaug.ratio=0.25"])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "genaug_utility.py"), "--base", str(base), "--arm",
                        f"episodes={arm}", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    md = (out / "utility.md").read_text()
    assert md.startswith("# Utility of synthetic data (demo SD-FSMIS, Card-MRI fold 0)")
    line = next(ln for ln in md.splitlines() if ln.startswith("| SD-FSMIS + episodes"))
    assert "| 60.00 / – | 30.00 / – | 45.00 (30.00-60.00) | – | 1 of 2 / – |" in line
    assert "| support-copy | 27.00 / – |" in md and "in-domain (Card-MRI fold 0)" in md
    # an arm of the phantom sweep is not an arm of a Card-MRI base
    ph = write(tmp_path / "ph", {"0": 0.6, "1": 0.3}, overrides=["genaug.ratio=0.25"], dataset="phantom")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "genaug_utility.py"), "--base", str(base), "--arm",
                        f"episodes={ph}", "--out", str(tmp_path / "o2")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "phantom" in r.stderr and not (tmp_path / "o2").exists()
