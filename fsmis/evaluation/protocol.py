"""The canonical FSMIS evaluator (docs/protocol.md §6–§7), one code path for every method.

EP1 with ``n_part = 3`` by default. For each fold and each test class c:

1. support slices: the C_s slices of the support case containing c; part i uses the slice
   at position ``int(pcts[i] * C_s)`` with
   ``pcts = [1/(2n) + i*(1 - 1/n)/(n - 1) for i in range(n)]`` (n = 1: [0.5]);
2. query: the C_q slices of the query case containing c, split into n consecutive chunks at
   ``floor(linspace(0, C_q, n + 1))``; chunk i is segmented with support slice i;
3. Dice = 2TP / (2TP + FP + FN) summed over the kept slices (a 3D Dice);
4. class score = mean over the fold's queries; fold score = mean over classes; reported
   number = mean over folds (± std over folds).

Switches (all written into ``results.json["protocol"]``): fold protocol canonical / legacy
(+ ``supp_idx``), chunking ``ep1`` / ``alpnet`` (equal-extent chunks over z_min..z_max, all
slices in that range predicted), support ``1shot`` / ``3shot`` (all parts as one support for
every chunk), headline Dice ``per_volume`` / ``pooled`` (both are always reported).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..data.datasets import FSMISDataset
from ..data.folds import Fold, make_folds
from ..data.nifti import DataError
from ..data.normalize import normalize_volume
from ..methods.base import Predictor
from .metrics import Counts, confusion, pooled_dice, released_slice_distances, surface_distances

PROTOCOL_VERSION = 1


@dataclass
class ProtocolConfig:
    folds: str = "canonical"  # canonical | legacy
    supp_idx: int = 2  # legacy folds only
    n_folds: int = 5
    fold_ids: list | None = None  # evaluate only these folds (None: all)
    n_part: int = 3
    chunking: str = "ep1"  # ep1 | alpnet
    support: str = "1shot"  # 1shot | 3shot
    dice: str = "per_volume"  # per_volume | pooled (headline; both are reported)
    setting: int = 1  # recorded: the training setting of the evaluated model
    exclusion: str = "any"  # recorded: Setting-2 exclusion used in training
    test_classes: list | None = None  # None: the dataset's test classes
    surface_metrics: bool = True
    support_case: str | None = None  # with query_cases: one explicit episode set, no folds
    query_cases: list | None = None
    support_from_mask: str | None = None  # recorded: the dataset whose masks gave generated supports (zero-shot)
    released_slice_metrics: bool = False  # also the released script's per-slice HD95 / ASSD in pixels (extra columns)
    preset: str | None = None  # recorded: the evaluation preset that set these switches (test.py --preset)

    def validate(self) -> None:
        choices = {"folds": ("canonical", "legacy"), "chunking": ("ep1", "alpnet"),
                   "support": ("1shot", "3shot"), "dice": ("per_volume", "pooled"),
                   "exclusion": ("any", "all", "released")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"protocol.{key} = {getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        if self.setting not in (1, 2):
            raise ValueError(f"protocol.setting = {self.setting!r}; allowed: 1, 2")
        if self.n_part < 1:
            raise ValueError("protocol.n_part must be >= 1")
        if (self.support_case is None) != (not self.query_cases):
            raise ValueError("give both support_case and query_cases, or neither")


def part_percentages(n_part: int) -> list[float]:
    """The published float64 arithmetic, kept exactly in this form."""
    if n_part == 1:
        return [0.5]
    return [1 / (2 * n_part) + i * (1 - 1 / n_part) / (n_part - 1) for i in range(n_part)]


def support_slice_indices(class_slices, n_part: int = 3) -> list[int]:
    """Stored slice index of the support slice of each part."""
    slices = np.asarray(class_slices)
    c_s = len(slices)
    if c_s == 0:
        raise ValueError("the support case has no slice with this class")
    return [int(slices[int(p * c_s)]) for p in part_percentages(n_part)]


def ep1_chunks(class_slices, n_part: int = 3) -> list[np.ndarray]:
    """Query slices of each chunk: consecutive split of the class slices at floor(linspace)."""
    slices = np.asarray(class_slices)
    bounds = np.floor(np.linspace(0, len(slices), n_part + 1)).astype(int)
    return [slices[bounds[i]:bounds[i + 1]] for i in range(n_part)]


def alpnet_chunks(class_slices, n_part: int = 3) -> list[np.ndarray]:
    """SSL-ALPNet: every slice in z_min..z_max predicted; chunk = floor((z - z_min)/((z_max - z_min)/n)),
    capped at n - 1."""
    slices = np.asarray(class_slices)
    z_min, z_max = int(slices.min()), int(slices.max())
    zs = np.arange(z_min, z_max + 1)
    if z_max == z_min:
        part = np.zeros_like(zs)
    else:
        part = np.minimum(np.floor((zs - z_min) / ((z_max - z_min) / n_part)).astype(int), n_part - 1)
    return [zs[part == i] for i in range(n_part)]


@dataclass
class VolumeResult:
    case: str
    cls: str
    counts: Counts
    dice: float
    hd95_mm: float | None
    asd_mm: float | None
    support_slices: list
    slice_hd95_px: list = field(default_factory=list)  # released per-slice values (finite only)
    slice_assd_px: list = field(default_factory=list)


@dataclass
class FoldResult:
    fold: int | None
    support: str
    queries: list
    volumes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (case, class, reason)


class Evaluator:
    """Runs a predictor over folds of a dataset under one :class:`ProtocolConfig`."""

    def __init__(self, dataset: FSMISDataset, predictor: Predictor, config: ProtocolConfig,
                 progress: bool = True, prediction_sink=None, support_source=None):
        """``support_source``: a :class:`fsmis.genaug.zeroshot.MaskSupportSource` (every support from a
        mask of another dataset and a generated image) or None (the dataset's own support case)."""
        config.validate()
        self.support_source = support_source
        config.support_from_mask = support_source.name if support_source is not None else None
        self.ds = dataset
        self.predictor = predictor
        self.cfg = config
        self.progress = progress
        self.prediction_sink = prediction_sink  # callable(fold, case, class_name, mask_zyx)
        self.classes = list(config.test_classes or dataset.test_classes)
        for c in self.classes:
            dataset.class_id(c)
        self._norm_cache: dict[str, np.ndarray] = {}

    # -- folds -------------------------------------------------------------------------------
    def folds(self) -> list[Fold]:
        cfg = self.cfg
        if cfg.support_case is not None:
            for cid in [cfg.support_case, *cfg.query_cases]:
                if str(cid) not in self.ds.case_ids:
                    raise DataError(f"{self.ds.image_dir}: no case {cid!r} (cases: {', '.join(self.ds.case_ids)})")
            return [Fold(-1, str(cfg.support_case), tuple(str(q) for q in cfg.query_cases), (), "explicit")]
        folds = make_folds(self.ds.case_ids, cfg.folds, cfg.supp_idx, cfg.n_folds)
        if cfg.fold_ids is not None:
            wanted = [int(f) for f in cfg.fold_ids]
            bad = [f for f in wanted if not 0 <= f < len(folds)]
            if bad:
                raise ValueError(f"fold(s) {bad} out of range 0..{len(folds) - 1}")
            folds = [folds[f] for f in wanted]
        return folds

    def _image(self, case_id: str) -> np.ndarray:
        img = self._norm_cache.get(case_id)
        if img is None:
            img = normalize_volume(self.ds.load_case(case_id).image, self.predictor.normalization)
            self._norm_cache[case_id] = img
        return img

    # -- one fold ----------------------------------------------------------------------------
    def run_fold(self, fold: Fold, bar=None) -> FoldResult:
        cfg = self.cfg
        res = FoldResult(None if fold.fold < 0 else fold.fold, fold.support, list(fold.queries))
        src = self.support_source
        if src is None:
            sup_case = self.ds.load_case(fold.support)
            sup_img = self._image(fold.support)
        for cls in self.classes:
            cid = self.ds.class_id(cls)
            if src is not None:  # zero-shot: the mask of another dataset's case, its image generated
                s_images, s_masks, s_idx, m_case = src.support(fold.fold, cls, cfg, self.predictor.normalization)
                res.support = f"{src.name}:{m_case}"
            else:
                s_slices = self.ds.class_slices(fold.support, cls)
                if len(s_slices) == 0:
                    raise DataError(
                        f"class {cls!r} (label {cid}) is absent from support case {fold.support} "
                        f"({self.ds.label_path(fold.support).name}); choose another support case")
                s_idx = support_slice_indices(s_slices, cfg.n_part)
                s_images = sup_img[s_idx]
                s_masks = (sup_case.label[s_idx] == cid).astype(np.float32)
            for q in fold.queries:
                q_case = self.ds.load_case(q)
                q_slices = self.ds.class_slices(q, cls)
                if len(q_slices) == 0:
                    res.skipped.append((q, cls, "class absent from the query case"))
                    if bar is not None:
                        bar.update(1)
                    continue
                chunks = (ep1_chunks if cfg.chunking == "ep1" else alpnet_chunks)(q_slices, cfg.n_part)
                q_img = self._image(q)
                pred = np.zeros(q_case.label.shape, dtype=bool)
                kept = np.zeros(q_case.label.shape[0], dtype=bool)
                for i, zs in enumerate(chunks):
                    if len(zs) == 0:
                        continue
                    if cfg.support == "3shot":
                        si, sm = s_images, s_masks
                    else:
                        si, sm = s_images[i:i + 1], s_masks[i:i + 1]
                    out = np.asarray(self.predictor.predict(si, sm, q_img[zs]))
                    if out.shape != (len(zs),) + q_img.shape[1:]:
                        raise RuntimeError(f"{self.predictor.name} returned shape {out.shape}, "
                                           f"expected {(len(zs),) + q_img.shape[1:]}")
                    pred[zs] = out > 0.5 if out.dtype.kind == "f" else out.astype(bool)
                    kept[zs] = True
                gt = (q_case.label == cid) & kept[:, None, None]
                counts = confusion(pred, gt)
                hd = asd = None
                if cfg.surface_metrics:
                    hd, asd = surface_distances(pred, gt, q_case.spacing)
                vr = VolumeResult(q, cls, counts, counts.dice, hd, asd, s_idx)
                if cfg.released_slice_metrics:
                    for z in np.flatnonzero(kept):
                        h2, a2 = released_slice_distances(pred[z], gt[z])
                        if h2 is not None:
                            vr.slice_hd95_px.append(h2)
                            vr.slice_assd_px.append(a2)
                res.volumes.append(vr)
                if self.prediction_sink is not None:
                    self.prediction_sink(res.fold, q, cls, pred)
                if bar is not None:
                    bar.update(1)
        return res

    def run(self) -> dict:
        from tqdm import tqdm

        t0 = time.time()
        folds = self.folds()
        total = sum(len(f.queries) for f in folds) * len(self.classes)
        bar = tqdm(total=total, desc=f"{self.predictor.name} on {self.ds.name}", unit="vol",
                   disable=not self.progress)
        fold_results = [self.run_fold(f, bar) for f in folds]
        bar.close()
        out = summarize(fold_results, self.classes, self.cfg, self.ds, self.predictor, seconds=time.time() - t0)
        if self.support_source is not None:
            out["support_source"] = self.support_source.describe()
        return out


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(fold_results: list[FoldResult], classes, cfg: ProtocolConfig, ds: FSMISDataset,
              predictor: Predictor, seconds: float = 0.0) -> dict:
    """Aggregate per-volume results into the results.json object (schema in README)."""
    folds_out = []
    for fr in fold_results:
        per_volume, hd95, asd, slices, counts = {}, {}, {}, {}, {}
        for c in classes:
            vols = [v for v in fr.volumes if v.cls == c]
            per_volume[c] = {v.case: v.dice for v in vols}
            hd95[c] = {v.case: v.hd95_mm for v in vols}
            asd[c] = {v.case: v.asd_mm for v in vols}
            counts[c] = {v.case: asdict(v.counts) for v in vols}
            if vols:
                slices[c] = vols[0].support_slices
        per_class = {c: _mean(per_volume[c].values()) for c in classes}
        pooled = {c: pooled_dice((v.counts for v in fr.volumes if v.cls == c), empty=None) for c in classes}
        released = {}
        if cfg.released_slice_metrics:
            # the released script: per class, the mean over every finite slice of the fold's query volumes
            released = {
                "hd95_px_2d_released": {c: _mean([x for v in fr.volumes if v.cls == c for x in v.slice_hd95_px])
                                        for c in classes},
                "assd_px_2d_released": {c: _mean([x for v in fr.volumes if v.cls == c for x in v.slice_assd_px])
                                        for c in classes}}
        folds_out.append({
            **released,
            "fold": fr.fold,
            "support": fr.support,
            "queries": fr.queries,
            "support_slices": slices,
            "per_volume": per_volume,
            "per_class": per_class,
            "mean_dice": _mean(per_class.values()),
            "per_class_pooled": pooled,
            "mean_dice_pooled": _mean(pooled.values()),
            "hd95_mm": hd95,
            "asd_mm": asd,
            "counts": counts,
            "skipped": [{"case": a, "class": b, "reason": r} for a, b, r in fr.skipped],
        })

    def over_folds(key_fold, key_class=None):
        if key_class is None:
            vals = [f[key_fold] for f in folds_out if f[key_fold] is not None]
        else:
            vals = [f[key_fold][key_class] for f in folds_out if f[key_fold].get(key_class) is not None]
        return (float(np.mean(vals)) if vals else None,
                float(np.std(vals)) if len(vals) > 1 else 0.0 if vals else None)

    per_class_pv = {c: over_folds("per_class", c)[0] for c in classes}
    per_class_pooled = {c: over_folds("per_class_pooled", c)[0] for c in classes}
    mean_pv, std_pv = over_folds("mean_dice")
    mean_pooled, std_pooled = over_folds("mean_dice_pooled")
    headline = cfg.dice
    hd_all = {c: _mean([v for f in folds_out for v in f["hd95_mm"][c].values()]) for c in classes}
    asd_all = {c: _mean([v for f in folds_out for v in f["asd_mm"][c].values()]) for c in classes}
    n_undefined = sum(1 for f in folds_out for c in classes for v in f["hd95_mm"][c].values() if v is None)
    return {
        "schema": "fsmis-results/1",
        "method": predictor.describe(),
        "dataset": {k: v for k, v in ds.describe().items() if k != "cases"},
        "protocol": {"version": PROTOCOL_VERSION, **asdict(cfg), "test_classes": list(classes),
                     "normalization": predictor.normalization,
                     # generated variants added to each support slice (fsmis.genaug.support); 0: real support only
                     "synthetic_support": int(getattr(predictor, "synthetic_support", 0)),
                     "folds_evaluated": [f["fold"] for f in folds_out]},
        "mean_dice": mean_pv if headline == "per_volume" else mean_pooled,
        "std_dice": std_pv if headline == "per_volume" else std_pooled,
        "per_class": per_class_pv if headline == "per_volume" else per_class_pooled,
        "mean_dice_per_volume": mean_pv,
        "mean_dice_pooled": mean_pooled,
        "per_class_per_volume": per_class_pv,
        "per_class_pooled": per_class_pooled,
        "hd95_mm": hd_all,
        "asd_mm": asd_all,
        "surface_undefined_volumes": n_undefined,
        **({k: {c: over_folds(k, c)[0] for c in classes} for k in ("hd95_px_2d_released", "assd_px_2d_released")}
           if cfg.released_slice_metrics else {}),
        "folds": folds_out,
        "seconds": round(seconds, 2),
    }


def evaluate(dataset: FSMISDataset, predictor: Predictor, config: ProtocolConfig | None = None,
             progress: bool = True, prediction_sink=None) -> dict:
    return Evaluator(dataset, predictor, config or ProtocolConfig(), progress, prediction_sink).run()


def mean_std_over_runs(results: list[dict]) -> dict:
    """Aggregate several runs' results (e.g. seeds) into mean ± std per class and overall."""
    classes = list(results[0]["per_class"])
    out = {"n_runs": len(results), "per_class": {}, "mean_dice": None}
    for c in classes:
        vals = [r["per_class"][c] for r in results if r["per_class"].get(c) is not None]
        out["per_class"][c] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))} if vals else None
    vals = [r["mean_dice"] for r in results if r["mean_dice"] is not None]
    out["mean_dice"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))} if vals else None
    return out


__all__ = ["ProtocolConfig", "Evaluator", "evaluate", "part_percentages", "support_slice_indices",
           "ep1_chunks", "alpnet_chunks", "summarize", "mean_std_over_runs"]
