"""What the episodic methods share: the fold's training and validation cases, the episode sampler,
the per-step episode stream and validation with the canonical evaluator."""
from __future__ import annotations

import numpy as np

from ..config import DataConfig
from ..engine.method import Method


def fold_split(cfg, dataset):
    """(fold, training cases, validation cases) of ``data.fold`` under ``data.protocol``."""
    from ..data.folds import make_folds, split_validation

    folds = make_folds(dataset.case_ids, cfg.data.protocol, cfg.data.supp_idx)
    if not 0 <= cfg.data.fold < len(folds):
        raise ValueError(f"data.fold={cfg.data.fold} out of range 0..{len(folds) - 1}")
    fold = folds[cfg.data.fold]
    train, val = split_validation(fold.train, fold.support, cfg.data.n_val)
    return fold, train, val


def make_sampler(cfg, dataset, train_cases, normalization: str = "minmax"):
    """The training episodes of ``data.sampler``: ``consecutive`` (ADNet family, SD-FSMIS: consecutive
    slices of one volume) or ``same_slice`` (SSL-ALPNet: two augmentations of one slice and one
    superpixel; needs data.augment and data.labels=supervoxel)."""
    from ..data.episodes import ConsecutiveSliceSampler, SameSliceSampler

    d = cfg.data
    n_shot = getattr(d, "n_shot", 1)
    if getattr(d, "sampler", "consecutive") == "same_slice":
        if not d.augment:
            raise ValueError("data.sampler=same_slice needs data.augment=true: support and query are two "
                             "augmentations of one slice")
        if d.labels != "supervoxel":
            raise ValueError("data.sampler=same_slice draws superpixels: it needs data.labels=supervoxel")
        return SameSliceSampler(dataset, train_cases, n_shot=n_shot, setting=d.setting, exclusion=d.exclusion,
                                min_fg_pixels=d.min_fg_pixels, augment="default", normalization=normalization,
                                seed=cfg.train.seed)
    augment, intensity = ("default" if d.augment else None), None
    if d.augment and getattr(d, "augment_mode", "protocol") == "released":
        from ..data.augment import released_augmentation

        augment, intensity = released_augmentation()
    return ConsecutiveSliceSampler(
        dataset, train_cases, n_shot=n_shot, setting=d.setting, exclusion=d.exclusion,
        labels=d.labels, min_fg_pixels=d.min_fg_pixels, augment_intensity=intensity,
        augment=augment, normalization=normalization, seed=cfg.train.seed,
        test_group=getattr(d, "test_group", None), test_group_ids=getattr(d, "test_group_ids", "names"),
        size_rule=getattr(d, "size_rule", "every"))


