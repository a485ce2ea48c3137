"""Test-time support enlargement (docs/generative-augmentation.md, use (b)).

:class:`SyntheticSupport` wraps any :class:`~fsmis.methods.base.Predictor` that accepts a K-shot
support: each real support slice gets ``m`` generated variants, so a 1-shot support reaches the
wrapped predictor as K = 1 + m slices. As implemented:

- **Variants.** Variant j of a support slice is its mask under one random in-plane edit (the edits
  of ``tools/synthesize.py``: elastic, scale, translate or rotate, about the mask's centroid;
  :func:`fsmis.genaug.synthesize.draw_edit`), and the generator's image for that edited mask in
  the support's own modality (the modality token of the evaluated dataset; class token dropped,
  as for synthetic cases). Masks that are empty stay unedited.
- **Intensities.** The generator's output in [-1, 1] is mapped linearly to the [min, max] of the
  real support slice as the predictor received it (already normalised per volume as the
  predictor asks), so the variants live on the real support's scale.
- **Randomness.** The edits are seeded by ``seed`` and a CRC32 of the support masks' bytes, the
  sampling noise by ``seed`` and a CRC32 of the edited masks: the same support gives the same
  variants in every run and every order of evaluation.
- **Generation** goes through :class:`fsmis.genaug.zeroshot.MaskSupportGenerator` (the one
  mask-to-image path), whose cache makes a support that the evaluator passes once per query
  volume generated once.
- **Record.** ``synthetic_support`` (m) is an attribute the evaluator copies into the results'
  protocol block, and :meth:`describe` names the generator run, steps and guidance: a K = 1 + m
  number can never pass for a plain 1-shot number.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..methods.base import Predictor

EDIT_TRIES = 10  # edits drawn per variant until the edited mask keeps some foreground


class SyntheticSupport(Predictor):
    """``base`` with ``m`` generated variants of each support slice added to its support."""

    def __init__(self, base: Predictor, generator_run, m: int, modality: str | None, seed: int = 0,
                 steps: int | None = None, guidance: float | None = None, device=None):
        from .zeroshot import MaskSupportGenerator

        if int(m) < 1:
            raise ValueError(f"synthetic support: m must be >= 1 variants per support slice, got {m}")
        self.base = base
        self.synthetic_support = int(m)
        self.generator = MaskSupportGenerator(generator_run, modality, seed=seed, steps=steps, guidance=guidance,
                                              device=device)
        self.seed = int(seed)
        self.name = base.name
        self.normalization = base.normalization

    def edited_masks(self, support_masks: np.ndarray) -> np.ndarray:
        """[K·m, H, W] float32: m random edits of each of the K support masks (seeded by the masks)."""
        from .synthesize import apply_edit, draw_edit, foreground_center

        masks = (np.asarray(support_masks) > 0.5).astype(np.uint8)
        key = zlib.crc32(np.ascontiguousarray(masks).tobytes())
        rng = np.random.default_rng([self.seed, key])
        edited = []
        for k in range(masks.shape[0]):
            vol = masks[k][None]
            for _ in range(self.synthetic_support):
                if not vol.any():
                    edited.append(vol[0].copy())
                    continue
                for _ in range(EDIT_TRIES):  # an edit may push a small mask out of the slice: draw again
                    new = apply_edit(vol, draw_edit(rng, vol.shape[-2:], foreground_center(vol)))[0]
                    if new.any():
                        break
                edited.append(new if new.any() else vol[0].copy())
        return np.stack(edited).astype(np.float32)

    def variants(self, support_images: np.ndarray, support_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images [K·m, H, W], masks [K·m, H, W]): the generated variants of the K support slices."""
        edited = self.edited_masks(support_masks)
        fake = self.generator.generate(edited, salt=1)
        imgs = np.asarray(support_images, dtype=np.float32)
        out = np.empty_like(fake)
        for k in range(imgs.shape[0]):
            lo, hi = float(imgs[k].min()), float(imgs[k].max())
            sl = slice(k * self.synthetic_support, (k + 1) * self.synthetic_support)
            out[sl] = lo + (fake[sl] + 1.0) / 2.0 * (hi - lo)
        return out, edited

    def predict(self, support_images, support_masks, query_images):
        extra_img, extra_msk = self.variants(support_images, support_masks)
        s_img = np.concatenate([np.asarray(support_images, np.float32), extra_img])
        s_msk = np.concatenate([np.asarray(support_masks, np.float32), extra_msk])
        return self.base.predict(s_img, s_msk, query_images)

    def describe(self) -> dict:
        return {**self.base.describe(), "synthetic_support": self.synthetic_support, **self.generator.describe()}


__all__ = ["SyntheticSupport"]
