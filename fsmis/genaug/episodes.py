"""Synthetic support episodes in training (docs/generative-augmentation.md, use (a)).

``genaug.data`` names synthetic folders (written by ``tools/synthesize.py``, or filtered by
``tools/filter_synthetic.py``) made from the real training dataset; ``genaug.ratio`` is the
fraction of the training episodes drawn from them. As implemented:

- **Allocation.** Episode ``i`` of the run (counted over optimiser steps, micro-batches, ranks and
  the episodes of a micro-batch, in that order) is synthetic when ``floor((i + 1) r)`` exceeds
  ``floor(i r)``, with ``r`` the ratio as an exact fraction: every window of ``n`` consecutive
  episodes holds ``floor`` or ``ceil`` of ``n r`` synthetic ones, batch size 1 included, and the
  counts after ``s`` steps are known without replay (:func:`episode_counts`), so a resumed run
  counts exactly as an uninterrupted one. Ratio 0 draws exactly the episodes of a run without
  this section (the same random stream).
- **Pairing** (``genaug.pairing``):
  ``source``: a real training slice (the source case's slice ``z``) and the synthetic
  slice ``z`` of a case made from it, with one class (a supervoxel id, or a label) of at least
  ``data.min_fg_pixels`` pixels in both; which of the two is the support is drawn with p = 0.5.
  The edit moved the class between the two, so the pair teaches the mask transfer across a
  shape change the consecutive real slices rarely show.
  ``synthetic`` (default): the ADNet-family episode of the real data (consecutive slices, one
  class) drawn inside one synthetic case. It measured best on the phantom, seeds 0-4, unfiltered,
  ratio 0.25: median in-domain / cross-domain Dice 69.38 / 60.82 against 56.54 / 57.08 with
  ``source`` (docs/measurements/genaug_utility.md).
- **Cases.** A synthetic folder picks with probability proportional to its case count, then the
  sampler of that folder draws. A synthetic case whose source is not a training case of the fold
  (a test query, the validation case(s), or the legacy protocol's support) is refused, naming
  the case: training on it would leak that case into the model.
- **Filtered slices.** Slices listed in the folder's ``synthetic.excluded_slices`` (written by
  the filters) are never used, as Setting 2 removes slices.
- **Fingerprint.** Each folder's :func:`folder_fingerprint` (its dataset.json, which names the
  generator, the sources, the edits, the filter settings and the excluded slices, and the name and
  size of every file) goes into RUN/data.json; a run is never resumed, or reused as finished, on a
  folder whose contents changed since (a re-synthesized or re-filtered folder at the same path):
  fsmis.engine.runs.data_changes compares it, with the rest of the run's data identity.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from ..data.episodes import ConsecutiveSliceSampler, Episode, EpisodeError, _per_slice_counts

PAIRINGS = ("source", "synthetic")


def ratio_fraction(ratio: float) -> Fraction:
    """The ratio as the exact fraction the allocation uses (denominator at most 10000)."""
    return Fraction(float(ratio)).limit_denominator(10000)


def is_synthetic(index: int, ratio: Fraction) -> bool:
    """Whether episode ``index`` (0-based over the whole run) is drawn from the synthetic data."""
    return (index + 1) * ratio.numerator // ratio.denominator > index * ratio.numerator // ratio.denominator


def episode_counts(n_episodes: int, ratio: Fraction) -> dict:
    """{"real": N, "synthetic": M} of the first ``n_episodes`` episodes of a run."""
    syn = n_episodes * ratio.numerator // ratio.denominator
    return {"real": int(n_episodes - syn), "synthetic": int(syn)}


class GenaugError(ValueError):
    """A synthetic folder that cannot be used for this training (the message names it and why)."""


class _SourcePairSampler:
    """``pairing: source``: a real source slice and the synthetic slice of the same index."""

    def __init__(self, real: ConsecutiveSliceSampler, syn: ConsecutiveSliceSampler, sources: dict, tag: str):
        self.real, self.syn, self.sources, self.tag = real, syn, sources, tag
        self._pairs = None

    def _prepare(self):
        if self._pairs is not None:
            return
        lo = max(self.syn.min_fg_pixels, 1)
        pairs = {}
        for sid in self.syn.case_ids:
            src = self.sources[sid]
            if self.real.labels == "label":
                pool = self.syn.label_pool()
                s_ids, s_counts = _per_slice_counts(self.syn.class_map(sid), pool)
                r_ids, r_counts = _per_slice_counts(self.real.class_map(src), pool)
            else:
                s_ids, s_counts = _per_slice_counts(self.syn.class_map(sid))
                r_ids, r_counts = _per_slice_counts(self.real.class_map(src))
            common, si, ri = np.intersect1d(s_ids, r_ids, return_indices=True)
            if s_counts.shape[0] != r_counts.shape[0]:
                raise GenaugError(f"{self.tag}: synthetic case {sid} has {s_counts.shape[0]} slices, its source {src} "
                                  f"{r_counts.shape[0]}")
            ok = (s_counts[:, si] >= lo) & (r_counts[:, ri] >= lo)
            ok &= (self.syn.allowed(sid) & self.real.allowed(src))[:, None]
            zs, cs = np.nonzero(ok)
            if len(zs):
                pairs[sid] = (zs.astype(np.int64), common[cs].astype(np.int64))
        if not pairs:
            raise EpisodeError(f"{self.tag}: no (slice, class) with >= {lo} pixels in both a synthetic slice and its "
                               "source slice: no 'source' pairing episode possible (lower data.min_fg_pixels, or use "
                               "genaug.pairing=synthetic)")
        self._pairs = pairs
        self._usable = sorted(pairs, key=lambda c: self.syn.case_ids.index(c))

    def n_cases(self) -> int:
        return len(self.syn.case_ids)

    def sample(self, rng) -> Episode:
        self._prepare()
        sid = self._usable[int(rng.integers(len(self._usable)))]
        zs, cs = self._pairs[sid]
        k = int(rng.integers(len(zs)))
        z, class_id = int(zs[k]), int(cs[k])
        src = self.sources[sid]
        real_img = self.real.image(src)[z].copy()
        real_msk = (self.real.class_map(src)[z] == class_id).astype(np.float32)
        syn_img = self.syn.image(sid)[z].copy()
        syn_msk = (self.syn.class_map(sid)[z] == class_id).astype(np.float32)
        synthetic_support = bool(rng.random() < 0.5)
        items = [(syn_img, syn_msk, f"{self.tag}:{sid}"), (real_img, real_msk, src)]
        if not synthetic_support:
            items.reverse()
        target = None
        if self.real.augment is not None:
            target = self.real.augment_target
            if target == "random":
                target = "support" if rng.random() < 0.5 else "query"
            i = 0 if target == "support" else 1
            img, msk = self.real._augment(items[i][0], items[i][1], rng)
            items[i] = (img, msk, items[i][2])
        by_id = {v: k for k, v in self.syn.dataset.classes.items()}
        return Episode(
            support_images=items[0][0][None].astype(np.float32), support_masks=items[0][1][None].astype(np.float32),
            query_images=items[1][0][None].astype(np.float32), query_masks=items[1][1][None].astype(np.float32),
            case=f"{self.tag}:{sid}", class_source=self.real.labels, class_id=class_id, slices=(z, z),
            reversed=not synthetic_support, class_name=by_id.get(class_id) if self.real.labels == "label" else None,
            augmented=target, cases=(items[0][2], items[1][2]), synthetic=True)


class _SyntheticCaseSampler:
    """``pairing: synthetic``: the real data's episode drawn inside one synthetic case."""

    def __init__(self, syn: ConsecutiveSliceSampler, tag: str):
        self.syn, self.tag = syn, tag

    def n_cases(self) -> int:
        return len(self.syn.case_ids)

    def sample(self, rng) -> Episode:
        ep = self.syn.sample(rng)
        ep.case = f"{self.tag}:{ep.case}"
        ep.synthetic = True
        return ep


