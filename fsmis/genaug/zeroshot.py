"""A zero-shot support: a mask, and no annotated image (docs/generative-augmentation.md, use (c)).

The support image is generated from a mask (of another patient, another modality or an atlas)
in the QUERY's modality, by a generator trained label-free on that modality; the mask is the
support mask. As implemented:

- **Conditioning.** Each support slice is generated for the binary union of every labelled class
  in the mask slice (as ``tools/synthesize.py`` conditions its cases: the image shows the whole
  anatomy the mask knows, not the one organ alone), with the query's modality token and the
  class token dropped. The support mask is the one class to segment.
- **Intensities.** The generated slices ([-1, 1]) are normalised as one volume with the
  predictor's normalisation (``minmax`` keeps them, ``zscore`` standardises them).
- **Randomness.** Sampling is seeded by ``seed`` and a CRC32 of the conditioning masks' bytes:
  the same mask gives the same support image.
- **The evaluator** (``test.py --support-from-mask-of DIR --generator RUN``, :class:`MaskSupportSource`):
  fold k's support mask is fold k's support case of DIR under the same fold protocol (fold 0's
  for an explicit ``--support-case`` run); the support slices are chosen from that case's class
  slices exactly as from a real support (EP1 percentages). The class is looked up by name in
  DIR. Pixel spacing is not matched: the mask's pixels are used as stored (both phantoms and the
  published abdominal sets share their in-plane size). The results record
  ``"support_from_mask": "<DIR's dataset name>"`` in the protocol block.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..data.nifti import DataError


class MaskSupportGenerator:
    """Images from masks, by a generator run, in one modality: the one mask-to-image path of the
    test-time uses (this zero-shot support, and the variants of :class:`fsmis.genaug.support.SyntheticSupport`).

    ``modality`` is the modality token (None: no token); it must be one the generator knows.
    Sampling is seeded by ``seed``, a CRC32 of the masks' bytes and a ``salt`` naming the use, and
    its output is cached under a SHA-1 of the masks (with their shape and the salt): the evaluator
    asks for the same support once per query volume, and it is generated once.
    """

    def __init__(self, generator_run, modality: str | None, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, device=None):
        from .synthesize import load_generator

        self.loaded = load_generator(generator_run, device)
        mcfg = self.loaded.cfg.model
        if modality is not None and modality not in mcfg.modalities:
            raise ValueError(f"{self.loaded.run_dir}: the generator knows the modalities {list(mcfg.modalities)}, not "
                             f"{modality!r}")
        self.modality = modality
        self.seed = int(seed)
        self.steps = int(steps or mcfg.sample_steps)
        self.guidance = float(mcfg.guidance if guidance is None else guidance)
        self._cache: dict = {}
        self.generated = 0  # slices sampled (cache misses), for tests and logs

    def generate(self, masks: np.ndarray, salt: int) -> np.ndarray:
        """[n, H, W] binary conditioning masks -> [n, H, W] float32 generated images in [-1, 1]."""
        import hashlib

        import torch

        masks = (np.asarray(masks) > 0.5).astype(np.uint8)
        data = np.ascontiguousarray(masks).tobytes()
        ckey = (hashlib.sha1(data).hexdigest(), masks.shape, int(salt))
        if ckey not in self._cache:
            key = zlib.crc32(data)
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, key, int(salt)])
                                                    .generate_state(1)[0]))
            fake = self.loaded.method.generate(masks.astype(np.float32), self.modality, None, gen, steps=self.steps,
                                               guidance=self.guidance)
            self._cache[ckey] = np.asarray(fake, dtype=np.float32)
            self.generated += int(masks.shape[0])
        return self._cache[ckey].copy()

    def images(self, union_masks: np.ndarray, normalization: str) -> np.ndarray:
        """[n, H, W] binary conditioning masks -> [n, H, W] float32 support images, normalised."""
        from ..data.normalize import normalize_volume

        return normalize_volume(self.generate(union_masks, salt=2), normalization).astype(np.float32)

    def describe(self) -> dict:
        return {"generator": str(self.loaded.run_dir), "generator_step": self.loaded.step,
                "modality_token": self.modality, "sample_steps": self.steps, "guidance": self.guidance,
                "seed": self.seed}


class MaskSupportSource:
    """The evaluator's support of each fold and class from the masks of another dataset."""

    def __init__(self, mask_data, generator: MaskSupportGenerator):
        from ..data.datasets import open_dataset

        self.ds = open_dataset(mask_data)
        self.generator = generator
        self.name = self.ds.name
        self._cache: dict = {}
        self.used: dict = {}  # fold -> mask case

    def mask_case(self, fold_index: int, protocol: str, supp_idx: int, n_folds: int) -> str:
        from ..data.folds import make_folds

        folds = make_folds(self.ds.case_ids, protocol, supp_idx, n_folds)
        return folds[fold_index if 0 <= fold_index < len(folds) else 0].support

    def support(self, fold_index: int, cls: str, cfg, normalization: str):
        """(images [n, H, W], masks [n, H, W], slice indices, mask case) of class ``cls``."""
        from ..evaluation.protocol import support_slice_indices

        case = self.mask_case(fold_index, cfg.folds, cfg.supp_idx, cfg.n_folds)
        key = (case, cls, cfg.n_part, normalization)
        if key not in self._cache:
            if cls not in self.ds.classes:
                raise DataError(f"{self.ds.image_dir}: the mask dataset {self.name} has no class {cls!r} "
                                f"(classes: {', '.join(self.ds.classes)}); the support masks must name the same classes")
            lab = self.ds.load_case(case).label
            s_slices = self.ds.class_slices(case, cls)
            if len(s_slices) == 0:
                raise DataError(f"{self.ds.label_path(case)}: class {cls!r} is absent from the mask case {case}")
            s_idx = support_slice_indices(s_slices, cfg.n_part)
            masks = (lab[s_idx] == self.ds.class_id(cls)).astype(np.float32)
            known = list(self.ds.classes.values())
            union = np.isin(lab[s_idx], known).astype(np.float32)
            images = self.generator.images(union, normalization)
            self._cache[key] = (images, masks, [int(z) for z in s_idx], case)
        self.used[fold_index] = case
        return self._cache[key]

    def describe(self) -> dict:
        return {"dataset": self.name, "root": str(self.ds.image_dir), "mask_cases": {str(k): v for k, v in self.used.items()},
                **self.generator.describe()}


__all__ = ["MaskSupportGenerator", "MaskSupportSource"]
