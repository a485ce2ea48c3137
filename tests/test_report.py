"""tools/report.py: one comparison table from several results files; rows ranked only within one
protocol fingerprint, per-class std over folds, refusal of files that are not results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fsmis.data.datasets import open_dataset
from fsmis.data.phantom import make_phantom_dataset
from fsmis.evaluation.protocol import ProtocolConfig, evaluate
from fsmis.evaluation.report import build_report, fingerprint, markdown
from fsmis.evaluation.results import write_results
from fsmis.methods.base import Predictor
from fsmis.methods.support_copy import SupportCopy

ROOT = Path(__file__).resolve().parents[1]


class Empty(Predictor):
    name = "empty"

    def predict(self, support_images, support_masks, query_images):
        return np.zeros(query_images.shape, np.uint8)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = root / "ct"
    make_phantom_dataset(data, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=False, progress=False)
    ds = open_dataset(data)
    out = {}
    for name, pred, folds in (("copy01", SupportCopy(), [0, 1]), ("empty01", Empty(), [0, 1]),
                              ("copy0", SupportCopy(), [0])):
        res = evaluate(ds, pred, ProtocolConfig(fold_ids=folds, surface_metrics=False), progress=False)
        write_results(res, root / name)
        out[name] = root / name / "results.json"
    return out


def test_rows_are_ranked_within_one_protocol_only(results):
    rep = build_report([results["empty01"], results["copy01"], results["copy0"]])
    rows = {r["path"]: r for r in rep["rows"]}
    a, b, c = (rows[str(results[k])] for k in ("empty01", "copy01", "copy0"))
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]
    assert (b["rank"], a["rank"]) == (1, 2)  # support-copy above the empty predictor
    assert c["rank"] is None and c["protocol"] == "B"  # alone under its protocol: not ranked
    legend = {g["protocol"]: g for g in rep["protocols"]}
    assert "protocol.folds_evaluated" in legend["B"]["differs_from_A"]
    md = markdown(rep)
    assert "Not comparable with protocol A" in md and "folds_evaluated" in md
    # per-class std over the two folds
    res = json.loads(results["copy01"].read_text())
    cls = res["protocol"]["test_classes"][0]
    vals = [f["per_class"][cls] for f in res["folds"]]
    line = next(ln for ln in md.splitlines() if ln.startswith("| 1 |"))
    assert f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}" in line


def test_the_fingerprint_ignores_the_methods_normalisation_but_not_the_dataset(results):
    res = json.loads(results["copy01"].read_text())
    other = json.loads(json.dumps(res))
    other["protocol"]["normalization"] = "zscore" if res["protocol"]["normalization"] != "zscore" else "minmax"
    assert fingerprint(other) == fingerprint(res)
    other["dataset"]["n_cases"] = 99
    assert fingerprint(other) != fingerprint(res)
    other = json.loads(json.dumps(res))
    other["protocol"]["synthetic_support"] = 2
    assert fingerprint(other) != fingerprint(res)


def test_cli_writes_every_file_and_refuses_a_file_that_is_no_result(results, tmp_path):
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(results["copy01"]),
                        str(results["empty01"].parent), "--labels", "copy", "empty", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert all((out / n).is_file() for n in ("report.md", "report.csv", "report.json", "report.png"))
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [x["label"] for x in rows] == ["copy", "empty"] and rows[0]["rank"] == 1
    assert (out / "report.csv").read_text().splitlines()[1].startswith("1,copy,A,")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean_dice": 0.5}))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(bad), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "bad.json" in r.stderr and "not an evaluator results file" in r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_refuses_an_output_folder_that_is_an_input_or_foreign(results, tmp_path):
    inp = results["copy01"].parent
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(results["copy01"]), "--out", str(inp)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "input folder" in r.stderr and "Traceback" not in r.stderr
    assert (inp / "results.json").is_file() and not (inp / "report.md").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(results["copy01"]), "--out",
                        str(foreign)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "notes.txt" not in r.stderr and (foreign / "notes.txt").read_text() == "keep"
    # an earlier report is replaced as a whole
    out = tmp_path / "rep"
    for _ in range(2):
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(results["copy01"]), "--out", str(out)],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.json", "report.md", "report.png"]


def _aggregate(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "aggregate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_aggregate_averages_runs_of_one_protocol_and_one_dataset_only(results, tmp_path):
    res = json.loads(results["copy01"].read_text())
    out = tmp_path / "agg.json"
    r = _aggregate(results["copy01"], results["copy0"], "--out", out)
    assert r.returncode == 0, r.stderr  # the folds evaluated may differ
    agg = json.loads(out.read_text())
    means = [json.loads(results[k].read_text())["mean_dice"] for k in ("copy01", "copy0")]
    assert agg["mean_dice"]["mean"] == pytest.approx(np.mean(means))
    assert agg["dataset"]["name"] == res["dataset"]["name"] and len(agg["runs"]) == 2
    # the same protocol on another dataset (another modality, another number of cases) is refused
    for key, value in (("modality", "MR" if res["dataset"]["modality"] != "MR" else "CT"),
                       ("n_cases", res["dataset"]["n_cases"] + 1), ("name", "other")):
        other = json.loads(json.dumps(res))
        other["dataset"][key] = value
        path = tmp_path / f"other_{key}.json"
        path.write_text(json.dumps(other))
        r = _aggregate(results["copy01"], path, "--out", tmp_path / f"agg_{key}.json")
        assert r.returncode == 2 and f"dataset.{key}" in r.stderr and path.name in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / f"agg_{key}.json").exists()
    # and another protocol switch too
    other = json.loads(json.dumps(res))
    other["protocol"]["synthetic_support"] = 2
    path = tmp_path / "other_protocol.json"
    path.write_text(json.dumps(other))
    r = _aggregate(results["copy01"], path)
    assert r.returncode == 2 and "protocol.synthetic_support" in r.stderr, r.stderr
    # the output is never one of the inputs
    before = results["copy0"].read_text()
    r = _aggregate(results["copy01"], results["copy0"], "--out", results["copy0"])
    assert r.returncode == 2 and "one of the results files" in r.stderr and results["copy0"].read_text() == before
