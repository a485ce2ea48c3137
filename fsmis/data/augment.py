"""Training augmentation of one 2D slice and its mask(s) (docs/protocol.md §5).

One calling convention for every transform::

    image, masks = transform(image, masks, rng)

``image`` is a float [H, W] array, ``masks`` a list of [H, W] arrays (possibly empty), ``rng``
a :class:`numpy.random.Generator`. Geometric transforms move image and masks with the same
drawn parameters: the image with linear interpolation (order 1), masks with nearest
neighbour (order 0) so they keep their values. Every random number comes from ``rng``: no
global state, so an episode stream is reproducible from one seed.

Protocol defaults (:func:`default_augmentation`): affine (rotation ±5°, shift ±5 px, shear
±5°, scale 0.9–1.2), elastic (alpha 10, sigma 5), gamma 0.5–1.5, in that order.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


class Transform:
    """Base class: ``p`` is the probability that the transform is applied at a call.

    The coin for ``p`` is drawn only when ``p < 1`` so that the default transforms consume
    exactly their own random numbers.
    """

    p: float = 1.0

    def __call__(self, image: np.ndarray, masks=None, rng: np.random.Generator | None = None):
        masks = [] if masks is None else list(masks)
        if rng is None:
            raise ValueError(f"{type(self).__name__}: pass an explicit numpy Generator (rng); no global random state is used")
        if self.p < 1.0 and rng.random() >= self.p:
            return image, masks
        return self.apply(np.asarray(image), [np.asarray(m) for m in masks], rng)

    def apply(self, image, masks, rng):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _check_2d(image: np.ndarray, masks: list) -> None:
    if image.ndim != 2:
        raise ValueError(f"augmentation works on one 2D slice [H, W]; got image shape {image.shape}")
    for m in masks:
        if m.shape != image.shape:
            raise ValueError(f"mask shape {m.shape} differs from image shape {image.shape}")


class RandomAffine(Transform):
    """Random rotation, shift, shear and isotropic scale about the slice centre.

    ``rotation`` and ``shear`` in degrees (uniform in ±value), ``shift`` in pixels (uniform in
    ±value along each axis), ``scale`` a (low, high) range. Pixels mapped from outside the
    slice take the nearest edge value (``mode="nearest"``) in image and masks alike, so image
    and mask stay consistent at the border and no artificial intensity is introduced.
    """

    def __init__(self, rotation: float = 5.0, shift: float = 5.0, shear: float = 5.0,
                 scale: tuple[float, float] = (0.9, 1.2), mode: str = "nearest", p: float = 1.0):
        self.rotation = float(rotation)
        self.shift = float(shift)
        self.shear = float(shear)
        self.scale = (float(scale[0]), float(scale[1]))
        self.mode = mode
        self.p = float(p)

    def draw(self, rng: np.random.Generator) -> dict:
        return {
            "rotation": rng.uniform(-self.rotation, self.rotation),
            "shift": rng.uniform(-self.shift, self.shift, size=2),
            "shear": rng.uniform(-self.shear, self.shear),
            "scale": rng.uniform(*self.scale),
        }

    @staticmethod
    def matrix(params: dict) -> np.ndarray:
        """Forward 2x2 matrix in (row, col) coordinates: rotation @ shear @ scale."""
        t = np.deg2rad(params["rotation"])
        rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        shear = np.array([[1.0, np.tan(np.deg2rad(params["shear"]))], [0.0, 1.0]])
        return rot @ shear * params["scale"]

    def apply(self, image, masks, rng):
        _check_2d(image, masks)
        params = self.draw(rng)
        fwd = self.matrix(params)
        inv = np.linalg.inv(fwd)
        centre = (np.array(image.shape, float) - 1.0) / 2.0
        # out = fwd @ (in - c) + c + t  =>  in = inv @ out + (c - inv @ (c + t))
        offset = centre - inv @ (centre + params["shift"])
        image = ndimage.affine_transform(image, inv, offset=offset, order=1, mode=self.mode).astype(image.dtype, copy=False)
        masks = [ndimage.affine_transform(m, inv, offset=offset, order=0, mode=self.mode) for m in masks]
        return image, masks


class RandomElastic(Transform):
    """Elastic deformation (Simard et al.): a smoothed random displacement field.

    ``dy, dx = gaussian_filter(uniform(-1, 1, [H, W]), sigma) * alpha``, drawn FRESH from the
    ``rng`` passed at every call. One released FSMIS code builds its elastic transform
    with a fixed seed, so every "random" deformation is the same field; drawing from the
    caller's generator is the fix, and keeps episodes reproducible from the episode seed.
    """

    def __init__(self, alpha: float = 10.0, sigma: float = 5.0, mode: str = "nearest", p: float = 1.0):
        self.alpha = float(alpha)
        self.sigma = float(sigma)
        self.mode = mode
        self.p = float(p)

    def draw_field(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Displacement field [2, H, W] (rows, cols) in pixels."""
        return np.stack([
            ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, size=shape), self.sigma, mode="constant", cval=0.0) * self.alpha
            for _ in range(2)
        ])

    def apply(self, image, masks, rng):
        _check_2d(image, masks)
        field = self.draw_field(image.shape, rng)
        grid = np.indices(image.shape, dtype=np.float64)
        coords = grid + field
        image = ndimage.map_coordinates(image, coords, order=1, mode=self.mode).astype(image.dtype, copy=False)
        masks = [ndimage.map_coordinates(m, coords, order=0, mode=self.mode) for m in masks]
        return image, masks


