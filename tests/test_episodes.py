"""Episode samplers, Setting-2 exclusion, normalisation and augmentation on a tiny synthetic dataset."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fsmis.data.augment import Compose, RandomAffine, RandomElastic, RandomGamma, default_augmentation
from fsmis.data.datasets import FSMISDataset
from fsmis.data.episodes import (ConsecutiveSliceSampler, EpisodeError, SameSliceSampler,
                                 excluded_slices)
from fsmis.data.normalize import global_stats, normalize_volume

LABELS = {"liver": 6, "spleen": 1, "left_kidney": 3, "right_kidney": 2}
Z, H, W = 10, 48, 48
# ground-truth slice contents: 0-1 none, 2-3 liver, 4-5 all four, 6 spleen, 7-9 none
ANY_ALL4 = {2, 3, 4, 5, 6}
ALL_ALL4 = {4, 5}


def _label_volume() -> np.ndarray:
    lab = np.zeros((Z, H, W), np.int16)
    lab[2:6, 2:22, 2:22] = LABELS["liver"]  # 400 px
    lab[4:7, 2:22, 26:46] = LABELS["spleen"]  # 400 px
    lab[4:6, 26:41, 2:17] = LABELS["left_kidney"]  # 225 px
    lab[4:6, 26:41, 26:41] = LABELS["right_kidney"]  # 225 px
    return lab


def _supervoxels() -> np.ndarray:
    sv = np.zeros((Z, H, W), np.int32)
    sv[:, 0:24, 0:24] = 1  # 576 px, every slice
    sv[0:5, 0:24, 24:48] = 2  # 576 px, slices 0-4
    sv[:, 24:36, 0:12] = 3  # 144 px: below min_fg = 200
    sv[5:10, 24:48, 24:48] = 4  # 576 px, slices 5-9
    return sv


def _save(a: np.ndarray, path, dtype) -> None:
    nib.save(nib.Nifti1Image(np.transpose(a, (2, 1, 0)).astype(dtype), np.eye(4)), str(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "modality": "CT", "labels": LABELS,
        "test_labels": ["liver", "spleen", "left_kidney", "right_kidney"], "supervoxels": "supervoxels_50",
    }))
    (root / "supervoxels_50").mkdir()
    rng = np.random.default_rng(123)
    for k, cid in enumerate(["0", "1", "2"]):
        lab = _label_volume()
        img = rng.normal(100.0 + 40 * k, 20.0, size=(Z, H, W)) + 30.0 * (lab > 0)
        _save(img, root / f"image_{cid}.nii.gz", np.float32)
        _save(lab, root / f"label_{cid}.nii.gz", np.int16)
        _save(_supervoxels(), root / "supervoxels_50" / f"superpix-MIDDLE_{cid}.nii.gz", np.int32)
    return FSMISDataset(root)


def _sampler(dataset, **kw):
    kw.setdefault("augment", None)
    return ConsecutiveSliceSampler(dataset, dataset.case_ids, **kw)


# -- Setting 2 exclusion ------------------------------------------------------------------------
def test_excluded_slices_any_vs_all(dataset):
    four = ["liver", "spleen", "left_kidney", "right_kidney"]
    assert excluded_slices(dataset, "0", four, "any") == ANY_ALL4
    assert excluded_slices(dataset, "0", four, "all") == ALL_ALL4
    assert excluded_slices(dataset, "0", None, "any") == ANY_ALL4  # default: dataset.test_classes
    assert excluded_slices(dataset, "0", ["liver"], "any") == {2, 3, 4, 5}
    assert excluded_slices(dataset, "0", ["liver"], "all") == {2, 3, 4, 5}
    assert excluded_slices(dataset, "0", ["liver", "spleen"], "all") == {4, 5}
    assert excluded_slices(dataset, "0", ["left_kidney", "right_kidney"], "any") == {4, 5}
    assert excluded_slices(dataset, "0", [6, 1], "any") == {2, 3, 4, 5, 6}  # ids accepted too
    assert excluded_slices(dataset, "0", [], "all") == set()
    with pytest.raises(ValueError):
        excluded_slices(dataset, "0", four, "some")


@pytest.mark.parametrize("mode,excluded", [("any", ANY_ALL4), ("all", ALL_ALL4)])
@pytest.mark.parametrize("n_shot", [1, 2])
def test_setting2_never_uses_excluded_slices_nor_crosses_them(dataset, mode, excluded, n_shot):
    s = _sampler(dataset, setting=2, exclusion=mode, n_shot=n_shot)
    seen = set()
    for ep in s.episodes(150, seed=3):
        assert not set(ep.slices) & excluded
        lo = min(ep.slices)
        assert sorted(ep.slices) == list(range(lo, lo + n_shot + 1))  # consecutive in original indexing
        seen.update(ep.slices)
    if mode == "any" and n_shot == 2:
        assert seen == {7, 8, 9}  # {0, 1} has no run of 3; (1, 7, 8) would cross the excluded block
    if mode == "any" and n_shot == 1:
        assert seen == {0, 1, 7, 8, 9}


# -- consecutive sampler ------------------------------------------------------------------------
@pytest.mark.parametrize("n_shot", [1, 3])
def test_consecutive_episodes_contain_class_in_every_slice(dataset, n_shot):
    s = _sampler(dataset, n_shot=n_shot)
    for ep in s.episodes(100, seed=0):
        assert ep.support_images.shape == (n_shot, H, W) and ep.support_masks.shape == (n_shot, H, W)
        assert ep.query_images.shape == (1, H, W) and ep.query_masks.shape == (1, H, W)
        for a in (ep.support_images, ep.support_masks, ep.query_images, ep.query_masks):
            assert a.dtype == np.float32
        assert ep.class_source == "supervoxel" and ep.augmented is None
        step = -1 if ep.reversed else 1
        assert list(ep.slices) == list(range(ep.slices[0], ep.slices[0] + step * (n_shot + 1), step))
        sv = dataset.load_case(ep.case, supervoxels=True).supervoxels
        masks = np.concatenate([ep.support_masks, ep.query_masks])
        assert set(np.unique(masks)) <= {0.0, 1.0}
        for m, z in zip(masks, ep.slices):
            np.testing.assert_array_equal(m, sv[z] == ep.class_id)
            assert m.sum() >= 200


def test_min_fg_respected_and_small_classes_allowed_when_lowered(dataset):
    ids = {ep.class_id for ep in _sampler(dataset).episodes(300, seed=1)}
    assert ids == {1, 2, 4}  # supervoxel 3 has 144 px per slice
    ids_low = {ep.class_id for ep in _sampler(dataset, min_fg_pixels=100).episodes(300, seed=1)}
    assert 3 in ids_low
    with pytest.raises(EpisodeError, match="no episode possible"):
        _sampler(dataset, min_fg_pixels=1000).sample(np.random.default_rng(0))


def test_reversal_about_half_the_time(dataset):
    eps = _sampler(dataset).episodes(400, seed=5)
    frac = np.mean([ep.reversed for ep in eps])
    assert 0.4 < frac < 0.6
    for ep in eps:
        assert (ep.slices[0] > ep.slices[-1]) == ep.reversed


def test_gt_label_mode_never_yields_a_test_class(dataset):
    s = _sampler(dataset, labels="label", test_classes=["liver", "spleen"])
    eps = s.episodes(100, seed=2)
    assert {ep.class_id for ep in eps} == {LABELS["left_kidney"], LABELS["right_kidney"]}
    for ep in eps:
        assert ep.class_source == "label" and ep.class_name in ("left_kidney", "right_kidney")
        assert sorted(ep.slices) == [4, 5]
        lab = dataset.load_case(ep.case).label
        np.testing.assert_array_equal(ep.query_masks[0], lab[ep.slices[-1]] == ep.class_id)
    # every organ is a test class: empty pool
    with pytest.raises(EpisodeError):
        _sampler(dataset, labels="label").sample(0)
    # Setting 2 removes slices 4-5, the only ones with the kidneys
    with pytest.raises(EpisodeError):
        _sampler(dataset, labels="label", test_classes=["liver", "spleen"], setting=2).sample(0)


def test_same_seed_same_episodes_different_seed_differs(dataset):
    s = ConsecutiveSliceSampler(dataset, dataset.case_ids)  # default augmentation, random target
    a, b, c = s.episodes(20, seed=7), s.episodes(20, seed=7), s.episodes(20, seed=8)
    for x, y in zip(a, b):
        assert x.describe() == y.describe()
        np.testing.assert_array_equal(x.support_images, y.support_images)
        np.testing.assert_array_equal(x.query_images, y.query_images)
        np.testing.assert_array_equal(x.support_masks, y.support_masks)
        np.testing.assert_array_equal(x.query_masks, y.query_masks)
    assert [x.describe() for x in a] != [x.describe() for x in c]
    # a second sampler built the same way, and the endless iterator, give the same stream
    s2 = ConsecutiveSliceSampler(dataset, dataset.case_ids, seed=7)
    it = iter(s2)
    for x in a[:5]:
        y = next(it)
        assert x.describe() == y.describe()
        np.testing.assert_array_equal(x.query_images, y.query_images)


@pytest.mark.parametrize("target", ["support", "query", "random"])
def test_augmentation_on_one_side_only(dataset, target):
    s = ConsecutiveSliceSampler(dataset, dataset.case_ids, n_shot=2, augment_target=target)
    sides = []
    for ep in s.episodes(40, seed=11):
        img, sv = s.image(ep.case), dataset.load_case(ep.case, supervoxels=True).supervoxels
        raw_sup = np.stack([img[z] for z in ep.slices[:2]])
        raw_qry = img[ep.slices[2]][None]
        sup_same = np.array_equal(ep.support_images, raw_sup)
        qry_same = np.array_equal(ep.query_images, raw_qry)
        assert sup_same != qry_same  # exactly one side augmented
        side = "query" if sup_same else "support"
        assert ep.augmented == side
        untouched_masks = ep.support_masks if side == "query" else ep.query_masks
        untouched_slices = ep.slices[:2] if side == "query" else ep.slices[2:]
        for m, z in zip(untouched_masks, untouched_slices):
            np.testing.assert_array_equal(m, sv[z] == ep.class_id)
        sides.append(side)
    if target == "random":
        assert 8 < sides.count("support") < 32
    else:
        assert set(sides) == {target}


def test_normalization_modes(dataset):
    raw = dataset.load_case("1").image
    z = _sampler(dataset).image("1")
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
    mm = _sampler(dataset, normalization="minmax").image("1")
    assert mm.min() == pytest.approx(-1) and mm.max() == pytest.approx(1)
    np.testing.assert_array_equal(_sampler(dataset, normalization="none").image("1"), raw.astype(np.float32))
    mean, std = global_stats(dataset, dataset.case_ids)
    allv = np.concatenate([dataset.load_case(c).image.ravel().astype(np.float64) for c in dataset.case_ids])
    assert mean == pytest.approx(allv.mean()) and std == pytest.approx(allv.std(), rel=1e-6)
    g = _sampler(dataset, normalization="global").image("1")
    np.testing.assert_allclose(g, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    assert np.all(normalize_volume(np.full((2, 3, 3), 5.0), "minmax") == 0)
    with pytest.raises(ValueError):
        normalize_volume(raw, "global")
    # episodes carry normalised slices
    ep = _sampler(dataset, normalization="minmax").sample(0)
    assert ep.query_images.min() >= -1 and ep.query_images.max() <= 1


# -- ALPNet sampler ------------------------------------------------------------------------------
def test_same_slice_sampler_two_augmentations_of_one_slice(dataset):
    s = SameSliceSampler(dataset, dataset.case_ids)
    for ep in s.episodes(20, seed=4):
        assert ep.slices[0] == ep.slices[1] and not ep.reversed and ep.augmented == "both"
        assert not np.array_equal(ep.support_images, ep.query_images)
        assert set(np.unique(ep.support_masks)) <= {0.0, 1.0} and ep.query_masks.sum() > 0
        assert ep.class_id != 3  # below min_fg
    # intensity-only augmentation: masks are exactly the slice's superpixel, images differ
    s = SameSliceSampler(dataset, dataset.case_ids, augment=Compose([RandomGamma()]))
    for ep in s.episodes(20, seed=4):
        sv = dataset.load_case(ep.case, supervoxels=True).supervoxels[ep.slices[0]]
        np.testing.assert_array_equal(ep.support_masks[0], sv == ep.class_id)
        np.testing.assert_array_equal(ep.query_masks[0], sv == ep.class_id)
        assert not np.array_equal(ep.support_images, ep.query_images)
    # identity augmentation: both views are the normalised slice itself
    s = SameSliceSampler(dataset, dataset.case_ids, augment=Compose([]))
    ep = s.sample(0)
    np.testing.assert_array_equal(ep.support_images[0], s.image(ep.case)[ep.slices[0]])
    np.testing.assert_array_equal(ep.query_images[0], ep.support_images[0])
    # Setting 2 'any': only slices 0, 1, 7, 8, 9 remain
    s = SameSliceSampler(dataset, dataset.case_ids, setting=2)
    assert {ep.slices[0] for ep in s.episodes(100, seed=0)} <= {0, 1, 7, 8, 9}
    with pytest.raises(ValueError):
        SameSliceSampler(dataset, dataset.case_ids, augment=None)


# -- augmentation -------------------------------------------------------------------------------
def test_elastic_field_is_fresh_each_call():
    el = RandomElastic(alpha=10, sigma=5)
    rng = np.random.default_rng(0)
    f1, f2 = el.draw_field((H, W), rng), el.draw_field((H, W), rng)
    assert f1.shape == (2, H, W) and not np.allclose(f1, f2)
    np.testing.assert_array_equal(f1, el.draw_field((H, W), np.random.default_rng(0)))  # reproducible
    img = np.random.default_rng(1).normal(size=(H, W)).astype(np.float32)
    strong = RandomElastic(alpha=300, sigma=5)
    rng = np.random.default_rng(2)
    a, _ = strong(img, [], rng)
    b, _ = strong(img, [], rng)
    assert not np.allclose(a, b)


def test_transforms_keep_masks_binary_and_are_reproducible():
    rng0 = np.random.default_rng(0)
    img = rng0.normal(size=(H, W)).astype(np.float32)
    mask = np.zeros((H, W), np.float32)
    mask[10:30, 12:34] = 1
    aug = default_augmentation()
    out1, (m1,) = aug(img, [mask], np.random.default_rng(9))
    out2, (m2,) = aug(img, [mask], np.random.default_rng(9))
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(m1, m2)
    assert out1.dtype == np.float32 and out1.shape == img.shape
    assert set(np.unique(m1)) <= {0.0, 1.0} and 0.6 * mask.sum() < m1.sum() < 1.6 * mask.sum()
    # identity affine returns the input
    ident = RandomAffine(rotation=0, shift=0, shear=0, scale=(1, 1))
    o, (m,) = ident(img, [mask], np.random.default_rng(0))
    np.testing.assert_allclose(o, img, atol=1e-5)
    np.testing.assert_array_equal(m, mask)
    # a pure shift moves image and mask together
    sh = RandomAffine(rotation=0, shift=5, shear=0, scale=(1, 1))
    _, (m,) = sh(img, [mask], np.random.default_rng(3))
    assert m.sum() == mask.sum() and not np.array_equal(m, mask)
    # gamma: same range, masks untouched
    g, (gm,) = RandomGamma((0.5, 1.5))(img, [mask], np.random.default_rng(0))
    assert g.min() == pytest.approx(img.min(), abs=1e-5) and g.max() == pytest.approx(img.max(), abs=1e-5)
    np.testing.assert_array_equal(gm, mask)
    with pytest.raises(ValueError):
        aug(img, [mask], None)  # no hidden global random state
