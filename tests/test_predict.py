"""fsmis.inference.predict_scan and tools/predict.py with the support-copy predictor.

Support-copy gives every query slice the mask of the support slice it is paired with, so the
expected output is known by hand:

- support label: class 5 on slices 1..6 of 8, every slice's mask different (C_s = 6);
  support slices = class slices at positions int(pcts[i] * 6) with
  pcts = [1/6, 1/2, 1/6 + 2*(1 - 1/3)/2] -> positions 1, 3, 5 -> stored slices 2, 4, 6;
- query slices (all 8 unless --query-slices) split at floor(linspace(0, 8, 4)) = [0, 2, 5, 8]:
  slices 0-1 get mask 2, slices 2-4 mask 4, slices 5-7 mask 6.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _volumes import (affine_from_codes, read_ijk, read_zyx, relayout_zyx, write_nifti, zyx_to_ijk)
from fsmis.data.nifti import DataError
from fsmis.inference import predict_scan
from fsmis.methods.base import build_predictor

REPO = Path(__file__).resolve().parents[1]
Z, Y, X = 8, 12, 14
LABEL = 5
RAS = affine_from_codes("RAS", (1.0, 1.2, 3.0), origin=(-7.0, -6.0, 20.0))


def _support_arrays():
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, (Z, Y, X)).astype(np.float32)
    label = np.zeros((Z, Y, X), np.int16)
    for s in range(1, 7):
        label[s, 1:1 + s, 2:4] = LABEL  # grows with s
        label[s, 10, s + 3] = LABEL  # moves with s
    label[0, 5:7, 5:7] = 7
    label[7, 5:7, 5:7] = 7
    label[3, 8, 8:12] = 7
    return image, label


def _mask(label, s):
    return label[s] == LABEL


def _expected(label, pairs, shape=(Z, Y, X), value=LABEL):
    out = np.zeros(shape, np.int32)
    for qz, sz in pairs.items():
        out[qz] = _mask(label, sz) * value
    return out


FULL_PAIRS = {0: 2, 1: 2, 2: 4, 3: 4, 4: 4, 5: 6, 6: 6, 7: 6}


@pytest.fixture
def support(tmp_path):
    image, label = _support_arrays()
    ipath = write_nifti(tmp_path / "sup_image.nii.gz", image, RAS, dtype=np.float32)
    lpath = write_nifti(tmp_path / "sup_label.nii.gz", label, RAS, dtype=np.int16)
    return image, label, ipath, lpath


@pytest.fixture(scope="module")
def predictor():
    return build_predictor("support-copy")


def test_support_slice_choice_by_hand():
    """The hand computation the expected masks rely on (published pcts form)."""
    n = 3
    pcts = [1 / (2 * n) + i * (1 - 1 / n) / (n - 1) for i in range(n)]
    assert [int(p * 6) for p in pcts] == [1, 3, 5]
    assert np.floor(np.linspace(0, 8, 4)).astype(int).tolist() == [0, 2, 5, 8]


def test_query_is_support_follows_ep1_pairing(tmp_path, support, predictor):
    image, label, ipath, lpath = support
    out = tmp_path / "pred.nii.gz"
    res = predict_scan(predictor, ipath, lpath, LABEL, ipath, out)
    assert res.support_slices == [2, 4, 6]
    assert res.query_slices == list(range(Z))
    expected = _expected(label, FULL_PAIRS)
    np.testing.assert_array_equal(res.mask_zyx, expected)
    # on the class slices themselves
    for z in range(1, 7):
        np.testing.assert_array_equal(res.mask_zyx[z] > 0, _mask(label, FULL_PAIRS[z]))
    data, aff = read_ijk(out)
    np.testing.assert_array_equal(data, zyx_to_ijk(expected))
    np.testing.assert_allclose(aff, RAS, atol=1e-5)
    assert res.out_path == out


def test_out_value_and_no_output_file(tmp_path, support, predictor):
    image, label, ipath, lpath = support
    res = predict_scan(predictor, ipath, lpath, LABEL, ipath, None, out_value=1)
    assert res.out_path is None
    np.testing.assert_array_equal(res.mask_zyx, _expected(label, FULL_PAIRS, value=1))
    assert not list(tmp_path.glob("*pred*"))


@pytest.mark.parametrize("perm,flips", [
    ((0, 1, 2), (True, True, False)),  # LPS
    ((0, 1, 2), (False, False, True)),  # RAI: slice order reversed
    ((1, 0, 2), (True, True, False)),  # PLS: in-plane transpose + flips
])
def test_query_in_another_layout_is_written_on_its_own_grid(tmp_path, support, predictor, perm, flips):
    image, label, ipath, lpath = support
    ref = predict_scan(predictor, ipath, lpath, LABEL, ipath, tmp_path / "ras_pred.nii.gz")
    q_img, q_aff = relayout_zyx(image, RAS, perm, flips)
    qpath = write_nifti(tmp_path / "query_other.nii.gz", q_img, q_aff, dtype=np.float32)
    out = tmp_path / "other_pred.nii.gz"
    res = predict_scan(predictor, ipath, lpath, LABEL, qpath, out)
    data, aff = read_ijk(out)
    assert data.shape == zyx_to_ijk(q_img).shape
    np.testing.assert_allclose(aff, q_aff, atol=1e-5)
    expected_stored, _ = relayout_zyx(ref.mask_zyx, RAS, perm, flips)
    np.testing.assert_array_equal(data, zyx_to_ijk(expected_stored))
    # the returned mask lies on the query's loaded grid (the support's layout)
    np.testing.assert_array_equal(res.mask_zyx, ref.mask_zyx)


def _disk(shape_yx, spacing, radius_mm):
    h, w = shape_yx
    yy = (np.arange(h) - (h - 1) / 2) * spacing
    xx = (np.arange(w) - (w - 1) / 2) * spacing
    return (yy[:, None] ** 2 + xx[None, :] ** 2) <= radius_mm ** 2


def _dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _grid_case(tmp_path, name, n, sp, nz, radius=14.0, codes="RAS", seed=1):
    """A centred disk of ``radius`` mm on ``nz`` slices of an n x n grid at ``sp`` mm."""
    aff = affine_from_codes("RAS", (sp, sp, 4.0), origin=(-(n - 1) / 2 * sp, -(n - 1) / 2 * sp, 0.0))
    disk = _disk((n, n), sp, radius)
    rng = np.random.default_rng(seed)
    image = (rng.normal(0, 1, (nz, n, n)) + 10 * disk).astype(np.float32)
    label = np.broadcast_to(disk, (nz, n, n)).astype(np.int16) * 3
    if codes == "LPS":
        image, aff2 = relayout_zyx(image, aff, (0, 1, 2), (True, True, False))
        label, _ = relayout_zyx(label, aff, (0, 1, 2), (True, True, False))
        aff = aff2
    ipath = write_nifti(tmp_path / f"{name}_image.nii.gz", image, aff)
    lpath = write_nifti(tmp_path / f"{name}_label.nii.gz", label, aff, dtype=np.int16)
    return ipath, lpath, label, aff


@pytest.mark.parametrize("q_n,q_sp,codes", [
    (64, 1.0, "RAS"),  # same field of view, finer grid
    (64, 1.0, "LPS"),
    (80, 1.0, "RAS"),  # larger field: resampled to 40 x 40, centre-cropped to 32 x 32
    (48, 1.0, "RAS"),  # smaller field: resampled to 24 x 24, padded to 32 x 32
    (16, 4.0, "RAS"),  # coarser grid
])
def test_query_with_other_size_and_spacing(tmp_path, predictor, q_n, q_sp, codes):
    s_img, s_lab, _, _ = _grid_case(tmp_path, "sup", 32, 2.0, 6)
    q_img, q_lab_path, q_label, q_aff = _grid_case(tmp_path, "qry", q_n, q_sp, 5, codes=codes, seed=2)
    out = tmp_path / "pred.nii.gz"
    res = predict_scan(predictor, s_img, s_lab, 3, q_img, out)
    data, aff = read_ijk(out)
    assert data.shape == (q_n, q_n, 5)
    np.testing.assert_allclose(aff, q_aff, atol=1e-5)
    dice = _dice(data, zyx_to_ijk(q_label))  # both on the query's stored grid
    assert dice > (0.85 if q_n == 16 else 0.93), dice
    assert set(np.unique(data).tolist()) == {0, 3}
    # nothing far outside the disk (radius 14 mm): all predicted voxels within 18 mm of the centre
    far = ~_disk((q_n, q_n), q_sp, 18.0)
    assert not (read_zyx(out)[:, far] > 0).any()


@pytest.mark.parametrize("sl,pairs,stored", [
    ("1:7", {1: 2, 2: 2, 3: 4, 4: 4, 5: 6, 6: 6}, [1, 2, 3, 4, 5, 6]),  # the class slices: EP1 chunks
    ("2:5", {2: 2, 3: 4, 4: 6}, [2, 3, 4]),
    (":3", {0: 2, 1: 4, 2: 6}, [0, 1, 2]),
    ("6:", {6: 4, 7: 6}, [6, 7]),  # floor(linspace(0, 2, 4)) = [0, 0, 1, 2]: chunk 0 empty
    ("-2:", {6: 4, 7: 6}, [6, 7]),
])
def test_query_slices_restrict_the_prediction(tmp_path, support, predictor, sl, pairs, stored):
    image, label, ipath, lpath = support
    out = tmp_path / "pred.nii.gz"
    res = predict_scan(predictor, ipath, lpath, LABEL, ipath, out, query_slices=sl)
    assert res.query_slices == stored
    np.testing.assert_array_equal(res.mask_zyx, _expected(label, pairs))
    np.testing.assert_array_equal(read_zyx(out), _expected(label, pairs))


def test_query_slices_are_stored_indices_of_a_flipped_query(tmp_path, support, predictor):
    """Query stored RAI (slice order reversed): stored slices 0..3 are loaded slices 7..4."""
    image, label, ipath, lpath = support
    q_img, q_aff = relayout_zyx(image, RAS, (0, 1, 2), (False, False, True))
    qpath = write_nifti(tmp_path / "query_rai.nii.gz", q_img, q_aff)
    out = tmp_path / "pred.nii.gz"
    res = predict_scan(predictor, ipath, lpath, LABEL, qpath, out, query_slices="0:4")
    assert res.query_slices == [0, 1, 2, 3]
    # loaded slices 4..7 split [4], [5], [6, 7] -> support slices 2, 4, 6
    loaded = _expected(label, {4: 2, 5: 4, 6: 6, 7: 6})
    np.testing.assert_array_equal(res.mask_zyx, loaded)
    np.testing.assert_array_equal(read_zyx(out), loaded[::-1])
    assert not read_zyx(out)[4:].any()


@pytest.mark.parametrize("bad", ["5:2", "abc", "3", "9:12"])
def test_bad_query_slices(tmp_path, support, predictor, bad):
    image, label, ipath, lpath = support
    with pytest.raises(ValueError):
        predict_scan(predictor, ipath, lpath, LABEL, ipath, None, query_slices=bad)


def test_absent_label_names_the_label_file(tmp_path, support, predictor):
    image, label, ipath, lpath = support
    with pytest.raises(DataError) as exc:
        predict_scan(predictor, ipath, lpath, 42, ipath, tmp_path / "pred.nii.gz")
    assert "sup_label.nii.gz" in str(exc.value)
    assert "42" in str(exc.value).replace(str(tmp_path), "")
    assert not (tmp_path / "pred.nii.gz").exists()


def test_query_sliced_along_another_axis_is_refused(tmp_path, support, predictor):
    image, label, ipath, lpath = support
    q_img, q_aff = relayout_zyx(image, RAS, (0, 2, 1), (False, False, False))  # RSA
    qpath = write_nifti(tmp_path / "query_rsa.nii.gz", q_img, q_aff)
    with pytest.raises(DataError, match="query_rsa.nii.gz"):
        predict_scan(predictor, ipath, lpath, LABEL, qpath, None)


def _cli(*args):
    return subprocess.run([sys.executable, "tools/predict.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_help():
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--support-image", "--support-label", "--label", "--query-image", "--out", "--query-slices"):
        assert opt in r.stdout


def test_cli_writes_the_prediction(tmp_path, support):
    image, label, ipath, lpath = support
    out = tmp_path / "cli" / "pred.nii.gz"
    r = _cli("--method", "support-copy", "--support-image", ipath, "--support-label", lpath,
             "--label", LABEL, "--query-image", ipath, "--query-slices", "1:7", "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    np.testing.assert_array_equal(read_zyx(out), _expected(label, {1: 2, 2: 2, 3: 4, 4: 4, 5: 6, 6: 6}))
    assert str(out) in r.stdout

    bad = _cli("--method", "support-copy", "--support-image", ipath, "--support-label", lpath,
               "--label", 42, "--query-image", ipath, "--out", tmp_path / "bad.nii.gz")
    assert bad.returncode == 2
    assert "sup_label.nii.gz" in bad.stderr
    assert not (tmp_path / "bad.nii.gz").exists()


CMR_DIR = REPO.parent / "shared" / "data" / "cmr" / "cmr_MR_normalized"


def test_real_cmr_oblique_cases_predicted_on_the_query_grid(tmp_path, predictor):
    """Two oblique Card-MRI cases (PSR support): used as stored, output on the query's grid."""
    if not CMR_DIR.is_dir():
        pytest.skip(f"Card-MRI data absent: {CMR_DIR}")
    import json

    import nibabel as nib

    classmap = json.loads((CMR_DIR / "classmap_1.json").read_text())
    rv = classmap["RV"]["1"]
    n = 3
    pcts = [1 / (2 * n) + i * (1 - 1 / n) / (n - 1) for i in range(n)]
    out = tmp_path / "rv.nii.gz"
    res = predict_scan(predictor, CMR_DIR / "image_1.nii.gz", CMR_DIR / "label_1.nii.gz", 600,
                       CMR_DIR / "image_2.nii.gz", out)
    assert res.support_slices == [rv[int(p * len(rv))] for p in pcts]
    q = nib.load(str(CMR_DIR / "image_2.nii.gz"))
    o = nib.load(str(out))
    assert o.shape == q.shape
    np.testing.assert_allclose(o.affine, q.affine, atol=1e-4)
    data = np.asarray(o.dataobj)
    assert set(np.unique(data).tolist()) == {0, 600}  # 600 survives the output dtype
    # support-copy: every predicted slice is one of the support's RV masks, as stored
    s_lab = np.transpose(np.asarray(nib.load(str(CMR_DIR / "label_1.nii.gz")).dataobj), (2, 1, 0)) == 600
    s_masks = [s_lab[z] for z in res.support_slices]
    pred = np.transpose(data, (2, 1, 0)) > 0
    for z in range(pred.shape[0]):
        assert any(np.array_equal(pred[z], m) for m in s_masks), z
