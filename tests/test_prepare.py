"""Preparing the benchmarks from raw downloads (fsmis.data.prepare, tools/prepare_dataset.py).

Small synthetic raw fixtures in each raw format: Synapse NIfTI in HU at 512 x 512, a CHAOS
DICOM series with PNG masks in grey values 63/126/189/252, MS-CMRSeg NIfTI with labels
200/500/600 on an oblique short-axis stack. Outputs are checked against docs/protocol.md §1-§4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _volumes import affine_from_codes, oblique_affine, read_ijk, read_zyx, world, write_nifti
from fsmis.data import prepare as prep
from fsmis.data.datasets import BENCHMARKS, open_dataset
from fsmis.data.nifti import DataError
from fsmis.data.prepare import common as prep_common  # where the writing looks its helpers up

REPO = Path(__file__).resolve().parents[1]


# -- raw fixtures ---------------------------------------------------------------------------------
def _ellipse(shape_yx, centre, radii):
    yy, xx = np.mgrid[:shape_yx[0], :shape_yx[1]]
    return ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1.0


# SABS: (label id, slices, centre (y, x), radii, HU)
SABS_ORGANS = [
    (6, (0, 1, 2, 3), (250, 170), (60, 70), 60),    # liver: large, on one side
    (1, (1, 2, 3), (260, 360), (30, 30), 45),       # spleen
    (2, (0, 1, 2), (350, 190), (20, 20), 30),       # right kidney
    (3, (0, 1, 2), (350, 320), (20, 20), 30),       # left kidney
    (4, (2,), (300, 215), (10, 10), 10),            # gallbladder: next to the liver
]


def make_sabs_raw(root: Path, n_cases: int = 2, slices: int = 4, codes: str = "LPS") -> Path:
    """Synapse RawData: img/img000k.nii.gz (int16 HU, 512 x 512) and label/label000k.nii.gz."""
    for k in range(1, n_cases + 1):
        img = np.full((slices, 512, 512), -1000, np.int16)
        lab = np.zeros((slices, 512, 512), np.int16)
        body = _ellipse((512, 512), (280, 256), (170, 220))
        for z in range(slices):
            img[z][body] = 40
            img[z][_ellipse((512, 512), (400, 256), (25, 25))] = 700  # spine: above the window
            img[z][_ellipse((512, 512), (140, 256), (12, 30))] = -120  # fat, in the window
        for cid, zs, c, r, hu in SABS_ORGANS:
            m = _ellipse((512, 512), (c[0] + 3 * k, c[1]), r)
            for z in zs:
                if z < slices:
                    lab[z][m] = cid
                    img[z][m] = hu
        aff = affine_from_codes(codes, (0.8, 0.8, 3.0), origin=(200.0, 180.0, -300.0 + 10 * k))
        write_nifti(root / "RawData" / "Training" / "img" / f"img{k:04d}.nii.gz", img, aff, dtype=np.int16)
        write_nifti(root / "RawData" / "Training" / "label" / f"label{k:04d}.nii.gz", lab, aff, dtype=np.uint8)
    return root


# CHAOS: (grey value, rows, cols, intensity, files (instance numbers) it appears on)
CHAOS_ORGANS = [
    (63, (25, 75), (25, 85), 500.0, range(1, 7)),     # liver, on the image's left = patient's right
    (126, (70, 85), (35, 50), 700.0, range(4, 7)),    # right kidney, on the inferior files
    (189, (70, 85), (140, 155), 750.0, range(4, 7)),  # left kidney
    (252, (30, 55), (130, 165), 600.0, range(1, 4)),  # spleen, on the superior files
]
CHAOS_PX, CHAOS_GAP, CHAOS_N = 1.875, 6.0, 6


def make_chaos_patient(root: Path, patient: int, rows_down: bool = True, flip_masks: bool = False,
                       seed: int = 0) -> Path:
    """See :func:`_make_chaos_patient`; SimpleITK's DICOM writer resets the locale, restored here."""
    from fsmis.data.dicom import keep_locale

    with keep_locale():
        return _make_chaos_patient(root, patient, rows_down, flip_masks, seed)