class RandomGamma(Transform):
    """Gamma correction with gamma uniform in ``range``.

    Applied on the image rescaled to [0, 1] by its own min and max, then mapped back to the
    original range, so it works on z-scored, min-max or raw intensities alike. Masks are
    unchanged. A constant image is returned unchanged.
    """

    def __init__(self, range: tuple[float, float] = (0.5, 1.5), p: float = 1.0):  # noqa: A002 - protocol name
        self.range = (float(range[0]), float(range[1]))
        self.p = float(p)

    def apply(self, image, masks, rng):
        gamma = rng.uniform(*self.range)
        lo, hi = float(image.min()), float(image.max())
        if hi - lo <= 1e-8:
            return image, masks
        unit = (image.astype(np.float64) - lo) / (hi - lo)
        out = np.power(unit, gamma) * (hi - lo) + lo
        return out.astype(image.dtype, copy=False), masks


class Compose(Transform):
    """Apply transforms in order, threading the same ``rng`` through them."""

    def __init__(self, transforms, p: float = 1.0):
        self.transforms = list(transforms)
        self.p = float(p)

    def apply(self, image, masks, rng):
        for t in self.transforms:
            image, masks = t(image, masks, rng)
        return image, masks

    def __len__(self) -> int:
        return len(self.transforms)


RELEASED_ELASTIC_SEED = 2025
_RELEASED_FIELDS: dict = {}


def released_elastic_fields(shape: tuple[int, int], alpha: float = 10.0, sigma: float = 5.0,
                            seed: int = RELEASED_ELASTIC_SEED) -> np.ndarray:
    """The released SD-FSMIS loader's elastic fields [4, H, W]: image dx, image dy, label dx, label
    dy, in pixels. Its elastic transform seeds ``np.random.RandomState(2025)`` at every call (one
    fixed field for every episode) and draws the image's and the label's fields from the same
    stream one after the other, so image and label are warped by two different fields."""
    key = (tuple(int(v) for v in shape), float(alpha), float(sigma), int(seed))
    if key not in _RELEASED_FIELDS:
        rs = np.random.RandomState(seed)
        _RELEASED_FIELDS[key] = np.stack([
            ndimage.gaussian_filter(rs.rand(*key[0]) * 2 - 1, sigma, mode="reflect") * alpha for _ in range(4)])
    return _RELEASED_FIELDS[key]


class ReleasedElastic(Transform):
    """The released elastic transform (``data.augment_mode=released``): the fixed fields of
    :func:`released_elastic_fields`, sampled at (row + dy, col + dx) with reflection, the image
    linearly, masks by nearest neighbour. Draws no random number."""

    def __init__(self, alpha: float = 10.0, sigma: float = 5.0):
        self.alpha = float(alpha)
        self.sigma = float(sigma)

    def apply(self, image, masks, rng):
        _check_2d(image, masks)
        f = released_elastic_fields(image.shape, self.alpha, self.sigma)
        rows, cols = np.indices(image.shape, dtype=np.float64)
        image = ndimage.map_coordinates(image, [rows + f[1], cols + f[0]], order=1, mode="reflect").astype(
            image.dtype, copy=False)
        masks = [ndimage.map_coordinates(m, [rows + f[3], cols + f[2]], order=0, mode="reflect") for m in masks]
        return image, masks


class ReleasedGamma(Transform):
    """The released gamma (``data.augment_mode=released``): on u = (x + 1) / 2 clamped to [0, 1]
    (the released images are min-max normalised to [-1, 1]), y = u^gamma, back to 2y - 1; gamma
    uniform in ``range``. Masks unchanged."""

    def __init__(self, range: tuple[float, float] = (0.5, 1.5)):  # noqa: A002 - protocol name
        self.range = (float(range[0]), float(range[1]))

    def apply(self, image, masks, rng):
        gamma = rng.uniform(*self.range)
        u = np.clip((image.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)
        return (2.0 * np.power(u, gamma) - 1.0).astype(image.dtype, copy=False), masks


def released_augmentation() -> tuple[Compose, Transform]:
    """(geometric, intensity) transforms of the released loader, applied to independently drawn
    sides of an episode: affine (the protocol's ranges; out-of-slice pixels filled with 0) then the
    fixed elastic field; gamma on the [0, 1] rescaled image."""
    return (Compose([RandomAffine(rotation=5.0, shift=5.0, shear=5.0, scale=(0.9, 1.2), mode="constant"),
                     ReleasedElastic(alpha=10.0, sigma=5.0)]),
            ReleasedGamma(range=(0.5, 1.5)))


def default_augmentation() -> Compose:
    """The protocol's training augmentation (docs/protocol.md §5): affine, elastic, gamma."""
    return Compose([
        RandomAffine(rotation=5.0, shift=5.0, shear=5.0, scale=(0.9, 1.2)),
        RandomElastic(alpha=10.0, sigma=5.0),
        RandomGamma(range=(0.5, 1.5)),
    ])
