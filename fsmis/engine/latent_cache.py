"""Cache of the frozen VAE's posteriors for training episodes (``train.cache_latents``).

The VAE is frozen, so without augmentation and random shifts a training slice (or one class
mask of it) always encodes to the same posterior. The cache stores the posterior parameters
(mean and log-variance) of each slice image and each (slice, class) mask the first time an
episode uses it; later steps draw their latent samples from the stored parameters with the
step's generator, exactly as the uncached path draws them from a fresh encoding.

Each missing item is encoded on its own, so a cached value depends only on the item, never on
which batch first asked for it: a resumed run (whose cache starts empty) therefore continues
to the bit as the uninterrupted one. The cached and uncached paths agree to the floating-point
noise of batched vs single convolutions (tested).

Not valid with augmentation or shifts (every use of a slice differs): the trainer refuses the
switch then.
"""
from __future__ import annotations

import torch


def episode_keys(episodes) -> tuple[list, list, list, list]:
    """Cache keys of (support images, support masks, query images, query masks), in batch order."""
    s_img, s_msk, q_img, q_msk = [], [], [], []
    for e in episodes:
        if e.augmented is not None:
            raise ValueError("latent caching needs episodes without augmentation")
        k = e.n_shot
        cases = e.cases if e.cases is not None else (e.case,) * len(e.slices)
        for c, z in zip(cases[:k], e.slices[:k]):
            s_img.append((c, int(z)))
            s_msk.append((c, int(z), e.class_source, int(e.class_id)))
        for c, z in zip(cases[k:], e.slices[k:]):
            q_img.append((c, int(z)))
            q_msk.append((c, int(z), e.class_source, int(e.class_id)))
    return s_img, s_msk, q_img, q_msk


class LatentCache:
    """Posterior parameters of training images and masks, keyed by slice (and class)."""

    def __init__(self, model):
        self.model = model
        self.store: dict = {}
        self.encoded = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self.store)

    def posteriors(self, keys, images: torch.Tensor) -> torch.Tensor:
        """keys (one per row of ``images`` [N, 1, H, W] in [-1, 1]) -> parameters [N, 8, h, w]."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} keys for {images.shape[0]} images")
        rows = []
        for i, key in enumerate(keys):
            p = self.store.get(key)
            if p is None:
                p = self.model.encode_posterior(images[i : i + 1])[0]
                self.store[key] = p
                self.encoded += 1
            rows.append(p)
        self.lookups += len(keys)
        return torch.stack(rows)

    def batch_posteriors(self, batch, episodes) -> tuple:
        """The four parameter tensors of a collated batch, in the order ``SDFSMIS.loss`` takes."""
        ks, km, qs, qm = episode_keys(episodes)
        return (self.posteriors(ks, batch.support_images), self.posteriors(km, batch.support_masks * 2 - 1),
                self.posteriors(qs, batch.query_images), self.posteriors(qm, batch.query_masks * 2 - 1))

    def stats(self) -> dict:
        return {"items": len(self.store), "encoded": self.encoded, "lookups": self.lookups}


__all__ = ["LatentCache", "episode_keys"]