def _make_chaos_patient(root: Path, patient: int, rows_down: bool = True, flip_masks: bool = False,
                        seed: int = 0) -> Path:
    """Train_Sets/MR/<patient>/T2SPIR/DICOM_anon/*.dcm + Ground/*.png (grey 63/126/189/252).

    Instance number 1 is the most superior slice (files are not in position order).
    ``rows_down=False``: rows run anterior (ImageOrientationPatient 1,0,0,0,-1,0).
    ``flip_masks``: masks drawn upside down (a misaligned ground truth).
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(seed + patient)
    base = root / "Train_Sets" / "MR" / str(patient) / "T2SPIR"
    dcm_dir, png_dir = base / "DICOM_anon", base / "Ground"
    dcm_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    col_dir = (0.0, 1.0, 0.0) if rows_down else (0.0, -1.0, 0.0)
    normal = np.cross((1.0, 0.0, 0.0), col_dir)
    uid = f"1.2.826.0.1.3680043.9.7777.{patient}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for inst in range(1, CHAOS_N + 1):
        level = CHAOS_N - inst  # instance 1 = the highest position along +S
        pos = np.array([-180.0, -150.0, level * CHAOS_GAP])  # LPS position of row 0, column 0
        if not rows_down:
            pos[1] += 191 * CHAOS_PX  # row 0 is the most posterior row
        img = rng.normal(8.0, 2.0, (192, 192)).clip(0)
        mask = np.zeros((192, 192), np.uint8)
        img[_ellipse((192, 192), (55, 96), (45, 80))] = 300.0
        img[60, 96] = 5000.0  # a bright spike, above the 99.5th percentile
        for grey, (r0, r1), (c0, c1), val, insts in CHAOS_ORGANS:
            if inst in insts:
                mask[r0:r1, c0:c1] = grey
                img[r0:r1, c0:c1] = val
        if flip_masks:
            mask = mask[::-1]
        s = sitk.GetImageFromArray(img.astype(np.int16))
        s.SetSpacing((CHAOS_PX, CHAOS_PX))
        for tag, value in {
            "0008|0060": "MR", "0020|000e": uid, "0020|000d": uid + ".1", "0008|0018": f"{uid}.{inst}",
            "0020|0037": "\\".join(f"{v:g}" for v in (1, 0, 0, *col_dir)),
            "0020|0032": "\\".join(f"{v:g}" for v in pos),
            "0020|0013": str(inst), "0028|0030": f"{CHAOS_PX:g}\\{CHAOS_PX:g}", "0018|0050": "6",
        }.items():
            s.SetMetaData(tag, value)
        name = f"IMG-0002-{inst:05d}"
        writer.SetFileName(str(dcm_dir / f"{name}.dcm"))
        writer.Execute(s)
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(png_dir / f"{name}.png"))
    assert np.allclose(normal, (0, 0, 1) if rows_down else (0, 0, -1))
    return root


def chaos_raw_label_world(patient_root: Path) -> dict:
    """World (RAS) centroid of every CHAOS class, computed from the raw DICOM + PNG files."""
    from fsmis.data.dicom import read_dicom_series, stack_masks

    series = read_dicom_series(patient_root / "DICOM_anon")
    grey = stack_masks(series, patient_root / "Ground")
    return {cid: _centroid_world(grey == g, series.affine) for g, cid in ((63, 1), (126, 2), (189, 3), (252, 4))}


def _centroid_world(mask_zyx, affine):
    zyx = np.argwhere(mask_zyx).mean(axis=0)
    return world(affine, zyx[::-1])[0]


CMR_AFFINE = oblique_affine("PSR", (1.5, 1.5, 10.0), axis="x", degrees=40, origin=(10.0, -40.0, 30.0))


def make_cmr_raw(root: Path, patients=(1, 2), sequence: str = "C0", unlabelled=(3,)) -> Path:
    """MS-CMRSeg: patient<k>_<seq>.nii.gz (oblique, 200 x 200 x 4) + labels/patient<k>_<seq>_manual.nii.gz."""
    for k in list(patients) + list(unlabelled):
        rng = np.random.default_rng(k)
        img = rng.normal(10.0, 3.0, (4, 200, 200)).clip(0)
        lab = np.zeros((4, 200, 200), np.int16)
        body = _ellipse((200, 200), (100, 100), (80, 90))
        for z in range(4):
            img[z][body] = 200.0
            bp = _ellipse((200, 200), (95 + k, 110), (15, 15))
            myo = _ellipse((200, 200), (95 + k, 110), (22, 22)) & ~bp
            rv = _ellipse((200, 200), (95 + k, 75), (18, 12)) & ~myo & ~bp
            for m, v, val in ((myo, 200, 150.0), (bp, 500, 400.0), (rv, 600, 350.0)):
                if z < 3 or v != 600:
                    lab[z][m] = v
                    img[z][m] = val
            img[z, 100, 100] = 9000.0
        write_nifti(root / "c0t2lge" / f"patient{k}_{sequence}.nii.gz", img, CMR_AFFINE, dtype=np.int16)
        if k in patients:
            write_nifti(root / "labels" / f"patient{k}_{sequence}_manual.nii.gz", lab, CMR_AFFINE, dtype=np.int16)
    return root


# -- prepared fixtures (module scope: each preparation runs once per test process) ---------------
def _prepare(tmp_path_factory, dataset, make_raw, **kw):
    raw = make_raw(tmp_path_factory.mktemp(f"{dataset}_raw"))
    out = tmp_path_factory.mktemp(f"{dataset}_out") / BENCHMARKS[prep.RECIPES[dataset].benchmark].name
    prep.prepare_dataset(dataset, raw, out, progress=False, **kw)
    return raw, out


@pytest.fixture(scope="module")
def sabs(tmp_path_factory):
    return _prepare(tmp_path_factory, "sabs", make_sabs_raw)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    def raw(root):
        make_chaos_patient(root, 1)
        make_chaos_patient(root, 2, rows_down=False)
        return root
    return _prepare(tmp_path_factory, "chaos", raw)


@pytest.fixture(scope="module")
def cmr(tmp_path_factory):
    return _prepare(tmp_path_factory, "cmr", make_cmr_raw)


def _inner(out, dataset):
    return out / BENCHMARKS[prep.RECIPES[dataset].benchmark].folder


# -- SABS -------------------------------------------------------------------------------------
def test_sabs_geometry_window_and_labels(sabs):
    raw, out = sabs
    inner = _inner(out, "sabs")
    assert sorted(p.name for p in inner.glob("image_*")) == ["image_0.nii.gz", "image_1.nii.gz"]  # 0..N-1
    img = nib.load(str(inner / "image_0.nii.gz"))
    assert img.get_data_dtype() == np.float64
    assert img.shape == (256, 256, 4)  # 512 - 2*32 = 448 -> 256 (not 257), z unchanged
    np.testing.assert_allclose(img.header.get_zooms(), (1.4, 1.4, 3.0), rtol=1e-6)  # 0.8 * 1.75
    arr = read_zyx(inner / "image_0.nii.gz")
    assert arr.min() == 0.0 and np.isclose(arr.max(), 255.0, atol=1e-9)  # HU [-125, 275] -> [0, 255]
    tissue = (40 + 125) / 400 * 255  # 40 HU
    assert np.isclose(np.median(arr[arr > 90]), tissue, atol=0.5) or np.any(np.isclose(arr, tissue))
    lab = read_zyx(inner / "label_0.nii.gz")
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4, 6}
    raw_lab, raw_aff = read_ijk(raw / "RawData/Training/label/label0001.nii.gz")
    raw_lab = np.transpose(raw_lab, (2, 1, 0))
    out_aff = img.affine
    for cid in (1, 2, 3, 4, 6):  # every organ where it was in world space, with its id (liver is 6)
        np.testing.assert_allclose(_centroid_world(lab == cid, out_aff), _centroid_world(raw_lab == cid, raw_aff),
                                   atol=1.0)
    # the liver keeps its HU: (60 + 125) / 400 * 255
    assert np.isclose(np.median(arr[lab == 6]), (60 + 125) / 400 * 255, atol=0.5)
    assert nib.aff2axcodes(out_aff) == nib.aff2axcodes(raw_aff)  # CT: as stored


def test_sabs_opens_with_the_existing_loaders(sabs):
    _, out = sabs
    for root in (out, _inner(out, "sabs")):
        ds = open_dataset(root)
        assert ds.name == "SABS"
        assert ds.classes["liver"] == 6 and ds.classes["gallbladder"] == 4
        case = ds.load_case("0", supervoxels=True)
        assert case.image.shape == (4, 256, 256)
        assert case.supervoxels.shape == case.image.shape and case.supervoxels.max() > 0
        assert (case.supervoxels[case.label > 0] > 0).all()  # organs lie inside the body
        assert list(ds.class_slices("0", "gallbladder")) == [2]
        assert list(ds.class_slices("1", "liver")) == [0, 1, 2, 3]
    assert ds.supervoxel_dir == out / "supervoxels_5000"
    cmap = json.loads((_inner(out, "sabs") / "classmap_1.json").read_text())
    assert cmap["LIVER"]["0"] == [0, 1, 2, 3] and cmap["SPLEEN"]["1"] == [1, 2, 3] and cmap["GALLBLADDER"]["0"] == [2]


def test_report_and_checksums(sabs):
    _, out = sabs
    report = json.loads((out / "preparation_report.json").read_text())
    assert report["n_cases"] == 2
    row = report["cases"][0]
    assert row["shape_zyx"] == [4, 256, 256] and row["spacing_zyx_mm"] == [3.0, 1.4, 1.4]
    assert row["orientation"] == "LPS" and row["kind"] == "axis-aligned"
    assert row["label_voxels"]["liver"] == int((read_zyx(_inner(out, "sabs") / "label_0.nii.gz") == 6).sum())
    assert row["label_voxels"]["liver"] > 0 and row["label_voxels"]["aorta"] == 0
    assert min(row["inside_body"].values()) > 0.99
    assert "img0001.nii.gz" in row["source"] and not os.path.isabs(row["source"].split(" + ")[0])
    md = (out / "preparation_report.md").read_text()
    assert "| liver |" in md and "| 0 | 4x256x256 | 3 x 1.4 x 1.4 | LPS |" in md
    lines = (out / "checksums.sha256").read_text().splitlines()
    names = {ln.split("  ", 1)[1] for ln in lines}
    assert {"sabs_CT_normalized/image_0.nii.gz", "sabs_CT_normalized/label_1.nii.gz",
            "sabs_CT_normalized/dataset.json", "sabs_CT_normalized/classmap_1.json",
            "supervoxels_5000/superpix-MIDDLE_1.nii.gz"} <= names
    assert prep.verify_checksums(out) == []


def test_checksums_catch_a_changed_file(tmp_path, sabs):
    import shutil

    _, out = sabs
    copy = tmp_path / "SABS"
    shutil.copytree(out, copy)
    assert prep.verify_checksums(copy) == []
    lab = copy / "sabs_CT_normalized" / "label_1.nii.gz"
    data, aff = read_ijk(lab)
    data = data.copy()
    data[0, 0, 0] = 6
    nib.save(nib.Nifti1Image(data, aff), str(lab))
    (copy / "supervoxels_5000" / "superpix-MIDDLE_0.nii.gz").unlink()
    problems = prep.verify_checksums(copy)
    assert any("label_1.nii.gz: checksum differs" in p for p in problems)
    assert any("superpix-MIDDLE_0.nii.gz: missing" in p for p in problems)


def test_slice_axis_differing_from_the_others_is_refused(tmp_path):
    raw = make_sabs_raw(tmp_path / "raw", n_cases=1)
    # a second case stored with its slices along y (coronal): needs reslicing
    img = np.full((512, 4, 512), 40, np.int16)
    lab = np.zeros((512, 4, 512), np.int16)
    lab[200:300, 1:3, 200:300] = 6
    aff = affine_from_codes("LSP", (0.8, 3.0, 0.8))
    write_nifti(raw / "RawData/Training/img/img0002.nii.gz", img.transpose(1, 0, 2), aff, dtype=np.int16)
    write_nifti(raw / "RawData/Training/label/label0002.nii.gz", lab.transpose(1, 0, 2), aff, dtype=np.int16)
    with pytest.raises(DataError, match=r"case 1 \(.*img0002"):
        prep.prepare_dataset("sabs", raw, tmp_path / "SABS", progress=False, supervoxels=False)
    assert not (tmp_path / "SABS/sabs_CT_normalized/image_1.nii.gz").exists()
    assert (tmp_path / "SABS/sabs_CT_normalized/image_0.nii.gz").exists()


def test_sabs_bad_label_values_are_named(tmp_path):
    raw = make_sabs_raw(tmp_path / "raw", n_cases=1)
    p = raw / "RawData/Training/label/label0001.nii.gz"
    data, aff = read_ijk(p)
    data = data.astype(np.int16)
    data[0, 0, 0] = 14
    nib.save(nib.Nifti1Image(data, aff), str(p))
    with pytest.raises(DataError, match=r"label0001.*unexpected label values \[14\]"):
        prep.prepare_dataset("sabs", raw, tmp_path / "SABS", progress=False, supervoxels=False)


# -- CHAOS ------------------------------------------------------------------------------------
def test_chaos_dicom_png_geometry_and_ids(chaos):
    raw, out = chaos
    inner = _inner(out, "chaos")
    assert sorted(p.name for p in inner.glob("image_*")) == ["image_1.nii.gz", "image_2.nii.gz"]  # patient ids
    for pid in ("1", "2"):
        img = nib.load(str(inner / f"image_{pid}.nii.gz"))
        assert img.shape == (256, 256, 5)  # 192 * 1.875 / 1.25 = 288 -> crop 256; 6 * 6 / 7.7 -> 5
        np.testing.assert_allclose(img.header.get_zooms(), (1.25, 1.25, 7.7), rtol=1e-6)
        assert nib.aff2axcodes(img.affine) == ("L", "A", "S")  # as the published archive, from any layout
        assert img.get_data_dtype() == np.float64
        arr = read_zyx(inner / f"image_{pid}.nii.gz")
        lab = read_zyx(inner / f"label_{pid}.nii.gz")
        assert set(np.unique(lab)) == {0, 1, 2, 3, 4}  # 63/126/189/252 -> 1/2/3/4
        assert arr.max() < 1000  # the 5000 spike is clipped at the 99.5th percentile
        # ids follow the grey values: liver (63) is the organ drawn at 500, spleen (252) at 600
        assert abs(np.median(arr[lab == 1]) - 500) < 5 and abs(np.median(arr[lab == 4]) - 600) < 5
        # every organ lies where the raw DICOM geometry puts it (the PNGs align without a fixed flip)
        truth = chaos_raw_label_world(raw / "Train_Sets/MR" / pid / "T2SPIR")
        for cid, centre in truth.items():  # within half an output voxel (1.25 mm in-plane, 7.7 mm slices)
            assert np.all(np.abs(_centroid_world(lab == cid, img.affine) - centre) <= (0.625, 0.625, 3.85)), cid
        # slices run inferior -> superior whatever the file order: spleen on top, kidneys at the bottom
        spleen_z = np.flatnonzero((lab == 4).any(axis=(1, 2)))
        kidney_z = np.flatnonzero((lab == 2).any(axis=(1, 2)))
        assert spleen_z.max() == 4 and kidney_z.min() == 0
    ds = open_dataset(out)
    assert ds.name == "CHAOST2" and ds.classes == {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    assert ds.supervoxel_dir == out / "supervoxels_5000"
    assert [r["on_load"] for r in ds.layout_report()] == ["as stored", "as stored"]


def test_dicom_reading_keeps_the_process_locale(tmp_path):
    """SimpleITK's DICOM writer (GDCM) leaves the process locale at "C" (seen with SimpleITK
    2.5); the fixture writer and the readers must leave it as it was, else text files opened
    later default to ASCII."""
    import locale

    from fsmis.data.dicom import read_dicom_series, read_png_mask

    before = locale.setlocale(locale.LC_ALL)
    enc = locale.getpreferredencoding(False)
    make_chaos_patient(tmp_path, 1)
    assert locale.setlocale(locale.LC_ALL) == before
    base = tmp_path / "Train_Sets" / "MR" / "1" / "T2SPIR"
    series = read_dicom_series(base / "DICOM_anon")
    read_png_mask(sorted((base / "Ground").glob("*.png"))[0])
    assert series.array.ndim == 3
    assert locale.setlocale(locale.LC_ALL) == before
    assert locale.getpreferredencoding(False) == enc


def test_chaos_flipped_masks_fail_naming_the_case(tmp_path):
    raw = tmp_path / "raw"
    make_chaos_patient(raw, 1)
    make_chaos_patient(raw, 8, flip_masks=True)
    with pytest.raises(DataError, match=r"case 8 \(.*Train_Sets/MR/8/T2SPIR.*inside the body mask"):
        prep.prepare_dataset("chaos", raw, tmp_path / "CHAOST2", progress=False, supervoxels=False)
    inner = tmp_path / "CHAOST2" / "chaos_MR_T2_normalized"
    assert (inner / "image_1.nii.gz").exists()
    assert not list(inner.glob("*_8.nii.gz"))


def test_chaos_unknown_grey_value_and_missing_mask_are_named(tmp_path):
    import SimpleITK as sitk

    raw = make_chaos_patient(tmp_path / "raw", 3)
    ground = raw / "Train_Sets/MR/3/T2SPIR/Ground"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((192, 192), 100, np.uint8)), str(ground / "IMG-0002-00002.png"))
    with pytest.raises(DataError, match=r"Ground.*grey values \[100\]"):
        prep.prepare_dataset("chaos", raw, tmp_path / "out1", progress=False, supervoxels=False)
    (ground / "IMG-0002-00002.png").unlink()
    with pytest.raises(DataError, match=r"no unambiguous mask .*IMG-0002-00002.dcm"):
        prep.prepare_dataset("chaos", raw, tmp_path / "out2", progress=False, supervoxels=False)


# -- CMR --------------------------------------------------------------------------------------
def test_cmr_oblique_as_stored_and_raw_ids(cmr):
    raw, out = cmr
    inner = _inner(out, "cmr")
    assert sorted(p.name for p in inner.glob("image_*")) == ["image_1.nii.gz", "image_2.nii.gz"]  # 3: no label
    img = nib.load(str(inner / "image_1.nii.gz"))
    assert img.shape == (256, 256, 5)  # 200 * 1.5 / 1.25 = 240 -> pad 256; 4 * 10 / 7.99 -> 5
    np.testing.assert_allclose(img.header.get_zooms(), (1.25, 1.25, 7.99), rtol=1e-6)
    # oblique: the stored direction is kept exactly (no flip, no transpose, no reslice)
    direction = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
    raw_dir = CMR_AFFINE[:3, :3] / np.linalg.norm(CMR_AFFINE[:3, :3], axis=0)
    np.testing.assert_allclose(direction, raw_dir, atol=1e-6)
    lab = read_zyx(inner / "label_1.nii.gz")
    arr = read_zyx(inner / "image_1.nii.gz")
    assert set(np.unique(lab)) == {0, 200, 500, 600}  # the stored ids of the published files
    assert arr.max() < 1000 and arr.min() >= 0  # 9000 clipped at the 99.5th percentile; pad = minimum
    raw_lab, raw_aff = read_ijk(raw / "labels/patient1_C0_manual.nii.gz")
    raw_lab = np.transpose(raw_lab, (2, 1, 0))
    for v in (200, 500, 600):
        np.testing.assert_allclose(_centroid_world(lab == v, img.affine), _centroid_world(raw_lab == v, raw_aff),
                                   atol=1.5)
    ds = open_dataset(out)
    assert ds.name == "CMR" and ds.supervoxel_dir == out / "supervoxels_1000"
    case = ds.load_case("1", supervoxels=True)
    assert {n: int((case.label == ds.class_id(n)).sum()) > 0 for n in ds.test_classes} == \
        {"LV-MYO": True, "LV-BP": True, "RV": True}
    assert np.array_equal((case.label == ds.class_id("RV")), lab == 600)
    rows = ds.layout_report()
    assert rows[0]["kind"] == "oblique" and rows[0]["on_load"].startswith("oblique")
    report = json.loads((out / "preparation_report.json").read_text())
    assert report["cases"][0]["kind"] == "oblique" and report["cases"][0]["obliquity_deg"] == 40.0


def test_cmr_lge_sequence(tmp_path):
    raw = make_cmr_raw(tmp_path / "raw", patients=(4,), sequence="DE", unlabelled=())
    make_cmr_raw(raw, patients=(1,), sequence="C0", unlabelled=())
    out = prep.prepare_dataset("cmr", raw, tmp_path / "CMR_DE", sequence="DE", progress=False, supervoxels=False)
    inner = out / "cmr_MR_normalized"
    assert [p.name for p in inner.glob("image_*")] == ["image_4.nii.gz"]
    info = json.loads((inner / "dataset.json").read_text())
    assert info["name"] == "CMR_DE" and info["preparation"]["sequence"] == "DE"
    assert open_dataset(out).classes == {"LV-MYO": 200, "LV-BP": 500, "RV": 600}


# -- re-runs, interruptions, refusals -------------------------------------------------------------
def _mtimes(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*.nii.gz")}


def test_rerun_skips_finished_cases(tmp_path, monkeypatch):
    raw = make_cmr_raw(tmp_path / "raw", patients=(1, 2), unlabelled=())
    out = tmp_path / "CMR"
    prep.prepare_dataset("cmr", raw, out, progress=False, cases=["1"])
    before = _mtimes(out)
    calls = []
    real = prep.prepare_case
    monkeypatch.setattr(prep_common, "prepare_case", lambda recipe, rc, *a, **k: calls.append(rc.case_id) or real(recipe, rc, *a, **k))
    plan = prep.plan_preparation("cmr", raw, out)
    assert plan.done == ["1"] and [rc.case_id for rc in plan.todo()] == ["2"]
    prep.prepare_dataset(plan, progress=False)
    assert calls == ["2"]
    after = _mtimes(out)
    assert all(after[k] == v for k, v in before.items())  # case 1 untouched
    prep.prepare_dataset("cmr", raw, out, progress=False)
    assert calls == ["2"]  # nothing left to do
    assert prep.verify_checksums(out) == []
    assert len(json.loads((out / "preparation_report.json").read_text())["cases"]) == 2


def test_interrupted_case_leaves_nothing_half_written(tmp_path, monkeypatch):
    raw = make_cmr_raw(tmp_path / "raw", patients=(1, 2), unlabelled=())
    out = tmp_path / "CMR"
    real_save = prep_common.atomic_save_nifti

    def crash_on_second_image(data, affine, path, *a, **k):
        if Path(path).name == "image_2.nii.gz":
            raise KeyboardInterrupt  # Ctrl-C while case 2 is written (its label is already there)
        return real_save(data, affine, path, *a, **k)

    monkeypatch.setattr(prep_common, "atomic_save_nifti", crash_on_second_image)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_dataset("cmr", raw, out, progress=False)
    inner = out / "cmr_MR_normalized"
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [n for n in left if "_2.nii.gz" in n or ".tmp-" in n], left
    assert (inner / "image_1.nii.gz").exists() and (out / "supervoxels_1000/superpix-MIDDLE_1.nii.gz").exists()
    assert open_dataset(out).case_ids == ["1"]
    monkeypatch.setattr(prep_common, "atomic_save_nifti", real_save)
    plan = prep.plan_preparation("cmr", raw, out)
    assert plan.done == ["1"]
    prep.prepare_dataset(plan, progress=False)
    assert open_dataset(out).case_ids == ["1", "2"]


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    raw = make_cmr_raw(tmp_path / "raw", patients=(1,), unlabelled=())
    out = tmp_path / "CMR"
    prep.prepare_dataset("cmr", raw, out, progress=False, supervoxels=False)
    inner = out / "cmr_MR_normalized"
    # what a hard kill can leave: a temporary file and a case whose image was never renamed in
    (inner / ".tmp-abc.nii.gz").write_bytes(b"partial")
    (inner / "label_7.nii.gz").write_bytes((inner / "label_1.nii.gz").read_bytes())
    prep.prepare_dataset("cmr", raw, out, progress=False, supervoxels=False)
    assert not (inner / ".tmp-abc.nii.gz").exists() and not (inner / "label_7.nii.gz").exists()
    assert (inner / "image_1.nii.gz").exists()


def test_refuses_to_write_over_other_data(tmp_path):
    raw = make_cmr_raw(tmp_path / "raw", patients=(1,), unlabelled=())
    published = tmp_path / "CMR" / "cmr_MR_normalized"
    published.mkdir(parents=True)
    (published / "image_1.nii.gz").write_bytes(b"a published archive")
    with pytest.raises(FileExistsError, match="no dataset.json"):
        prep.prepare_dataset("cmr", raw, tmp_path / "CMR", progress=False, supervoxels=False)
    assert (published / "image_1.nii.gz").read_bytes() == b"a published archive"
    out = prep.prepare_dataset("cmr", raw, tmp_path / "other", progress=False, supervoxels=False)
    make_cmr_raw(raw, patients=(1,), sequence="DE", unlabelled=())
    with pytest.raises(FileExistsError, match="other settings"):
        prep.prepare_dataset("cmr", raw, out, sequence="DE", progress=False, supervoxels=False)


def test_supervoxels_added_to_cases_prepared_without(tmp_path):
    raw = make_cmr_raw(tmp_path / "raw", patients=(1,), unlabelled=())
    out = prep.prepare_dataset("cmr", raw, tmp_path / "CMR", progress=False, supervoxels=False)
    assert not (out / "supervoxels_1000").exists()
    prep.prepare_dataset("cmr", raw, out, progress=False)
    sv = read_zyx(out / "supervoxels_1000/superpix-MIDDLE_1.nii.gz")
    assert sv.shape == (5, 256, 256) and sv.max() >= 1
    assert prep.verify_checksums(out) == []


# -- geometry helpers -------------------------------------------------------------------------
def test_resampling_keeps_the_field_of_view():
    aff = affine_from_codes("LPS", (0.8, 0.8, 3.0), origin=(5.0, 6.0, 7.0))
    img = np.zeros((2, 448, 448))
    lab = np.zeros((2, 448, 448), np.int32)
    lab[:, 100:200, 300:340] = 6
    img[lab == 6] = 100.0
    out_img, out_lab, out_aff = prep.resample_to(img, lab, aff, (None, None, None), (None, 256, 256))
    assert out_img.shape == out_lab.shape == (2, 256, 256)
    np.testing.assert_allclose(prep.spacing_of(out_aff), (3.0, 1.4, 1.4))
    # the corner of the first voxel is where it was
    np.testing.assert_allclose(world(out_aff, [-0.5, -0.5, 0]), world(aff, [-0.5, -0.5, 0]))
    np.testing.assert_allclose(_centroid_world(out_lab == 6, out_aff), _centroid_world(lab == 6, aff), atol=0.5)
    assert set(np.unique(out_lab)) == {0, 6}


def test_centre_window_pads_with_fill_and_shifts_the_affine():
    aff = np.eye(4)
    a = np.arange(2 * 4 * 6, dtype=float).reshape(2, 4, 6)
    out, out_aff = prep.centre_window(a, aff, 5, fill=-1)
    assert out.shape == (2, 5, 5)
    # rows 4 -> 5: one padded row in front; columns 6 -> 5: the last one cropped
    assert (out[:, 0, :] == -1).all()
    np.testing.assert_array_equal(out[:, 1:, :], a[:, :, 0:5])
    np.testing.assert_allclose(world(out_aff, [0, 1, 0]), world(aff, [0, 0, 0]))


# -- command line -----------------------------------------------------------------------------
def test_cli_prepares_and_verifies(tmp_path):
    raw = make_cmr_raw(tmp_path / "raw", patients=(1,), unlabelled=())
    out = tmp_path / "CMR"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "tools/prepare_dataset.py"), "--dataset", "cmr", "--raw", str(raw),
           "--out", str(out), "--no-supervoxels", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "image_1.nii.gz" in r.stdout and "checksums.sha256" in r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "1 already prepared" in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "tools/prepare_dataset.py"), "--verify", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout
    (out / "cmr_MR_normalized/label_1.nii.gz").write_bytes(b"broken")
    r = subprocess.run([sys.executable, str(REPO / "tools/prepare_dataset.py"), "--verify", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "label_1.nii.gz: checksum differs" in r.stdout + r.stderr
    r = subprocess.run([sys.executable, str(REPO / "tools/prepare_dataset.py"), "--dataset", "chaos",
                        "--raw", str(raw), "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and "no CHAOS MR patients" in r.stderr


def test_parallel_workers_write_the_same_files(tmp_path):
    raw = make_cmr_raw(tmp_path / "raw", patients=(1, 2, 4), unlabelled=())
    one = prep.prepare_dataset("cmr", raw, tmp_path / "one", progress=False, supervoxels=False)
    two = prep.prepare_dataset("cmr", raw, tmp_path / "two", progress=False, supervoxels=False, workers=2)
    assert (one / "checksums.sha256").read_text() == (two / "checksums.sha256").read_text()
    assert len((one / "checksums.sha256").read_text().splitlines()) == 3 * 2 + 2  # pairs, dataset.json, classmap


def test_help_names_the_datasets():
    r = subprocess.run([sys.executable, str(REPO / "tools/prepare_dataset.py"), "--help"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0 and "--dataset {sabs,chaos,cmr}" in r.stdout and "--verify" in r.stdout
