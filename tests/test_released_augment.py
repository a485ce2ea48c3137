"""data.augment_mode=released: the fixed elastic fields (known answers of the released seed), the
image / label field mismatch, gamma on the [0, 1] rescaled image, the affine's zero fill, and the
geometric and intensity sides drawn independently."""
from __future__ import annotations

import numpy as np
import pytest

from fsmis.data.augment import (RandomAffine, ReleasedElastic, ReleasedGamma, Transform,
                                released_elastic_fields)


class Fixed:
    """A stand-in generator returning queued values from uniform()."""

    def __init__(self, *values):
        self.values = list(values)

    def uniform(self, a=0.0, b=1.0, size=None):
        return self.values.pop(0)


def test_released_elastic_fields_known_answers():
    f = released_elastic_fields((256, 256))
    assert f.shape == (4, 256, 256)
    assert f[0, 0, 0] == pytest.approx(-0.351675, abs=1e-6) and f[0, 128, 128] == pytest.approx(-0.143227, abs=1e-6)
    assert f[1, 0, 0] == pytest.approx(-0.097195, abs=1e-6) and f[1, 128, 128] == pytest.approx(0.583630, abs=1e-6)
    assert f[2, 0, 0] == pytest.approx(-1.387700, abs=1e-6) and f[3, 0, 0] == pytest.approx(-0.354443, abs=1e-6)
    assert np.abs(f[0]).max() == pytest.approx(1.3523, abs=1e-4)


def test_released_elastic_is_fixed_and_warps_image_and_label_differently():
    sq = np.zeros((256, 256), np.float32)
    sq[78:178, 78:178] = 1.0
    t = ReleasedElastic()
    img1, (lab1,) = t(sq * 2 - 1, [sq], np.random.default_rng(0))
    img2, (lab2,) = t(sq * 2 - 1, [sq], np.random.default_rng(1))
    assert np.array_equal(img1, img2) and np.array_equal(lab1, lab2)  # the same field whatever the seed
    assert int(((img1 > 0) != (lab1 > 0.5)).sum()) > 0  # two different fields for image and label


def test_released_gamma_known_answers():
    g = ReleasedGamma()
    x = np.array([[0.0, -1.0, 0.5]], np.float32)
    assert g(x, [], Fixed(2.0))[0][0, 0] == pytest.approx(-0.5)
    assert g(x, [], Fixed(0.5))[0][0, 0] == pytest.approx(0.414214, abs=1e-6)
    assert g(x, [], Fixed(1.5))[0][0, 1] == pytest.approx(-1.0)
    assert g(x, [], Fixed(1.5))[0][0, 2] == pytest.approx(0.299038, abs=1e-6)


def test_affine_fills_with_zero_as_released():
    img = np.full((16, 16), -1.0, np.float32)
    out, _ = RandomAffine(mode="constant")(img, [], Fixed(0.0, np.array([0.0, 5.0]), 0.0, 1.0))
    assert np.allclose(out[:, :5], 0.0) and np.allclose(out[:, 6:], -1.0)


class SetTo(Transform):
    def apply(self, image, masks, rng):
        return np.full_like(image, 1000.0), masks


class Add(Transform):
    def apply(self, image, masks, rng):
        return image + 10.0, masks


def test_geometric_and_intensity_sides_are_drawn_independently(tmp_path):
    from fsmis.data.datasets import open_dataset
    from fsmis.data.episodes import ConsecutiveSliceSampler
    from fsmis.data.phantom import make_phantom_dataset

    data = tmp_path / "ct"
    make_phantom_dataset(data, modality="ct", n_cases=3, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    ds = open_dataset(data)
    s = ConsecutiveSliceSampler(ds, ds.case_ids, min_fg_pixels=10, augment=SetTo(), augment_intensity=Add(),
                                normalization="none")
    combos = {}
    for ep in s.episodes(400, seed=0):
        sup, qry = ep.support_images[0], ep.query_images[0]
        if np.all(np.isin(sup, [1000.0, 1010.0])):  # the geometric side is the support
            key = ("support", "support" if sup[0, 0] == 1010.0 else "query")
        else:
            assert np.all(np.isin(qry, [1000.0, 1010.0]))  # exactly one side is transformed
            key = ("query", "query" if qry[0, 0] == 1010.0 else "support")
        combos[key] = combos.get(key, 0) + 1
    assert len(combos) == 4 and min(combos.values()) > 60  # every pairing of the two sides, about evenly


def test_augment_mode_released_reaches_the_sampler(tmp_path):
    from pathlib import Path

    from fsmis.config import load_config
    from fsmis.data.datasets import open_dataset
    from fsmis.data.phantom import make_phantom_dataset
    from fsmis.methods.episodic import make_sampler

    data = tmp_path / "ct"
    make_phantom_dataset(data, modality="ct", n_cases=3, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "sdfsmis_abd_mri_setting1.yaml", [f"data.root={data}", "data.augment_mode=released"])
    ds = open_dataset(data)
    s = make_sampler(cfg, ds, ds.case_ids)
    assert isinstance(s.augment_intensity, ReleasedGamma)
    assert any(isinstance(t, ReleasedElastic) for t in s.augment.transforms)
    assert "ReleasedGamma" in s.config()["augment_intensity"]
    plain = make_sampler(load_config(root / "configs" / "sdfsmis_abd_mri_setting1.yaml", [f"data.root={data}"]), ds,
                         ds.case_ids)
    assert plain.augment_intensity is None
