"""The filters of a synthetic folder (fsmis/genaug/filters.py, tools/filter_synthetic.py) on crafted
inputs: a slice that disagrees with its mask is removed, an exact copy of a real slice is removed,
erosion shrinks every region by one pixel, and the output is a folder training can use."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fsmis.data.datasets import open_dataset
from fsmis.data.phantom import make_phantom_dataset
from fsmis.genaug import filters as Fl

from _cli import clean_error, run
from test_genaug_episodes import write_synthetic

SHAPE = (10, 48, 48)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    real = root / "ct"
    make_phantom_dataset(real, modality="ct", n_cases=5, seed=3, shape=SHAPE, supervoxels=True, progress=False)
    return {"root": root, "real": real}


def test_erosion_shrinks_every_region_by_one_pixel():
    vol = np.zeros((2, 12, 12), np.int16)
    vol[0, 2:8, 2:6] = 3  # two regions side by side
    vol[0, 2:8, 6:10] = 5
    vol[1, 0:4, 0:4] = 7  # touching the image border
    out = Fl.erode_labels(vol, 1)
    exp = np.zeros_like(vol)
    exp[0, 3:7, 3:5] = 3
    exp[0, 3:7, 7:9] = 5
    exp[1, 1:3, 1:3] = 7
    assert np.array_equal(out, exp)
    assert out.dtype == vol.dtype
    assert np.array_equal(Fl.erode_labels(vol, 2), Fl.erode_labels(out, 1))
    assert np.array_equal(Fl.erode_labels(vol, 0), vol)


def test_memorisation_removes_exact_copies_and_keeps_unrelated_slices(env, tmp_path):
    real = env["real"]
    syn = write_synthetic(tmp_path / "syn", real, {"101": "1", "102": "2"}, noise=0.0)
    # case 102: an unrelated image (smooth noise) on the source's mask
    from scipy.ndimage import gaussian_filter

    im = nib.load(syn / "image_102.nii.gz")
    noise = gaussian_filter(np.random.default_rng(7).normal(size=im.shape), 2.0).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, im.affine), syn / "image_102.nii.gz")
    rec = Fl.filter_synthetic(syn, real, tmp_path / "out", no_memorised=True)
    flagged = set(rec["memorisation"]["flagged"])
    checked = set(rec["memorisation"]["nearest_ssim"])
    assert {n for n in checked if n.startswith("101:")} <= flagged  # every checked slice of the copy
    assert len([n for n in flagged if n.startswith("101:")]) >= SHAPE[0] - 2
    assert not [n for n in flagged if n.startswith("102:")]
    out = open_dataset(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    c = rec["counts"]
    assert c["removed_by_memorisation"] == len(flagged) and c["removed_by_agreement"] == 0
    assert meta["synthetic"]["filter"]["counts"] == c
    assert json.loads((tmp_path / "out" / Fl.FILTER_NAME).read_text())["counts"] == c
    if "101" in out.case_ids:  # kept only for slices the check skipped (flat)
        assert set(out.excluded_slices["101"]) == {int(n.split(":")[1]) for n in flagged if n.startswith("101:")}
    else:
        assert "101" in c["cases_dropped"]
    assert "102" in out.case_ids and "102" not in out.excluded_slices


def test_memorisation_flags_come_from_a_current_quality_json(env, tmp_path, monkeypatch):
    """The folder's quality.json memorisation section stands for a fresh computation (same flags),
    and is ignored when it belongs to another real folder or is older than the images."""
    import os

    from fsmis.genaug import quality as Q

    real = env["real"]
    syn = write_synthetic(tmp_path / "syn", real, {"101": "1", "102": "2"}, noise=0.0)
    from scipy.ndimage import gaussian_filter

    im = nib.load(syn / "image_102.nii.gz")  # case 102 unrelated to its source: kept
    noise = gaussian_filter(np.random.default_rng(7).normal(size=im.shape), 2.0).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, im.affine), syn / "image_102.nii.gz")
    fresh = Fl.filter_synthetic(syn, real, tmp_path / "a", no_memorised=True)
    assert fresh["memorisation"]["from"] == "computed"
    mem = Q.memorisation(Q.open_synthetic(real, syn))
    q = {"real": str(real.resolve()), "definitions": Q.definitions([]), "memorisation": mem}
    (syn / "quality.json").write_text(json.dumps(q))

    def refuse(*a, **k):
        raise AssertionError("memorisation recomputed although quality.json holds it")

    monkeypatch.setattr(Q, "memorisation", refuse)
    saved = Fl.filter_synthetic(syn, real, tmp_path / "b", no_memorised=True)
    assert saved["memorisation"]["from"] == "quality.json"
    assert saved["memorisation"]["flagged"] == fresh["memorisation"]["flagged"]
    assert saved["counts"] == fresh["counts"]
    monkeypatch.undo()
    # another real folder: recomputed
    (syn / "quality.json").write_text(json.dumps({**q, "real": str(tmp_path)}))
    assert Fl.filter_synthetic(syn, real, tmp_path / "c", no_memorised=True)["memorisation"]["from"] == "computed"
    # older than an image of the folder: recomputed
    (syn / "quality.json").write_text(json.dumps(q))
    t = (syn / "quality.json").stat().st_mtime
    os.utime(syn / "image_101.nii.gz", (t + 10, t + 10))
    assert Fl.filter_synthetic(syn, real, tmp_path / "d", no_memorised=True)["memorisation"]["from"] == "computed"


def test_agreement_removes_the_slice_that_disagrees(env, tmp_path, monkeypatch):
    """The agreement filter's bookkeeping with a stand-in segmenter: support-copy returns the source
    slice's mask, so a synthetic slice whose label was moved away from its source scores low and
    the untouched slices score 1 (a trained run is what the tool uses; here its slices are crafted)."""
    from fsmis.methods import base

    real = env["real"]
    syn = write_synthetic(tmp_path / "syn", real, {"101": "1", "102": "2"}, noise=0.1)
    lab = nib.load(syn / "label_101.nii.gz")
    arr = np.asarray(lab.dataobj).copy()  # [X, Y, Z] as stored
    ds = open_dataset(real)
    z_moved = int(np.argmax((ds.load_case("1").label > 0).reshape(SHAPE[0], -1).sum(1)))
    # which stored k is the loaded slice z_moved: the phantom is stored as (x, y, z) of the loaded (z, y, x)
    assert np.array_equal(np.transpose(np.asarray(nib.load(real / "label_1.nii.gz").dataobj), (2, 1, 0)),
                          ds.load_case("1").label)
    arr[..., z_moved] = np.roll(arr[..., z_moved], 20, axis=0)
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), syn / "label_101.nii.gz")
    monkeypatch.setattr(base, "build_predictor", lambda *a, **k: _support_copy())
    rec = Fl.filter_synthetic(syn, real, tmp_path / "out", min_dice=0.8, checkpoint=tmp_path / "any-run")
    assert rec["agreement"]["removed_slices"] == 1
    assert rec["counts"]["removed_by_agreement"] == 1
    assert open_dataset(tmp_path / "out").excluded_slices == {"101": [z_moved]}
    judged = {(r["case"], r["z"]): r["dice"] for r in rec["agreement"]["per_slice"]}
    assert judged[("101", z_moved)] < 0.8 and all(d == 1.0 for k, d in judged.items() if k != ("101", z_moved))
    assert rec["agreement"]["judged_slices"] + rec["agreement"]["not_judged_slices"] == 2 * SHAPE[0]


def _support_copy():
    from fsmis.methods.support_copy import SupportCopy

    return SupportCopy()


def test_erosion_output_and_refusals(env, tmp_path):
    real = env["real"]
    syn = write_synthetic(tmp_path / "syn", real, {"101": "1"}, noise=0.1)
    rec = Fl.filter_synthetic(syn, real, tmp_path / "out", erode=1)
    a, b = open_dataset(syn).load_case("101", supervoxels=True), open_dataset(tmp_path / "out").load_case(
        "101", supervoxels=True)
    assert np.array_equal(b.label, Fl.erode_labels(a.label, 1)) and np.array_equal(b.image, a.image)
    assert np.array_equal(b.supervoxels, Fl.erode_labels(a.supervoxels, 1))
    assert rec["counts"]["eroded_label_pixels"] == int(((a.label != 0) & (b.label == 0)).sum()) > 0
    with pytest.raises(Fl.FilterError, match="no filter chosen"):
        Fl.filter_synthetic(syn, real, tmp_path / "o2")
    with pytest.raises(Fl.FilterError, match="needs a trained segmenter"):
        Fl.filter_synthetic(syn, real, tmp_path / "o2", min_dice=0.5)
    with pytest.raises(ValueError, match="not empty"):
        Fl.filter_synthetic(syn, real, tmp_path / "out", erode=1)
    with pytest.raises(ValueError, match="inside"):
        Fl.filter_synthetic(syn, real, syn / "x", erode=1)


def test_cli(env, tmp_path):
    real = env["real"]
    syn = write_synthetic(tmp_path / "syn", real, {"101": "1", "102": "3"}, noise=0.2)
    p = run(["tools/filter_synthetic.py", "--data", syn, "--real", real, "--out", tmp_path / "out", "--erode", "1",
             "--quiet"])
    assert p.returncode == 0, p.stderr[-1500:]
    assert "kept 2 of 2 cases" in p.stdout
    p = run(["tools/filter_synthetic.py", "--data", syn, "--real", real, "--out", tmp_path / "o2", "--quiet"])
    clean_error(p, "no filter chosen")
    assert not (tmp_path / "o2").exists()
    p = run(["tools/filter_synthetic.py", "--data", syn, "--real", real, "--out", tmp_path / "o3", "--min-dice", "2"])
    assert p.returncode == 2 and "between 0 and 1" in p.stderr
    # --default-filters: memorisation, no agreement (so no segmenter run needed) unless --min-dice is given
    p = run(["tools/filter_synthetic.py", "--data", syn, "--real", real, "--out", tmp_path / "o4", "--default-filters",
             "--quiet"])
    assert p.returncode == 0, p.stderr[-1500:]
    settings = json.loads((tmp_path / "o4" / "filter.json").read_text())["settings"]
    assert settings["min_dice"] is None and settings["no_memorised"] is True
    p = run(["tools/filter_synthetic.py", "--data", syn, "--real", real, "--out", tmp_path / "o5", "--default-filters",
             "--min-dice", "0.3"])
    clean_error(p, "--checkpoint")  # agreement asked for: it needs the segmenter
    assert not (tmp_path / "o5").exists()
    shutil.rmtree(tmp_path / "out")


def test_a_training_on_a_filtered_folder_reports_the_filter(env, tmp_path):
    from fsmis.config import load_config
    from fsmis.engine.trainer import Trainer

    from test_genaug_episodes import _config

    real = env["real"]
    syn = write_synthetic(tmp_path / "syn", real, {"101": "1", "102": "2"}, noise=0.1)
    rec = Fl.filter_synthetic(syn, real, tmp_path / "filtered", erode=1)
    cfg = load_config(_config(tmp_path, real, genaug={"data": [str(tmp_path / "filtered")], "ratio": 0.5},
                              train={"max_steps": 1, "ckpt_every": 1}))
    summary = Trainer(cfg, tmp_path / "run", "cpu", progress=False).setup().fit()
    folder = summary["genaug"]["folders"][0]
    assert folder["filter"]["counts"] == rec["counts"] and folder["filter"]["erode"] == 1
    assert summary["episodes"] == {"real": 2, "synthetic": 2}
