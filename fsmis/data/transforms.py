"""In-plane resizing, resampling and crop/pad of [Z, Y, X] or [H, W] arrays."""
from __future__ import annotations

import numpy as np
from skimage.transform import resize


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D (or [N, H, W]) mask to ``shape`` (H, W)."""
    mask = np.asarray(mask)
    out_shape = tuple(mask.shape[:-2]) + tuple(shape)
    return resize(mask.astype(np.float32), out_shape, order=0, anti_aliasing=False,
                  preserve_range=True, mode="edge") > 0.5


def resize_image(image: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    out_shape = tuple(image.shape[:-2]) + tuple(shape)
    return resize(image, out_shape, order=order, anti_aliasing=False, preserve_range=True,
                  mode="edge").astype(np.float32)


def crop_or_pad(array: np.ndarray, shape: tuple[int, int], fill: float = 0.0):
    """Centre crop or pad the last two axes to ``shape``; returns (array, (y0, x0)) where
    (y0, x0) is the offset of the output's origin in the input (negative when padded)."""
    h, w = array.shape[-2:]
    th, tw = shape
    out = np.full(array.shape[:-2] + (th, tw), fill, dtype=array.dtype)
    y0 = (h - th) // 2
    x0 = (w - tw) // 2
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + th, h), min(x0 + tw, w)
    dy0, dx0 = sy0 - y0, sx0 - x0
    out[..., dy0:dy0 + sy1 - sy0, dx0:dx0 + sx1 - sx0] = array[..., sy0:sy1, sx0:sx1]
    return out, (y0, x0)


def uncrop_or_unpad(array: np.ndarray, original_shape: tuple[int, int], offset: tuple[int, int],
                    fill: float = 0.0) -> np.ndarray:
    """Inverse of :func:`crop_or_pad`: place ``array`` back on a grid of ``original_shape``."""
    h, w = original_shape
    th, tw = array.shape[-2:]
    y0, x0 = offset
    out = np.full(array.shape[:-2] + (h, w), fill, dtype=array.dtype)
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + th, h), min(x0 + tw, w)
    out[..., sy0:sy1, sx0:sx1] = array[..., sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
    return out