class SyntheticEpisodes:
    """The synthetic episode source of one training: every folder of ``genaug.data``, checked
    against the fold (see the module docstring).

    Args:
        folders: synthetic folders.
        real_sampler: the real training sampler (its dataset, cases and switches are reused).
        fold: the :class:`~fsmis.data.folds.Fold` trained on.
        val_cases: the held-out validation cases.
        pairing: ``"source"`` or ``"synthetic"``.
    """

    def __init__(self, folders, real_sampler: ConsecutiveSliceSampler, fold, val_cases, pairing: str = "synthetic"):
        from .quality import open_synthetic

        if pairing not in PAIRINGS:
            raise GenaugError(f"genaug.pairing={pairing!r} ({' | '.join(PAIRINGS)})")
        folders = [str(f) for f in folders]
        if not folders:
            raise GenaugError("genaug.ratio > 0 needs genaug.data: one or more synthetic folders "
                              "(tools/synthesize.py writes them)")
        real = real_sampler
        train = set(real.case_ids)
        self.pairing = pairing
        self.folders, self.samplers, self.facts = [], [], []
        for j, folder in enumerate(folders):
            pair = open_synthetic(real.dataset.input_root, folder)
            meta = pair.meta_path
            for sid, src in pair.sources.items():
                if src in train:
                    continue
                if src in fold.queries:
                    role = f"a test query of fold {fold.fold}"
                elif src in val_cases:
                    role = "a validation case of this training"
                elif src == fold.support:
                    role = f"the support case of fold {fold.fold}"
                else:
                    role = f"not a training case of fold {fold.fold}"
                raise GenaugError(f"{meta}: synthetic case {sid} was made from case {src}, {role}: training on it "
                                  f"would leak that case (training cases: {', '.join(sorted(train))}); make the "
                                  "synthetic folder from the fold's training cases only")
            if real.labels == "label" and not [c for c in pair.synthetic.classes if c not in real.test_classes]:
                raise GenaugError(f"{meta}: data.labels=label trains on the organs other than the test classes "
                                  f"{real.test_classes}, and this synthetic folder keeps only those "
                                  f"({', '.join(pair.synthetic.classes)}): use data.labels=supervoxel")
            syn = ConsecutiveSliceSampler(
                pair.synthetic, pair.synthetic.case_ids, n_shot=real.n_shot, setting=real.setting,
                exclusion=real.exclusion, test_classes=real.test_classes, labels=real.labels,
                min_fg_pixels=real.min_fg_pixels, augment=real.augment, augment_target=real.augment_target,
                normalization=real.normalization, seed=real.seed, max_retries=real.max_retries)
            tag = f"syn{j}"
            sampler = (_SourcePairSampler(real, syn, pair.sources, tag) if pairing == "source"
                       else _SyntheticCaseSampler(syn, tag))
            self.folders.append(Path(folder))
            self.samplers.append(sampler)
            excluded = pair.synthetic.excluded_slices
            self.facts.append({"folder": str(Path(folder).resolve()), "fingerprint": folder_fingerprint(folder),
                               "tag": tag, "cases": len(pair.synthetic.case_ids),
                               "generator": pair.generator,
                               "excluded_slices": int(sum(len(v) for v in excluded.values())),
                               "filter": pair.synthetic.synthetic_block.get("filter")})
        sizes = np.asarray([s.n_cases() for s in self.samplers], dtype=np.float64)
        self._p = sizes / sizes.sum()

    def sample(self, rng) -> Episode:
        j = int(rng.choice(len(self.samplers), p=self._p)) if len(self.samplers) > 1 else 0
        return self.samplers[j].sample(rng)

    def describe(self) -> dict:
        return {"pairing": self.pairing, "folders": self.facts}


def folder_fingerprint(folder) -> str:
    """sha256 of a synthetic folder's dataset.json and of the relative path and size of every file in it
    (cheap at any size: images are not read). Changes when the folder is synthesized or filtered again
    with other settings, or a case is added, removed or rewritten with another size."""
    import hashlib

    root = Path(folder)
    h = hashlib.sha256()
    meta = root / "dataset.json"
    h.update(meta.read_bytes() if meta.is_file() else b"")
    for f in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


__all__ = ["SyntheticEpisodes", "folder_fingerprint", "GenaugError", "episode_counts", "is_synthetic", "ratio_fraction", "PAIRINGS"]
