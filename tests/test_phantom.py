"""The embedded default data: procedural abdominal phantoms (fsmis.data.phantom, tools/make_phantom.py)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fsmis.data.datasets import BENCHMARKS, open_dataset
from fsmis.data.phantom import (
    CT_LABELS,
    MR_LABELS,
    TEST_LABELS,
    is_phantom_folder,
    make_phantom_case,
    make_phantom_dataset,
    phantom_is_current,
)

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 64, 64)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("ct") / "ct", "ct", n_cases=3, seed=3, shape=SHAPE,
                                progress=False, supervoxels=False)


@pytest.fixture(scope="module")
def mr_dir(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("mr") / "mr", "mr", n_cases=3, seed=3, shape=SHAPE,
                                progress=False, supervoxels=False)


# -- per-case generator --------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_case_is_deterministic_and_seed_dependent(modality):
    a_img, a_lab = make_phantom_case(np.random.default_rng(5), modality, SHAPE, (7.0, 5.0, 5.0))
    b_img, b_lab = make_phantom_case(np.random.default_rng(5), modality, SHAPE, (7.0, 5.0, 5.0))
    c_img, c_lab = make_phantom_case(np.random.default_rng(6), modality, SHAPE, (7.0, 5.0, 5.0))
    assert a_img.dtype == np.float32 and a_lab.dtype == np.int16
    assert a_img.shape == a_lab.shape == SHAPE
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab)
    assert not np.array_equal(a_img, c_img)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_phantom_case(np.random.default_rng(0), "pet", SHAPE)
    with pytest.raises(ValueError):
        make_phantom_case(np.random.default_rng(0), "ct", (12, 64))


# -- datasets -----------------------------------------------------------------------------------
def test_same_seed_gives_identical_files(ct_dir, tmp_path):
    again = make_phantom_dataset(tmp_path / "again", "ct", n_cases=3, seed=3, shape=SHAPE,
                                 progress=False, supervoxels=False)
    assert _digest(again) == _digest(ct_dir)


def test_different_seeds_differ(ct_dir, tmp_path):
    other = make_phantom_dataset(tmp_path / "other", "ct", n_cases=3, seed=4, shape=SHAPE,
                                 progress=False, supervoxels=False)
    a = np.asarray(nib.load(str(ct_dir / "label_0.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(other / "label_0.nii.gz")).dataobj)
    assert not np.array_equal(a, b)


def test_ct_files_and_label_ids(ct_dir):
    names = sorted(p.name for p in ct_dir.iterdir())
    assert names == ["dataset.json"] + [f"image_{i}.nii.gz" for i in range(3)] + [f"label_{i}.nii.gz" for i in range(3)]
    sabs = BENCHMARKS["SABS"].labels
    for name, cid in CT_LABELS.items():
        assert sabs[name] == cid  # the SABS ids, by name
    allowed = {0, *CT_LABELS.values()}
    for i in range(3):
        lab = np.asarray(nib.load(str(ct_dir / f"label_{i}.nii.gz")).dataobj)
        assert np.issubdtype(lab.dtype, np.integer)
        values = set(np.unique(lab).tolist())
        assert values <= allowed
        assert {1, 2, 3, 6} <= values  # spleen, RK, LK, liver


def test_mr_files_and_label_ids(mr_dir):
    chaos = BENCHMARKS["CHAOST2"].labels
    assert MR_LABELS == chaos
    for i in (1, 2, 3):  # MR ids start at 1, as CHAOS
        lab = np.asarray(nib.load(str(mr_dir / f"label_{i}.nii.gz")).dataobj)
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}
    assert not (mr_dir / "image_0.nii.gz").exists()


@pytest.mark.parametrize("which", ["ct", "mr"])
def test_open_dataset_and_organs_present(which, ct_dir, mr_dir):
    folder = ct_dir if which == "ct" else mr_dir
    ds = open_dataset(folder)
    assert ds.case_ids == (["0", "1", "2"] if which == "ct" else ["1", "2", "3"])
    assert sorted(ds.test_classes) == sorted(TEST_LABELS)
    assert ds.modality == which.upper()
    for cid in ds.case_ids:
        case = ds.load_case(cid)
        assert case.image.shape == case.label.shape == SHAPE
        assert np.all(np.isfinite(case.image))
        if which == "ct":
            assert case.image.min() >= 0.0 and case.image.max() <= 255.0
            assert case.image.max() > 200.0  # rescaled to the full [0, 255] range
        else:
            assert case.image.min() >= 0.0
        for organ in TEST_LABELS:
            assert len(ds.class_slices(cid, organ)) >= 2, (cid, organ)
        # organs never overlap: one class per voxel, and only known ids
        assert set(np.unique(case.label).tolist()) <= {0, *ds.classes.values()}


def test_geometry_lps_and_spacing(ct_dir, mr_dir):
    for folder, cid in ((ct_dir, "0"), (mr_dir, "1")):
        img = nib.load(str(folder / f"image_{cid}.nii.gz"))
        lab = nib.load(str(folder / f"label_{cid}.nii.gz"))
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        np.testing.assert_allclose(img.affine, lab.affine)
        assert img.shape == (SHAPE[2], SHAPE[1], SHAPE[0])  # nibabel (i, j, k) = (X, Y, Z)
        assert np.asarray(img.dataobj).dtype == np.float32
    # field of view kept when the grid is smaller: MR 1.25 mm * 256 / 64 = 5 mm; 7.7 * 40 / 12
    zooms = nib.load(str(mr_dir / "image_1.nii.gz")).header.get_zooms()
    np.testing.assert_allclose(zooms, (5.0, 5.0, 7.7 * 40 / 12), rtol=1e-5)
    ct_zooms = nib.load(str(ct_dir / "image_0.nii.gz")).header.get_zooms()
    assert 1.4 * 4 <= ct_zooms[0] <= 1.6 * 4 and ct_zooms[0] == ct_zooms[1]


def test_dataset_json(ct_dir, mr_dir):
    info = json.loads((ct_dir / "dataset.json").read_text())
    assert info["name"] == "phantom_ct" and info["modality"] == "CT"
    assert info["labels"] == CT_LABELS
    assert info["test_labels"] == ["liver", "spleen", "left_kidney", "right_kidney"]
    assert info["supervoxels"].startswith("supervoxels_")
    gen = dict(info["generator"])
    assert len(gen.pop("code")) == 12  # digest of the generator's source
    assert gen == {"seed": 3, "modality": "ct", "n_cases": 3, "shape": list(SHAPE), "version": 1}
    info = json.loads((mr_dir / "dataset.json").read_text())
    assert info["name"] == "phantom_mr" and info["modality"] == "MR" and info["labels"] == MR_LABELS
    assert is_phantom_folder(ct_dir) and is_phantom_folder(mr_dir)


def test_full_size_supervoxel_folder_name(tmp_path):
    out = make_phantom_dataset(tmp_path / "one", "mr", n_cases=1, seed=0, shape=(3, 256, 256),
                               progress=False, supervoxels=False)
    assert json.loads((out / "dataset.json").read_text())["supervoxels"] == "supervoxels_5000"


# -- folder safety --------------------------------------------------------------------------------
def test_refuses_foreign_folder_unless_overwrite(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_phantom_dataset(foreign, "ct", n_cases=1, shape=SHAPE, progress=False, supervoxels=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    make_phantom_dataset(foreign, "ct", n_cases=1, shape=SHAPE, progress=False, supervoxels=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert (foreign / "image_0.nii.gz").is_file()


def test_previous_phantom_is_replaced_or_reused(tmp_path):
    out = tmp_path / "ph"
    make_phantom_dataset(out, "ct", n_cases=3, seed=1, shape=SHAPE, progress=False, supervoxels=False)
    assert phantom_is_current(out, "ct", 3, 1, SHAPE, supervoxels=False)
    assert not phantom_is_current(out, "ct", 3, 2, SHAPE, supervoxels=False)
    before = (out / "image_0.nii.gz").stat().st_mtime_ns
    make_phantom_dataset(out, "ct", n_cases=3, seed=1, shape=SHAPE, progress=False, supervoxels=False)
    assert (out / "image_0.nii.gz").stat().st_mtime_ns == before  # identical request: reused
    make_phantom_dataset(out, "mr", n_cases=2, seed=1, shape=SHAPE, progress=False, supervoxels=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["dataset.json", "image_1.nii.gz", "image_2.nii.gz", "label_1.nii.gz", "label_2.nii.gz"]


def test_supervoxels(tmp_path):
    pytest.importorskip("fsmis.data.supervoxels")
    out = make_phantom_dataset(tmp_path / "sv", "ct", n_cases=1, seed=0, shape=(8, 48, 48), progress=False,
                               supervoxels=True, supervoxel_min_size=100)
    info = json.loads((out / "dataset.json").read_text())
    assert info["supervoxels"] == "supervoxels_100"
    assert (out / "supervoxels_100" / "superpix-MIDDLE_0.nii.gz").is_file()
    ds = open_dataset(out)
    case = ds.load_case("0", supervoxels=True)
    assert case.supervoxels.shape == case.image.shape and case.supervoxels.max() >= 1
    assert phantom_is_current(out, "ct", 1, 0, (8, 48, 48), supervoxels=True, supervoxel_min_size=100)


# -- CLI --------------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "tools/make_phantom.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_help():
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--out", "--modality", "--cases", "--seed", "--slices", "--no-supervoxels", "--overwrite"):
        assert opt in r.stdout


def test_cli_tiny_generation(tmp_path):
    out = tmp_path / "cli"
    r = _cli("--out", str(out), "--modality", "mr", "--cases", "2", "--seed", "7", "--slices", "10",
             "--size", "48", "--no-supervoxels", "--quiet")
    assert r.returncode == 0, r.stderr
    assert str(out.resolve()) in r.stdout
    assert (out / "image_1.nii.gz").is_file() and (out / "label_2.nii.gz").is_file()
    info = json.loads((out / "dataset.json").read_text())
    gen = {k: v for k, v in info["generator"].items() if k != "code"}
    assert gen == {"seed": 7, "modality": "mr", "n_cases": 2, "shape": [10, 48, 48], "version": 1}
    assert open_dataset(out).load_case("2").image.shape == (10, 48, 48)
    again = _cli("--out", str(out), "--modality", "mr", "--cases", "2", "--seed", "7", "--slices", "10",
                 "--size", "48", "--no-supervoxels", "--quiet")
    assert again.returncode == 0 and "reused" in again.stdout


def test_cli_refuses_foreign_folder(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    r = _cli("--out", str(tmp_path), "--cases", "1", "--slices", "6", "--size", "32", "--no-supervoxels", "--quiet")
    assert r.returncode == 2
    assert "not a phantom" in r.stderr