class EpisodicMethod(Method):
    """A method trained on episodes of one fold's training cases, validated with the canonical
    evaluator on held-out training cases (``data.n_val``)."""

    data_config = DataConfig
    normalization = "minmax"
    supports_genaug = True  # genaug.data / genaug.ratio: synthetic episodes (fsmis.genaug.episodes)
    genaug = None

    def setup_data(self) -> None:
        from ..data.datasets import open_dataset

        cfg = self.cfg
        if cfg.data.root is None:
            raise ValueError("data.root is not set (give data.root=DIR on the command line)")
        self.dataset = open_dataset(cfg.data.root, pseudolabels=getattr(cfg.data, "pseudolabels", None))
        self.fold, self.train_cases, self.val_cases = fold_split(cfg, self.dataset)
        self.sampler = make_sampler(cfg, self.dataset, self.train_cases, self.normalization)
        self.genaug = None
        if cfg.genaug.ratio > 0:
            from ..genaug.episodes import SyntheticEpisodes, ratio_fraction

            if getattr(cfg.data, "sampler", "consecutive") != "consecutive":
                raise ValueError("genaug.ratio > 0 draws synthetic episodes as the consecutive sampler does: "
                                 f"it needs data.sampler=consecutive (got {cfg.data.sampler})")

            self.genaug = SyntheticEpisodes(cfg.genaug.data, self.sampler, self.fold, self.val_cases,
                                            cfg.genaug.pairing)
            self._genaug_ratio = ratio_fraction(cfg.genaug.ratio)
        if self.val_cases:  # validation must not fail after the training steps
            absent = [c for c in self.dataset.test_classes if len(self.dataset.class_slices(self.fold.support, c)) == 0]
            if absent:
                raise ValueError(f"{self.dataset.label_path(self.fold.support)}: the fold's support case "
                                 f"{self.fold.support} has no {', '.join(absent)}: validation cannot pair it with "
                                 "the validation cases (choose another fold protocol / supp_idx, or data.n_val=0)")

    def describe_data(self) -> list[tuple[str, str]]:
        f = self.fold
        return [("dataset", f"{self.dataset.name} ({len(self.dataset.case_ids)} cases) at {self.cfg.data.root}"),
                (f"fold {f.fold}", f"support {f.support}, queries {list(f.queries)}"),
                ("training cases", f"{list(self.train_cases)}"), ("validation cases", f"{list(self.val_cases)}")] + (
            [("synthetic episodes", f"{self.cfg.genaug.ratio:g} of the episodes, pairing {self.genaug.pairing}, from "
              + ", ".join(f"{f['folder']} ({f['cases']} cases)" for f in self.genaug.facts))]
            if self.genaug is not None else [])

    def data_identity(self) -> dict:
        from pathlib import Path

        f = self.fold
        return {"name": self.dataset.name, "image_dir": str(Path(self.dataset.image_dir).resolve()),
                "cases": list(self.dataset.case_ids), "fold": f.fold, "support": f.support,
                "queries": list(f.queries), "train": list(self.train_cases), "validation": list(self.val_cases),
                **({"synthetic": [x["folder"] for x in self.genaug.facts],
                    "synthetic_fingerprints": {x["folder"]: x["fingerprint"] for x in self.genaug.facts}}
                   if self.genaug is not None else {})}

    def episodes(self, step: int, micro: int):
        """The episodes of micro-batch ``micro`` of step ``step``, from a generator seeded by (seed, step,
        micro, rank); with ``genaug.ratio`` > 0, episode i of the run is synthetic as
        :func:`fsmis.genaug.episodes.is_synthetic` says."""
        rng = np.random.default_rng([self.cfg.train.seed, step, micro, self.rank])
        b = self.cfg.train.batch_size
        if self.genaug is None:
            return [self.sampler.sample(rng) for _ in range(b)], rng
        from ..genaug.episodes import is_synthetic

        base = ((step * self.cfg.train.grad_accum + micro) * self.world + self.rank) * b
        return [self.genaug.sample(rng) if is_synthetic(base + j, self._genaug_ratio) else self.sampler.sample(rng)
                for j in range(b)], rng

    def episode_counts(self, steps: int) -> dict:
        """{"real": N, "synthetic": M}: the episodes of the first ``steps`` optimiser steps, every rank."""
        from ..genaug.episodes import episode_counts, ratio_fraction

        t = self.cfg.train
        n = int(steps) * t.grad_accum * self.world * t.batch_size
        return episode_counts(n, self._genaug_ratio if self.genaug is not None else ratio_fraction(0))

    def scalars(self, step: int) -> dict:
        c = self.episode_counts(step)
        return {"episodes/real": c["real"], "episodes/synthetic": c["synthetic"]}

    def summary_facts(self, step: int) -> dict:
        facts = {"episodes": self.episode_counts(step)}
        if self.genaug is not None:
            facts["genaug"] = {"ratio": self.cfg.genaug.ratio, **self.genaug.describe()}
        return facts

    def validate(self) -> float | None:
        if not self.val_cases:
            return None
        from ..evaluation.protocol import ProtocolConfig, evaluate

        res = evaluate(self.dataset, self.predictor(), ProtocolConfig(
            support_case=self.fold.support, query_cases=list(self.val_cases), support=self.cfg.eval.support,
            surface_metrics=False), progress=False)
        return res["mean_dice"]


__all__ = ["EpisodicMethod", "fold_split", "make_sampler"]
