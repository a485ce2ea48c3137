"""tools/compare_datasets.py and fsmis.data.prepare.compare: two prepared folders, case by case."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _volumes import read_ijk, relayout, write_raw_nifti
from fsmis.data import prepare as prep
from fsmis.data.prepare.compare import compare_datasets, format_comparison
from test_prepare import make_chaos_patient, make_cmr_raw

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    make_chaos_patient(raw, 1)
    make_chaos_patient(raw, 2)
    return prep.prepare_dataset("chaos", raw, tmp_path_factory.mktemp("a") / "CHAOST2", progress=False,
                                supervoxels=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _inner(root):
    return root / "chaos_MR_T2_normalized"


def test_identical_folders(prepared, tmp_path):
    b = _copy(prepared, tmp_path / "B")
    res = compare_datasets(prepared, b)
    assert [r["case"] for r in res["cases"]] == ["1", "2"]
    assert res["classes"] == ["liver", "right_kidney", "left_kidney", "spleen"]
    for r in res["cases"]:
        assert r["grid"] == "same" and r["shape_a"] == r["shape_b"] == [5, 256, 256]
        assert r["correlation"] == pytest.approx(1.0)
        assert all(d == 1.0 for d in r["dice"].values())


def test_archive_stored_otherwise_is_resampled_through_the_affines(prepared, tmp_path):
    """B as a published archive might be: no dataset.json, other voxel order (flipped rows,
    transposed in-plane), other intensity scale, float labels. Same data: Dice 1, correlation 1."""
    b = tmp_path / "B" / "chaos_MR_T2_normalized"
    b.mkdir(parents=True)
    for cid in ("1", "2"):
        for kind in ("image", "label"):
            data, aff = read_ijk(_inner(prepared) / f"{kind}_{cid}.nii.gz")
            data, aff = relayout(data, aff, perm=(1, 0, 2), flips=(True, False, False))
            if kind == "image":
                data = data * 3.0 + 7.0
            write_raw_nifti(b / f"{kind}_{cid}.nii.gz", data.astype(np.float64), aff)
    res = compare_datasets(prepared, b.parent)
    for r in res["cases"]:
        assert r["grid"] == "resampled B onto A" and r["orientation_a"] == "LAS" and r["orientation_b"] == "PLS"
        assert r["overlap"] == pytest.approx(1.0)
        assert r["correlation"] == pytest.approx(1.0, abs=1e-9)
        assert all(d == pytest.approx(1.0) for d in r["dice"].values())


def test_differences_are_measured_and_fail_the_thresholds(prepared, tmp_path):
    b = _copy(prepared, tmp_path / "B")
    lab_path = _inner(b) / "label_2.nii.gz"
    data, aff = read_ijk(lab_path)
    data = data.copy()
    data[data == 1] = 0  # liver lost in case 2
    nib.save(nib.Nifti1Image(data, aff), str(lab_path))
    (_inner(b) / "image_1.nii.gz").unlink()
    (_inner(b) / "label_1.nii.gz").unlink()
    res = compare_datasets(prepared, b)
    assert res["only_in_a"] == ["1"] and [r["case"] for r in res["cases"]] == ["2"]
    assert res["cases"][0]["dice"]["liver"] == 0.0 and res["cases"][0]["dice"]["spleen"] == 1.0
    text = format_comparison(res)
    assert "only in A: 1" in text and "0.0000" in text
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "tools/compare_datasets.py"), str(prepared), str(b),
                        "--min-dice", "0.9", "--json", str(tmp_path / "cmp.json"), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "case 2: liver Dice 0.0000 < 0.9" in r.stderr
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["failures"] and saved["cases"][0]["case"] == "2"
    r = subprocess.run([sys.executable, str(REPO / "tools/compare_datasets.py"), str(prepared), str(prepared),
                        "--min-dice", "0.99", "--min-corr", "0.999", "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


def test_classes_are_matched_by_name_not_id(tmp_path):
    raw = make_cmr_raw(tmp_path / "raw", patients=(1,), unlabelled=())
    a = prep.prepare_dataset("cmr", raw, tmp_path / "CMR", progress=False, supervoxels=False)
    b = tmp_path / "B"
    b.mkdir()
    shutil.copy(a / "cmr_MR_normalized" / "image_1.nii.gz", b / "image_1.nii.gz")
    data, aff = read_ijk(a / "cmr_MR_normalized" / "label_1.nii.gz")
    mapped = np.select([data == 200, data == 500, data == 600], [1, 2, 3], 0).astype(np.int16)
    write_raw_nifti(b / "label_1.nii.gz", mapped, aff)
    (b / "dataset.json").write_text(json.dumps({"name": "cmr123", "labels": {"LV-MYO": 1, "LV-BP": 2, "RV": 3}}))
    res = compare_datasets(a, b)
    assert res["cases"][0]["dice"] == {"LV-MYO": 1.0, "LV-BP": 1.0, "RV": 1.0}


def test_unreadable_folder_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools/compare_datasets.py"), str(tmp_path / "nope"),
                        str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 2 and "nope" in r.stderr


def test_a_257_grid_archive_compares_through_world_coordinates(prepared, tmp_path):
    """The original SABS notebook wrote 257 x 257; such an archive still compares (resampled)."""
    b = tmp_path / "B" / "chaos_MR_T2_normalized"
    b.mkdir(parents=True)
    for cid in ("1", "2"):
        img, aff = read_ijk(_inner(prepared) / f"image_{cid}.nii.gz")
        lab, _ = read_ijk(_inner(prepared) / f"label_{cid}.nii.gz")
        zyx = lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0)))  # noqa: E731
        img2, lab2, aff2 = prep.resample_to(zyx(img), zyx(lab).astype(np.int32), aff, (None, None, None),
                                            (None, 257, 257))
        write_raw_nifti(b / f"image_{cid}.nii.gz", np.transpose(img2, (2, 1, 0)), aff2)
        write_raw_nifti(b / f"label_{cid}.nii.gz", np.transpose(lab2, (2, 1, 0)).astype(np.float64), aff2)
    res = compare_datasets(prepared, b.parent)
    for r in res["cases"]:
        assert r["shape_b"] == [5, 257, 257] and r["grid"] == "resampled B onto A"
        assert r["correlation"] > 0.98
        assert all(d > 0.95 for d in r["dice"].values()), r["dice"]
