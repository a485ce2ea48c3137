"""fsmis.data.datasets: dataset roots, class names, slices per class, layouts; real CMR data."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _volumes import (affine_from_codes, anatomy, relayout_zyx, write_dataset, write_nifti,
                      write_pairs, zyx_to_ijk)
from fsmis.data.datasets import BENCHMARKS, FSMISDataset, open_dataset
from fsmis.data.nifti import DataError

SHAPE = (6, 9, 11)
RAS = affine_from_codes("RAS", (0.8, 0.9, 3.0), origin=(-4.0, -3.0, 10.0))
CMR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cmr"


def _toy_cases(ids, seed=0):
    cases = {}
    for n, cid in enumerate(ids):
        image, label = anatomy(SHAPE, seed=seed + n)
        cases[cid] = (image, label, RAS)
    return cases


# -- dataset.json folders ------------------------------------------------------------------------
def test_dataset_json_classes_and_numeric_case_order(tmp_path):
    root = write_dataset(tmp_path / "toy", _toy_cases(["10", "2", "1"]),
                         {"background": 0, "liver": 1, "kidney": 2, "tumour": 3},
                         test_labels=["liver", "tumour"], name="Toy", modality="CT")
    ds = open_dataset(root)
    assert ds.case_ids == ["1", "2", "10"]
    assert ds.classes == {"liver": 1, "kidney": 2, "tumour": 3}  # background dropped
    assert ds.test_classes == ["liver", "tumour"]
    assert ds.name == "Toy" and ds.modality == "CT"
    assert ds.image_dir == root
    assert ds.describe()["n_cases"] == 3
    assert ds.image_path("10").name == "image_10.nii.gz"
    assert ds.label_path("2").name == "label_2.nii.gz"


def test_dataset_json_test_labels_as_ids(tmp_path):
    root = write_dataset(tmp_path / "toy", _toy_cases(["1", "2"]),
                         {"spleen": 1, "gallbladder": 4, "liver": 6}, test_labels=[6, 1])
    ds = open_dataset(root)
    assert ds.test_classes == ["liver", "spleen"]
    assert ds.class_id("liver") == 6 and ds.class_id("gallbladder") == 4


def test_dataset_json_default_test_labels_are_all_classes(tmp_path):
    root = write_dataset(tmp_path / "toy", _toy_cases(["1"]), {"a": 1, "b": 2})
    assert open_dataset(root).test_classes == ["a", "b"]


def test_dataset_json_unknown_test_class_name(tmp_path):
    root = write_dataset(tmp_path / "toy", _toy_cases(["1"]), {"liver": 1}, test_labels=["spleen"])
    with pytest.raises(DataError, match="spleen"):
        open_dataset(root)


def test_dataset_json_unknown_test_label_id(tmp_path):
    """A test label id that is not among the labels must be a DataError naming it, not a KeyError."""
    root = write_dataset(tmp_path / "toy", _toy_cases(["1"]), {"liver": 1, "spleen": 4}, test_labels=[1, 6])
    with pytest.raises(DataError) as exc:
        open_dataset(root)
    assert re.search(r"\b6\b", str(exc.value).replace(str(tmp_path), "")), str(exc.value)


def test_unknown_class_and_missing_case(tmp_path):
    root = write_dataset(tmp_path / "toy", _toy_cases(["1", "2"]), {"liver": 1, "kidney": 2})
    ds = open_dataset(root)
    with pytest.raises(DataError, match="pancreas"):
        ds.class_id("pancreas")
    with pytest.raises(DataError, match="pancreas"):
        ds.class_slices("1", "pancreas")
    with pytest.raises(DataError, match="'7'"):
        ds.load_case("7")


def test_missing_label_file(tmp_path):
    cases = _toy_cases(["1", "2"])
    cases["2"] = (cases["2"][0], None, RAS)
    root = write_dataset(tmp_path / "toy", cases, {"liver": 1})
    ds = open_dataset(root)
    assert ds.case_ids == ["1", "2"]
    ds.load_case("1")
    with pytest.raises(DataError, match="label_2.nii.gz"):
        ds.load_case("2")


def test_not_a_dataset_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")


def test_class_slices_known_answers(tmp_path):
    root = write_dataset(tmp_path / "toy", _toy_cases(["3"]), {"a": 1, "b": 2, "c": 3, "d": 9})
    ds = open_dataset(root)
    # anatomy(): class 1 on slices 1, 2, 4; class 2 on slice 3; class 3 on slice 1; 9 nowhere
    assert ds.class_slices("3", "a").tolist() == [1, 2, 4]
    assert ds.class_slices("3", "b").tolist() == [3]
    assert ds.class_slices("3", "c").tolist() == [1]
    assert ds.class_slices("3", "d").tolist() == []
    case = ds.load_case("3")
    assert (case.label == 1).sum() == 3 * 9 - 1
    assert case.spacing == pytest.approx((3.0, 0.9, 0.8))


def test_class_slices_follow_the_stored_slice_order(tmp_path):
    """All cases stored RAI (z flipped): the dataset is read exactly as stored."""
    image, label = anatomy(SHAPE)
    img_v, aff_v = relayout_zyx(image, RAS, (0, 1, 2), (False, False, True))
    lab_v, _ = relayout_zyx(label, RAS, (0, 1, 2), (False, False, True))
    root = write_dataset(tmp_path / "toy", {"1": (img_v, lab_v, aff_v), "2": (img_v, lab_v, aff_v)},
                         {"a": 1, "b": 2})
    ds = open_dataset(root)
    assert ds.class_slices("1", "a").tolist() == [1, 3, 4]  # 5 - [4, 2, 1]
    assert ds.class_slices("2", "b").tolist() == [2]
    np.testing.assert_array_equal(ds.load_case("1").image, img_v)


def test_mixed_ras_and_lps_cases_load_to_one_layout(tmp_path):
    image, label = anatomy(SHAPE)
    img_l, aff_l = relayout_zyx(image, RAS, (0, 1, 2), (True, True, False))
    lab_l, _ = relayout_zyx(label, RAS, (0, 1, 2), (True, True, False))
    # tie (one of each): the first case's layout (RAS) is the reference
    root = write_dataset(tmp_path / "a", {"1": (image, label, RAS), "2": (img_l, lab_l, aff_l)}, {"x": 1, "y": 2})
    ds = open_dataset(root)
    c1, c2 = ds.load_case("1"), ds.load_case("2")
    np.testing.assert_array_equal(c1.image, image)
    np.testing.assert_array_equal(c2.image, image)
    np.testing.assert_array_equal(c2.label, label)
    np.testing.assert_allclose(c2.image_volume.affine, c1.image_volume.affine, atol=1e-9)
    assert ds.class_slices("2", "x").tolist() == [1, 2, 4]
    rows = {r["case"]: r for r in ds.layout_report()}
    assert rows["1"]["stored"] == "RAS" and rows["2"]["stored"] == "LPS"
    assert rows["1"]["on_load"] == "as stored"
    assert rows["2"]["kind"] == "axis-aligned"
    assert "flip X" in rows["2"]["on_load"] and "flip Y" in rows["2"]["on_load"]
    assert "flip Z" not in rows["2"]["on_load"] and "transpose" not in rows["2"]["on_load"]
    assert rows["2"]["shape_zyx"] == list(SHAPE)

    # majority LPS (2 of 3), the first case RAS: the RAS case is flipped to LPS
    root = write_dataset(tmp_path / "b", {"1": (image, label, RAS), "2": (img_l, lab_l, aff_l),
                                          "10": (img_l, lab_l, aff_l)}, {"x": 1})
    ds = open_dataset(root)
    for cid in ("1", "2", "10"):
        np.testing.assert_array_equal(ds.load_case(cid).image, img_l)
        np.testing.assert_array_equal(ds.load_case(cid).label, lab_l)


def test_case_with_slices_along_another_axis_is_refused(tmp_path):
    image, label = anatomy(SHAPE)
    img_s, aff_s = relayout_zyx(image, RAS, (0, 2, 1), (False, False, False))  # RSA
    lab_s, _ = relayout_zyx(label, RAS, (0, 2, 1), (False, False, False))
    root = write_dataset(tmp_path / "toy", {"1": (image, label, RAS), "2": (image, label, RAS),
                                            "3": (img_s, lab_s, aff_s)}, {"x": 1})
    ds = open_dataset(root)
    ds.load_case("1")
    with pytest.raises(DataError, match="image_3.nii.gz"):
        ds.load_case("3")


def test_label_shape_mismatch_in_dataset(tmp_path):
    image, label = anatomy(SHAPE)
    root = write_dataset(tmp_path / "toy", {"1": (image, label[:, :, :-1], RAS)}, {"x": 1})
    with pytest.raises(DataError) as exc:
        open_dataset(root).load_case("1")
    assert "image_1.nii.gz" in str(exc.value) and "label_1.nii.gz" in str(exc.value)


# -- published layout ----------------------------------------------------------------------------
def _published(tmp_path, bench: str, ids=("1", "2", "10")):
    b = BENCHMARKS[bench]
    outer = tmp_path / bench
    inner = write_pairs(outer / b.folder, _toy_cases(list(ids)))
    sv = outer / b.supervoxels
    for cid in ids:
        write_nifti(sv / f"superpix-MIDDLE_{cid}.nii.gz", np.arange(np.prod(SHAPE)).reshape(SHAPE) % 7,
                    RAS, dtype=np.float64)
    return outer, inner, sv


@pytest.mark.parametrize("which", ["outer", "inner"])
def test_published_chaos_folder(tmp_path, which):
    outer, inner, sv = _published(tmp_path, "CHAOST2")
    ds = open_dataset(outer if which == "outer" else inner)
    assert ds.name == "CHAOST2"
    assert ds.image_dir == inner
    assert ds.classes == {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    assert sorted(ds.test_classes) == sorted(["liver", "right_kidney", "left_kidney", "spleen"])
    assert ds.case_ids == ["1", "2", "10"]
    assert ds.supervoxel_dir == sv
    case = ds.load_case("10", supervoxels=True)
    assert case.label.dtype.kind == "i"
    np.testing.assert_array_equal(case.supervoxels, np.arange(np.prod(SHAPE)).reshape(SHAPE) % 7)
    assert ds.class_slices("10", "liver").tolist() == [1, 2, 4]
    assert ds.class_slices("10", "spleen").tolist() == []
    assert ds.supervoxel_path("2").name == "superpix-MIDDLE_2.nii.gz"


@pytest.mark.parametrize("which", ["outer", "inner"])
def test_published_sabs_folder_class_ids(tmp_path, which):
    outer, inner, _ = _published(tmp_path, "SABS", ids=[str(i) for i in range(12)])
    ds = open_dataset(outer if which == "outer" else inner)
    assert ds.name == "SABS"
    assert ds.case_ids == [str(i) for i in range(12)]
    assert ds.class_id("liver") == 6
    assert ds.class_id("gallbladder") == 4
    assert ds.class_id("spleen") == 1
    assert ds.class_id("right_kidney") == 2 and ds.class_id("left_kidney") == 3
    assert sorted(ds.test_classes) == sorted(["liver", "spleen", "left_kidney", "right_kidney"])
    assert len(ds.classes) == 13


def test_published_cmr_registry():
    b = BENCHMARKS["CMR"]
    assert b.folder == "cmr_MR_normalized" and b.supervoxels == "supervoxels_1000"
    assert b.labels == {"LV-MYO": 200, "LV-BP": 500, "RV": 600}


def test_missing_supervoxels(tmp_path):
    outer, inner, sv = _published(tmp_path, "CHAOST2")
    (sv / "superpix-MIDDLE_2.nii.gz").unlink()
    ds = open_dataset(outer)
    with pytest.raises(DataError, match="superpix-MIDDLE_2.nii.gz"):
        ds.supervoxel_path("2")


# -- real data: Card-MRI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cmr():
    if not (CMR_DIR / "cmr_MR_normalized").is_dir():
        pytest.skip(f"Card-MRI data absent: {CMR_DIR}")
    return FSMISDataset(CMR_DIR)


def test_cmr_cases_and_classes(cmr):
    assert cmr.name == "CMR"
    assert cmr.case_ids == [str(i) for i in range(1, 36)]
    assert cmr.classes == {"LV-MYO": 200, "LV-BP": 500, "RV": 600}
    assert list(cmr.test_classes) == ["LV-MYO", "LV-BP", "RV"]
    assert cmr.supervoxel_dir == CMR_DIR / "supervoxels_1000"
    assert FSMISDataset(CMR_DIR / "cmr_MR_normalized").case_ids == cmr.case_ids


def test_cmr_every_case_oblique_and_used_as_stored(cmr):
    rows = cmr.layout_report()
    assert len(rows) == 35
    assert all(r["kind"] == "oblique" for r in rows)
    assert all(r["on_load"].endswith("used as stored") for r in rows)
    assert Counter(r["stored"] for r in rows) == {"PSR": 21, "LSP": 14}
    obl = [r["obliquity_deg"] for r in rows]
    assert 29.5 <= min(obl) and max(obl) <= 53.5
    for r in rows:
        assert r["spacing_zyx"] == pytest.approx([7.99, 1.25, 1.25], abs=1e-3)
        assert r["shape_zyx"][1:] == [256, 256]
    for cid in ("1", "2", "35"):  # arrays exactly as stored
        case = cmr.load_case(cid)
        stored = np.asarray(nib.load(str(cmr.image_path(cid))).dataobj)
        np.testing.assert_array_equal(case.image, np.transpose(stored, (2, 1, 0)).astype(np.float32))
        assert case.image_volume.layout.is_identity


def test_cmr_class_slices_agree_with_published_classmap(cmr):
    classmap = json.loads((CMR_DIR / "cmr_MR_normalized" / "classmap_1.json").read_text())
    n = 0
    for name in ("LV-MYO", "LV-BP", "RV"):
        assert set(classmap[name]) == set(cmr.case_ids)
        for cid in cmr.case_ids:
            assert cmr.class_slices(cid, name).tolist() == list(classmap[name][cid]), (name, cid)
            n += 1
    assert n == 105
    # labels keep the raw ids
    assert set(np.unique(cmr.load_case("1").label).tolist()) == {0, 200, 500, 600}
