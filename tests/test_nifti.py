"""fsmis.data.nifti: layouts (docs/protocol.md §2), spacing, save_like round trips and file errors."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from _volumes import (affine_from_codes, anatomy, ijk_to_zyx, mentions_shape, oblique_affine,
                      read_ijk, relayout_zyx, rotation, world, write_nifti, write_raw_nifti,
                      zyx_to_ijk)
from fsmis.data.nifti import DataError, check_pair, load_volume, obliquity, save_like

SHAPE = (6, 9, 11)  # [Z, Y, X]; stored (i, j, k) = (11, 9, 6)
SPACING_IJK = (0.8, 0.9, 3.0)
RAS = affine_from_codes("RAS", SPACING_IJK, origin=(-4.0, -3.0, 10.0))

# stored layouts of the same anatomy: (codes, perm, flips) in voxel (i, j, k) order
VARIANTS = {
    "LPS": ((0, 1, 2), (True, True, False)),
    "LAS": ((0, 1, 2), (True, False, False)),
    "RAI": ((0, 1, 2), (False, False, True)),
    "ARS": ((1, 0, 2), (False, False, False)),  # in-plane transpose
    "PLS": ((1, 0, 2), (True, True, False)),  # transpose + both in-plane flips
    "ALS": ((1, 0, 2), (False, True, False)),  # transpose + one flip (inverse != forward)
    "PLI": ((1, 0, 2), (True, True, True)),
}


@pytest.fixture
def ras_case(tmp_path):
    image, label = anatomy(SHAPE)
    ipath = write_nifti(tmp_path / "image_ras.nii.gz", image, RAS, dtype=np.float32)
    lpath = write_nifti(tmp_path / "label_ras.nii.gz", label, RAS, dtype=np.int16)
    return image, label, ipath, lpath


def _write_variant(tmp_path, codes, image, label, base_affine=RAS):
    perm, flips = VARIANTS[codes]
    img_v, aff_v = relayout_zyx(image, base_affine, perm, flips)
    lab_v, aff_l = relayout_zyx(label, base_affine, perm, flips)
    assert np.allclose(aff_v, aff_l)
    ipath = write_nifti(tmp_path / f"image_{codes}.nii.gz", img_v, aff_v, dtype=np.float32)
    lpath = write_nifti(tmp_path / f"label_{codes}.nii.gz", lab_v, aff_v, dtype=np.int16)
    return img_v, lab_v, aff_v, ipath, lpath


def test_helper_affines_have_the_named_codes():
    for codes in ("RAS", "LPS", "LAS", "PSR", "ARS", "LSP"):
        assert "".join(nib.aff2axcodes(affine_from_codes(codes, (1, 2, 3)))) == codes
    assert np.allclose(affine_from_codes("LPS", (1, 2, 3))[:3, :3], np.diag([-1, -2, 3]))
    obl = oblique_affine("PSR", (1.25, 1.25, 7.99), "z", 40)
    assert "".join(nib.aff2axcodes(obl)) == "PSR"
    assert obliquity(obl) == pytest.approx(40.0, abs=1e-6)
    for codes in VARIANTS:
        _, aff = relayout_zyx(np.zeros(SHAPE), RAS, *VARIANTS[codes])
        assert "".join(nib.aff2axcodes(aff)) == codes


@pytest.mark.parametrize("codes", sorted(VARIANTS))
def test_other_layout_loads_like_ras_with_ras_reference(tmp_path, ras_case, codes):
    image, label, _, _ = ras_case
    img_v, lab_v, aff_v, ipath, lpath = _write_variant(tmp_path, codes, image, label)
    assert img_v.shape != image.shape or not np.array_equal(img_v, image)  # stored differently

    vol = load_volume(ipath, reference_affine=RAS)
    lab = load_volume(lpath, reference_affine=RAS, role="label")
    np.testing.assert_array_equal(vol.array, image)
    np.testing.assert_array_equal(lab.array, label)
    assert vol.array.dtype == np.float32 and lab.array.dtype.kind == "i"
    assert vol.layout.kind == "axis-aligned"
    assert "".join(vol.layout.stored_codes) == codes
    assert not vol.layout.is_identity
    assert vol.stored_shape == img_v.shape[::-1]
    np.testing.assert_allclose(vol.stored_affine, aff_v)
    # the new affine is the reference grid's affine, and spacing is reported in (z, y, x)
    np.testing.assert_allclose(vol.affine, RAS, atol=1e-9)
    assert vol.spacing == pytest.approx((3.0, 0.9, 0.8))
    check_pair(vol, lab)  # same file geometry: no error


@pytest.mark.parametrize("codes", sorted(VARIANTS))
def test_world_coordinates_of_every_voxel_are_kept(tmp_path, ras_case, codes):
    image, label, _, _ = ras_case
    img_v, _, aff_v, ipath, _ = _write_variant(tmp_path, codes, image, label)
    vol = load_volume(ipath, reference_affine=RAS)
    # every intensity is distinct: find each stored voxel in the loaded array by its value
    stored = zyx_to_ijk(img_v)  # (i, j, k) of the file
    loaded = zyx_to_ijk(vol.array)
    order = np.argsort(loaded.ravel())
    pos = order[np.searchsorted(loaded.ravel()[order], stored.ravel())]
    ijk_stored = np.stack(np.unravel_index(np.arange(stored.size), stored.shape), axis=1)
    ijk_loaded = np.stack(np.unravel_index(pos, loaded.shape), axis=1)
    np.testing.assert_array_equal(loaded.ravel()[pos], stored.ravel())
    np.testing.assert_allclose(world(vol.affine, ijk_loaded), world(aff_v, ijk_stored), atol=1e-6)


def test_ras_file_with_other_reference_takes_that_layout(tmp_path, ras_case):
    image, label, ipath, _ = ras_case
    img_v, _, aff_v, _, _ = _write_variant(tmp_path, "PLS", image, label)
    vol = load_volume(ipath, reference_affine=aff_v)
    np.testing.assert_array_equal(vol.array, img_v)
    np.testing.assert_allclose(vol.affine, aff_v, atol=1e-9)


def test_without_reference_or_with_own_reference_reads_as_stored(tmp_path, ras_case):
    image, label, ipath, _ = ras_case
    img_v, _, aff_v, vpath, _ = _write_variant(tmp_path, "LPS", image, label)
    for path, arr, aff in ((ipath, image, RAS), (vpath, img_v, aff_v)):
        for ref in (None, aff):
            vol = load_volume(path, reference_affine=ref)
            np.testing.assert_array_equal(vol.array, arr)
            assert vol.layout.is_identity
            np.testing.assert_allclose(vol.affine, aff)


def test_slightly_rotated_lps_is_axis_aligned_and_flipped(tmp_path):
    image, _ = anatomy(SHAPE)
    ras10 = RAS.copy()
    ras10[:3, :3] = rotation("x", 10) @ RAS[:3, :3]
    img_v, aff_v = relayout_zyx(image, ras10, (0, 1, 2), (True, True, False))
    path = write_nifti(tmp_path / "rot10_lps.nii.gz", img_v, aff_v)
    vol = load_volume(path, reference_affine=ras10)
    assert vol.layout.kind == "axis-aligned"
    assert vol.layout.obliquity_deg == pytest.approx(10.0, abs=1e-4)
    np.testing.assert_array_equal(vol.array, image)
    np.testing.assert_allclose(vol.affine, ras10, atol=1e-9)


@pytest.mark.parametrize("perm,flips,codes", [
    ((0, 2, 1), (False, False, False), "RSA"),  # slices along A instead of S
    ((2, 1, 0), (False, False, False), "SAR"),  # slices along R
    ((0, 2, 1), (True, False, True), "LSP"),
])
def test_slice_axis_along_another_world_axis_is_refused(tmp_path, perm, flips, codes):
    image, _ = anatomy(SHAPE)
    img_v, aff_v = relayout_zyx(image, RAS, perm, flips)
    assert "".join(nib.aff2axcodes(aff_v)) == codes
    path = write_nifti(tmp_path / f"other_axis_{codes}.nii.gz", img_v, aff_v)
    with pytest.raises(DataError) as exc:
        load_volume(path, reference_affine=RAS)
    assert f"other_axis_{codes}.nii.gz" in str(exc.value)
    # alone (no reference) it is read as stored
    np.testing.assert_array_equal(load_volume(path).array, img_v)


@pytest.mark.parametrize("codes,axis,deg", [("PSR", "z", 40.0), ("PSR", "x", 35.0), ("LSP", "z", 44.0)])
def test_oblique_volume_is_used_exactly_as_stored(tmp_path, codes, axis, deg):
    image, label = anatomy(SHAPE)
    aff = oblique_affine(codes, (1.25, 1.25, 7.99), axis, deg, origin=(95.0, 212.0, -131.0))
    assert "".join(nib.aff2axcodes(aff)) == codes
    ipath = write_nifti(tmp_path / f"image_{codes}.nii.gz", image, aff, dtype=np.float64)
    lpath = write_nifti(tmp_path / f"label_{codes}.nii.gz", label, aff, dtype=np.float64)
    other_oblique = oblique_affine("LSP", (1.25, 1.25, 7.99), "z", 35.0)
    for ref in (None, RAS, affine_from_codes("LPS"), other_oblique, aff):
        vol = load_volume(ipath, reference_affine=ref)
        lab = load_volume(lpath, reference_affine=ref, role="label")
        assert vol.layout.kind == "oblique"
        assert vol.layout.obliquity_deg == pytest.approx(deg, abs=1e-4)
        assert tuple(vol.layout.stored_codes) == tuple(codes)
        assert vol.layout.is_identity
        np.testing.assert_array_equal(vol.array, image)  # no flip, no transpose
        np.testing.assert_array_equal(lab.array, label)
        np.testing.assert_allclose(vol.affine, aff)
        assert vol.spacing == pytest.approx((7.99, 1.25, 1.25), abs=1e-5)
        assert vol.shape == SHAPE


def test_axis_aligned_volume_with_oblique_reference_is_read_as_stored(tmp_path):
    image, _ = anatomy(SHAPE)
    img_v, aff_v = relayout_zyx(image, RAS, (0, 1, 2), (True, True, False))
    path = write_nifti(tmp_path / "lps.nii.gz", img_v, aff_v)
    vol = load_volume(path, reference_affine=oblique_affine("PSR", (1, 1, 1), "z", 40))
    np.testing.assert_array_equal(vol.array, img_v)
    assert vol.layout.is_identity


def test_spacing_is_reported_in_zyx_order(tmp_path):
    image = np.zeros((4, 5, 6), np.float32)
    aff = affine_from_codes("RAS", (0.5, 0.7, 2.5))
    path = write_nifti(tmp_path / "ras.nii.gz", image, aff)
    assert load_volume(path).spacing == pytest.approx((2.5, 0.7, 0.5))
    # stored ARS (i along A with 0.7 mm, j along R with 0.5 mm)
    img_v, aff_v = relayout_zyx(image, aff, (1, 0, 2), (False, False, False))
    assert img_v.shape == (4, 6, 5)
    vpath = write_nifti(tmp_path / "ars.nii.gz", img_v, aff_v)
    assert load_volume(vpath).spacing == pytest.approx((2.5, 0.5, 0.7))
    back = load_volume(vpath, reference_affine=aff)
    assert back.shape == (4, 5, 6)
    assert back.spacing == pytest.approx((2.5, 0.7, 0.5))


@pytest.mark.parametrize("codes", ["LPS", "PLS", "ALS", "PLI", "RAI"])
def test_save_like_writes_back_on_the_stored_grid(tmp_path, ras_case, codes):
    image, label, _, _ = ras_case
    img_v, lab_v, aff_v, ipath, lpath = _write_variant(tmp_path, codes, image, label)
    vol = load_volume(ipath, reference_affine=RAS)
    assert not vol.layout.is_identity

    # the loaded label map written back reproduces the stored label file exactly
    out = save_like(label, vol, tmp_path / "out" / "mask.nii.gz", dtype=np.int16)
    data, aff = read_ijk(out)
    assert data.shape == vol.stored_shape
    np.testing.assert_allclose(aff, aff_v, atol=1e-5)
    np.testing.assert_array_equal(data, zyx_to_ijk(lab_v))

    # an arbitrary mask on the loaded grid, mapped back by hand
    rng = np.random.default_rng(3)
    mask = (rng.random(SHAPE) > 0.5).astype(np.uint8) * 7
    out2 = save_like(mask, vol, tmp_path / "mask2.nii.gz")
    data2, aff2 = read_ijk(out2)
    perm, flips = VARIANTS[codes]
    expected, _ = relayout_zyx(mask, RAS, perm, flips)
    np.testing.assert_array_equal(data2, zyx_to_ijk(expected))
    np.testing.assert_allclose(aff2, aff_v, atol=1e-5)
    assert data2.dtype == np.uint8


def test_save_like_lps_by_hand(tmp_path, ras_case):
    """LPS loaded with an RAS reference: the written file is the mask flipped on x and y."""
    image, label, _, _ = ras_case
    _, _, aff_v, ipath, _ = _write_variant(tmp_path, "LPS", image, label)
    vol = load_volume(ipath, reference_affine=RAS)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2, 1, 3] = 1  # z=2, y=1, x=3
    out = save_like(mask, vol, tmp_path / "pred.nii.gz")
    data, aff = read_ijk(out)
    nx, ny = SHAPE[2], SHAPE[1]
    assert data.shape == (nx, ny, SHAPE[0])
    assert list(zip(*np.nonzero(data))) == [(nx - 1 - 3, ny - 1 - 1, 2)]
    np.testing.assert_allclose(aff, aff_v, atol=1e-5)
    # and that voxel is at the same world point as (x=3, y=1, z=2) of the RAS grid
    np.testing.assert_allclose(world(aff, (nx - 1 - 3, ny - 1 - 1, 2)), world(RAS, (3, 1, 2)), atol=1e-5)


def test_save_like_identity_and_wrong_shape(tmp_path, ras_case):
    image, label, ipath, _ = ras_case
    vol = load_volume(ipath)
    out = save_like(label, vol, tmp_path / "same.nii.gz", dtype=np.int16)
    data, aff = read_ijk(out)
    np.testing.assert_array_equal(ijk_to_zyx(data), label)
    np.testing.assert_allclose(aff, RAS, atol=1e-5)
    with pytest.raises(ValueError):
        save_like(label[:-1], vol, tmp_path / "bad.nii.gz")


# -- errors ----------------------------------------------------------------------------------------
def test_image_label_shape_mismatch_names_both_files_and_shapes(tmp_path):
    image, label = anatomy(SHAPE)
    ipath = write_nifti(tmp_path / "image_17.nii.gz", image, RAS)
    lpath = write_nifti(tmp_path / "label_17.nii.gz", label[:-1], RAS, dtype=np.int16)
    img, lab = load_volume(ipath), load_volume(lpath, role="label")
    with pytest.raises(DataError) as exc:
        check_pair(img, lab)
    msg = str(exc.value)
    assert "image_17.nii.gz" in msg and "label_17.nii.gz" in msg
    assert mentions_shape(msg, (11, 9, 6)), msg
    assert mentions_shape(msg, (11, 9, 5)), msg


def test_image_label_different_affines(tmp_path):
    image, label = anatomy(SHAPE)
    shifted = RAS.copy()
    shifted[:3, 3] += (5.0, 0.0, 0.0)
    ipath = write_nifti(tmp_path / "image_4.nii.gz", image, RAS)
    lpath = write_nifti(tmp_path / "label_4.nii.gz", label, shifted, dtype=np.int16)
    with pytest.raises(DataError) as exc:
        check_pair(load_volume(ipath), load_volume(lpath, role="label"))
    assert "image_4.nii.gz" in str(exc.value) and "label_4.nii.gz" in str(exc.value)
    # a flipped label of the same grid extent is a different geometry too
    _, aff_v = relayout_zyx(label, RAS, (0, 1, 2), (True, True, False))
    lpath2 = write_nifti(tmp_path / "label_5.nii.gz", label, aff_v, dtype=np.int16)
    with pytest.raises(DataError, match="label_5.nii.gz"):
        check_pair(load_volume(ipath), load_volume(lpath2, role="label"))


def test_non_integer_labels_are_refused(tmp_path):
    label = np.zeros(SHAPE, np.float32)
    label[1, 2, 3] = 1.5
    path = write_nifti(tmp_path / "label_frac.nii.gz", label, RAS, dtype=np.float32)
    with pytest.raises(DataError) as exc:
        load_volume(path, role="label")
    assert "label_frac.nii.gz" in str(exc.value)
    assert "1.5" in str(exc.value)
    # integral float labels (the published float64 label files) are fine
    ok = write_nifti(tmp_path / "label_ok.nii.gz", np.where(label > 0, 2.0, 0.0), RAS, dtype=np.float64)
    lab = load_volume(ok, role="label")
    assert lab.array.dtype.kind == "i" and lab.array[1, 2, 3] == 2 and lab.array.sum() == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_intensities_are_refused(tmp_path, bad):
    image, _ = anatomy(SHAPE)
    image[0, 0, 0] = bad
    path = write_nifti(tmp_path / "image_nan.nii.gz", image, RAS, dtype=np.float32)
    with pytest.raises(DataError, match="image_nan.nii.gz"):
        load_volume(path)


def test_nan_in_label_is_refused(tmp_path):
    label = np.zeros(SHAPE, np.float32)
    label[0, 0, 0] = np.nan
    path = write_nifti(tmp_path / "label_nan.nii.gz", label, RAS, dtype=np.float32)
    with pytest.raises(DataError, match="label_nan.nii.gz"):
        load_volume(path, role="label")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="image_404.nii.gz"):
        load_volume(tmp_path / "image_404.nii.gz")


def test_unreadable_file(tmp_path):
    path = tmp_path / "image_junk.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(DataError, match="image_junk.nii.gz"):
        load_volume(path)


@pytest.mark.parametrize("shape", [(7, 8), (7, 8, 5, 2)])
def test_non_3d_file_is_refused(tmp_path, shape):
    path = write_raw_nifti(tmp_path / "image_nd.nii.gz", np.ones(shape, np.float32), np.eye(4))
    with pytest.raises(DataError, match="image_nd.nii.gz"):
        load_volume(path)


def test_4d_with_one_frame_is_a_3d_volume(tmp_path):
    image, _ = anatomy(SHAPE)
    path = write_raw_nifti(tmp_path / "image_4d1.nii.gz", zyx_to_ijk(image)[..., None], RAS)
    vol = load_volume(path)
    assert vol.shape == SHAPE
    np.testing.assert_array_equal(vol.array, image)
