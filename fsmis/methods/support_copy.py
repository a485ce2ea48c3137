"""``support-copy``: each query slice gets the mask of its paired support slice.

The floor every method must beat, and a way to check the protocol by hand: its score depends
only on which support slice the protocol pairs with which query slice. With several support
slices (a K-shot support) the masks are combined by majority vote (mean >= 0.5).
"""
from __future__ import annotations

import numpy as np

from ..data.transforms import resize_mask
from .base import Predictor, register


class SupportCopy(Predictor):
    name = "support-copy"
    normalization = "none"

    def predict(self, support_images, support_masks, query_images):
        masks = np.asarray(support_masks, dtype=np.float32)
        mask = masks.mean(axis=0) >= 0.5 if masks.shape[0] > 1 else masks[0] > 0.5
        q, h, w = query_images.shape
        if mask.shape != (h, w):
            mask = resize_mask(mask, (h, w))
        return np.broadcast_to(mask, (q, h, w)).astype(np.uint8)


@register("support-copy")
def _build(config=None, checkpoint=None, **_):
    if checkpoint:
        raise ValueError("support-copy takes no checkpoint")
    return SupportCopy()
