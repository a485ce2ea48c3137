"""Training episodes: 1-way K-shot, one query (docs/protocol.md §5; SD-FSMIS training recipe).

Two samplers:

- :class:`ConsecutiveSliceSampler` (ADNet family, SD-FSMIS): a random training volume, a
  random class (a supervoxel id, or an organ label with the test classes removed from the
  pool), ``n_shot + 1`` CONSECUTIVE slices that contain it: the first ``n_shot`` are the
  support, the last the query; the order is reversed with p = 0.5.
- :class:`SameSliceSampler` (SSL-ALPNet): one slice, one random superpixel of it (the
  supervoxel map's slice serves as the superpixel map); support and query are two
  different augmentations of that slice.

Setting 2 (:func:`excluded_slices`) removes training slices that contain test classes, computed
on the GROUND-TRUTH labels, never on supervoxel ids: ``"any"`` (default, SSL-ALPNet) removes
every slice with any test class; ``"all"`` (legacy ADNet-family flag) only slices holding all
test classes at once. A consecutive run is consecutive in the volume's own slice indexing and
never crosses a removed slice (the ADNet-family code deletes the slices first and then takes
neighbours, which joins slices that were not adjacent).

Foreground size: an episode is kept only if the class covers at least ``min_fg_pixels`` in
EVERY slice of the episode (support and query), measured before augmentation. (The ADNet
code checks only the first slice; a query or support with a sliver of foreground is a
degenerate training signal either way.) Sampling is by rejection, as in the reference code,
with a bounded number of tries per episode; the set of admissible (volume, class, run)
triples is computed exactly once, so "impossible" is reported at once with the reason, and
a volume whose tries run out falls back to a uniform pick among its admissible runs instead
of looping for ever.

Everything random comes from the ``numpy.random.Generator`` passed to ``sample``; the same
seed gives the same episode stream. Arrays are numpy float32; the training engine converts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .augment import Transform, default_augmentation
from .normalize import MODES as NORM_MODES
from .normalize import global_stats, normalize_volume


class EpisodeError(ValueError):
    """No episode can be drawn with the given cases and settings. The message says why."""


@dataclass
class Episode:
    support_images: np.ndarray  # float32 [K, H, W]
    support_masks: np.ndarray  # float32 [K, H, W], values in {0, 1}
    query_images: np.ndarray  # float32 [1, H, W]
    query_masks: np.ndarray  # float32 [1, H, W], values in {0, 1}
    case: str
    class_source: str  # "supervoxel" | "label"
    class_id: int  # supervoxel id, or the label id stored in the files
    slices: tuple  # support slice indices, then the query's
    reversed: bool
    class_name: str | None = None  # organ name when class_source == "label"
    augmented: str | None = None  # "support" | "query" | "both" | None
    cases: tuple | None = None  # per slice (supports, then the query) when they come from different cases
    synthetic: bool = False  # drawn from a synthetic folder (fsmis.genaug.episodes)

    @property
    def n_shot(self) -> int:
        return int(self.support_images.shape[0])

    def describe(self) -> dict:
        return {
            "case": self.case, "class_source": self.class_source, "class_id": self.class_id,
            "class_name": self.class_name, "slices": list(self.slices), "reversed": self.reversed,
            "augmented": self.augmented, "n_shot": self.n_shot,
            "cases": list(self.cases) if self.cases is not None else None, "synthetic": self.synthetic,
        }


# -- Setting 2 ----------------------------------------------------------------------------------
def _class_names(dataset, test_classes) -> list[str]:
    by_id = {v: k for k, v in dataset.classes.items()}
    names = []
    for c in test_classes:
        if isinstance(c, (int, np.integer)):
            if int(c) not in by_id:
                raise ValueError(f"{dataset.name}: no class with id {int(c)} (classes: {dataset.classes})")
            names.append(by_id[int(c)])
        else:
            dataset.class_id(str(c))  # raises with the list of known classes
            names.append(str(c))
    return names


def excluded_slices(dataset, case_id: str, test_classes=None, mode: str = "any") -> set[int]:
    """Slices of ``case_id`` that Setting 2 removes from training, from the ground-truth labels.

    ``mode="any"``: every slice containing at least one test class (SSL-ALPNet, default).
    ``mode="all"``: only slices containing every test class at once (ADNet-family legacy).
    ``mode="released"``: the released SD-FSMIS loader: "all" on the abdomen, nothing on Card-MRI
    (its exclusion list there is empty).
    No test classes: nothing is removed.
    """
    if mode not in EXCLUSION_MODES:
        raise ValueError(f"unknown Setting-2 exclusion mode {mode!r} ({' | '.join(EXCLUSION_MODES)})")
    if mode == "released":
        if all(n in dataset.classes for n in TEST_GROUPS["cardiac"][1] + TEST_GROUPS["cardiac"][2]):
            return set()
        mode = "all"
    names = _class_names(dataset, dataset.test_classes if test_classes is None else test_classes)
    if not names:
        return set()
    label = dataset.load_case(case_id).label
    flat = label.reshape(label.shape[0], -1)
    present = np.stack([(flat == dataset.class_id(n)).any(axis=1) for n in names])  # [n_classes, Z]
    hit = present.any(axis=0) if mode == "any" else present.all(axis=0)
    return {int(z) for z in np.flatnonzero(hit)}


# -- shared machinery ---------------------------------------------------------------------------
def _per_slice_counts(class_map: np.ndarray, ids: np.ndarray | None = None):
    """Pixel count of every id in every slice: (ids [C], counts [Z, C]).

    ``ids=None``: every id > 0 present in the map (supervoxel mode; 0 is outside the body).
    """
    z = class_map.shape[0]
    flat = class_map.reshape(z, -1)
    if ids is not None:
        ids = np.asarray(sorted(int(i) for i in ids), dtype=np.int64)
        counts = np.stack([(flat == i).sum(axis=1) for i in ids], axis=1) if len(ids) else np.zeros((z, 0), np.int64)
        return ids, counts.astype(np.int64)
    if flat.size and flat.min() >= 0 and flat.max() < 1 << 20:
        m = int(flat.max()) + 1
        rows = np.repeat(np.arange(z, dtype=np.int64) * m, flat.shape[1])
        counts = np.bincount(rows + flat.ravel().astype(np.int64), minlength=z * m).reshape(z, m)
        present = np.flatnonzero(counts.sum(axis=0))
    else:  # huge or negative ids: compact them first
        uniq, inv = np.unique(flat, return_inverse=True)
        m = len(uniq)
        rows = np.repeat(np.arange(z, dtype=np.int64) * m, flat.shape[1])
        counts = np.bincount(rows + inv.ravel(), minlength=z * m).reshape(z, m)
        keep = uniq > 0
        return uniq[keep].astype(np.int64), counts[:, keep]
    keep = present[present > 0]
    return keep.astype(np.int64), counts[:, keep]


def _windows_all(ok: np.ndarray, length: int) -> np.ndarray:
    """[Z - length + 1, C] boolean: rows z..z+length-1 of ``ok`` [Z, C] are all True."""
    z = ok.shape[0]
    if z < length:
        return np.zeros((0, ok.shape[1]), dtype=bool)
    cs = np.concatenate([np.zeros((1, ok.shape[1]), np.int64), np.cumsum(ok, axis=0, dtype=np.int64)])
    return (cs[length:] - cs[:-length]) == length


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# Held-out class groups of GT-label training (data.test_group): by class name (this project's
# definition, the same on every dataset) or as the released SD-FSMIS loader removes them, by stored
# label id ({1, 4} / {2, 3}; {1, 6} on SABS): on Card-MRI, whose stored ids are 200 / 500 / 600, the
# released ids match nothing and every class trains (docs/protocol.md, the released behaviours).
TEST_GROUPS = {
    "abdomen": {1: ("liver", "spleen"), 2: ("left_kidney", "right_kidney")},
    "cardiac": {1: ("LV-MYO",), 2: ("LV-BP", "RV")},
}
RELEASED_GROUP_IDS = {1: (1, 4), 2: (2, 3)}
RELEASED_GROUP_IDS_SABS = {1: (1, 6), 2: (2, 3)}
GROUP_ID_MODES = ("names", "released")
EXCLUSION_MODES = ("any", "all", "released")
# the foreground-size rule of a consecutive-slice episode: every slice of the run has >= min_fg_pixels
# of the class (default), or, as the released SD-FSMIS loader, the larger of its first two slices
# (support and query for 1-shot), counted on the stored label before any resize
SIZE_RULES = ("every", "max")


def test_group_classes(classes: dict, group: int) -> list[str]:
    """The class names of held-out group ``group`` (1 or 2) among ``classes`` (name -> id)."""
    if group not in (1, 2):
        raise ValueError(f"test_group must be 1 or 2, got {group!r}")
    for kind, groups in TEST_GROUPS.items():
        if all(n in classes for n in groups[group]):
            return list(groups[group])
    raise ValueError(f"test_group {group}: the classes {sorted(classes)} hold neither the abdominal group "
                     f"{TEST_GROUPS['abdomen'][group]} nor the cardiac one {TEST_GROUPS['cardiac'][group]}")


def label_pool(dataset_name: str, classes: dict, test_classes, test_group: int | None = None,
               group_ids: str = "names") -> list[int]:
    """Label ids that GT-label episodes may use. Without ``test_group``: every class but the test
    classes. With it: every class but that group's, by name (``group_ids="names"``) or by the released
    loader's stored ids (``"released"``)."""
    if group_ids not in GROUP_ID_MODES:
        raise ValueError(f"test_group_ids must be one of {GROUP_ID_MODES}, got {group_ids!r}")
    if test_group is None:
        removed = {classes[n] for n in test_classes}
    elif group_ids == "names":
        removed = {classes[n] for n in test_group_classes(classes, test_group)}
    else:
        table = RELEASED_GROUP_IDS_SABS if str(dataset_name).upper() == "SABS" else RELEASED_GROUP_IDS
        if test_group not in table:
            raise ValueError(f"test_group must be 1 or 2, got {test_group!r}")
        removed = set(table[test_group])
    return sorted(v for v in classes.values() if v not in removed)


class _SamplerBase:
    """Case loading, Setting-2 exclusion and per-volume normalisation shared by both samplers."""

    def __init__(self, dataset, case_ids, n_shot, setting, exclusion, test_classes, labels,
                 min_fg_pixels, augment, normalization, seed, test_group=None, test_group_ids="names",
                 size_rule="every"):
        if setting not in (1, 2):
            raise ValueError(f"setting must be 1 or 2, got {setting!r}")
        if exclusion not in EXCLUSION_MODES:
            raise ValueError(f"unknown Setting-2 exclusion mode {exclusion!r} ({' | '.join(EXCLUSION_MODES)})")
        if size_rule not in SIZE_RULES:
            raise ValueError(f"unknown size rule {size_rule!r} ({' | '.join(SIZE_RULES)})")
        if labels not in ("supervoxel", "label"):
            raise ValueError(f"labels must be 'supervoxel' or 'label', got {labels!r}")
        if normalization not in NORM_MODES:
            raise ValueError(f"unknown normalisation {normalization!r} ({' | '.join(NORM_MODES)})")
        if int(n_shot) < 1:
            raise ValueError(f"n_shot must be >= 1, got {n_shot}")
        if augment is not None and not callable(augment):
            raise ValueError("augment must be a transform (image, masks, rng) -> (image, masks), 'default', or None")
        self.dataset = dataset
        self.case_ids = [str(c) for c in case_ids]
        if not self.case_ids:
            raise EpisodeError("no training cases given")
        for cid in self.case_ids:
            if cid not in dataset.case_ids:
                raise EpisodeError(f"{dataset.name}: no case {cid!r} (cases: {', '.join(dataset.case_ids)})")
        self.n_shot = int(n_shot)
        self.setting = int(setting)
        self.exclusion = exclusion
        self.test_classes = _class_names(dataset, dataset.test_classes if test_classes is None else test_classes)
        self.labels = labels
        self.test_group = None if test_group is None else int(test_group)
        self.test_group_ids = test_group_ids
        self.min_fg_pixels = int(min_fg_pixels)
        self.size_rule = size_rule
        self.augment = augment
        self.normalization = normalization
        self.seed = seed
        self._images: dict[str, np.ndarray] = {}
        self._maps: dict[str, np.ndarray] = {}
        self._global = None
        self._rng = np.random.default_rng(seed)
        if labels == "label":
            pool = self.label_pool()
            if not pool:
                raise EpisodeError(
                    f"{dataset.name}: no class left for GT-label episodes: every class ({', '.join(dataset.classes)}) is "
                    + ("in the held-out group" if self.test_group else "a test class")
                    + "; set data.test_group=1 or 2 (remove one group only, as the released loader does)")

    # -- per case ---------------------------------------------------------------------------
    def image(self, cid: str) -> np.ndarray:
        """The case's normalised volume (computed once, cached)."""
        img = self._images.get(cid)
        if img is None:
            if self.normalization == "global" and self._global is None:
                self._global = global_stats(self.dataset, self.case_ids)
            img = normalize_volume(self.dataset.load_case(cid).image, self.normalization, self._global)
            self._images[cid] = img
        return img

    def class_map(self, cid: str) -> np.ndarray:
        """Supervoxel ids, or the ground-truth label map (``labels="label"``)."""
        m = self._maps.get(cid)
        if m is None:
            case = self.dataset.load_case(cid, supervoxels=self.labels == "supervoxel")
            m = case.supervoxels if self.labels == "supervoxel" else case.label
            self._maps[cid] = m
        return m

    def allowed(self, cid: str) -> np.ndarray:
        """Boolean [Z]: slices usable for training (Setting 2 removes some; so do the filters of a
        synthetic folder, through its ``synthetic.excluded_slices``)."""
        z = self.dataset.load_case(cid).image.shape[0]
        ok = np.ones(z, dtype=bool)
        dropped = [int(i) for i in getattr(self.dataset, "excluded_slices", {}).get(cid, ()) if 0 <= int(i) < z]
        ok[dropped] = False
        if self.setting == 2:
            ex = excluded_slices(self.dataset, cid, self.test_classes, self.exclusion)
            ok[sorted(ex)] = False
        return ok

    def label_pool(self) -> list[int]:
        """Organ ids that GT-label episodes may use (:func:`label_pool`)."""
        return label_pool(self.dataset.name, self.dataset.classes, self.test_classes, self.test_group,
                          self.test_group_ids)

    def _augment(self, image: np.ndarray, mask: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        image, (mask,) = self.augment(image, [mask], rng)
        return np.asarray(image, np.float32), (np.asarray(mask) > 0.5).astype(np.float32)

    # -- iteration ---------------------------------------------------------------------------
    def sample(self, rng=None) -> Episode:  # pragma: no cover - abstract
        raise NotImplementedError

    def episodes(self, n: int, seed=None) -> list[Episode]:
        """``n`` episodes drawn from a fresh generator seeded with ``seed`` (default: the sampler's)."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        return [self.sample(rng) for _ in range(int(n))]

    def __iter__(self):
        """An endless episode stream from a fresh generator seeded with the sampler's seed."""
        rng = np.random.default_rng(self.seed)
        while True:
            yield self.sample(rng)

    def config(self) -> dict:
        """The sampler's switches, for the run's protocol fingerprint."""
        return {
            "sampler": type(self).__name__, "n_shot": self.n_shot, "setting": self.setting,
            "exclusion": self.exclusion if self.setting == 2 else None,
            "test_classes": list(self.test_classes), "labels": self.labels,
            **({"test_group": self.test_group, "test_group_ids": self.test_group_ids} if self.test_group else {}),
            "min_fg_pixels": self.min_fg_pixels, "normalization": self.normalization,
            **({"size_rule": self.size_rule} if self.size_rule != "every" else {}),
            "augment": repr(self.augment) if self.augment is not None else None,
            "cases": list(self.case_ids), "seed": self.seed,
        }


@dataclass
class _RunTable:
    """Admissible consecutive runs of one case."""

    ids: np.ndarray  # [C] class ids
    counts: np.ndarray  # [Z, C] pixels of each class in each slice
    run_ok: np.ndarray  # [R, C] run starting at r: all slices allowed and containing the class
    run_valid: np.ndarray  # [R, C] ... and every slice has >= min_fg pixels
    pool: np.ndarray  # column indices of classes with at least one run
    n_valid: int


class ConsecutiveSliceSampler(_SamplerBase):
    """ADNet-family / SD-FSMIS episodes: ``n_shot + 1`` consecutive slices of one volume.

    Args:
        dataset: an :class:`~fsmis.data.datasets.FSMISDataset`.
        case_ids: the training cases (e.g. ``Fold.train``).
        n_shot: support slices per episode.
        setting: 1 (nothing removed) or 2 (slices with test classes removed, see ``exclusion``).
        exclusion: ``"any"`` (default), ``"all"`` (legacy) or ``"released"``, Setting 2 only.
        size_rule: ``"every"`` (default: every slice of the run has >= ``min_fg_pixels``) or ``"max"``
            (the released SD-FSMIS rule: the larger of the first two slices).
        test_classes: class names (or ids); default ``dataset.test_classes``.
        labels: ``"supervoxel"`` (self-supervised, default) or ``"label"`` (ground-truth organs
            minus the test classes: what the released SD-FSMIS loader does).
        min_fg_pixels: minimum foreground pixels in every slice of the episode.
        augment: a transform, ``"default"`` (:func:`default_augmentation`) or None.
        augment_target: ``"support"``, ``"query"`` or ``"random"`` (one of the two per episode,
            p = 0.5): augmentation is applied to one side only, never both. With K shots each
            support slice gets its own draw.
        normalization: ``"zscore"`` (default), ``"minmax"`` ([-1, 1], SD-FSMIS), ``"global"``, ``"none"``.
        seed: seed of :meth:`episodes` / ``__iter__`` and of :meth:`sample` without a generator.
        max_retries: rejection tries per episode before falling back to a direct pick.
    """

    def __init__(self, dataset, case_ids, n_shot: int = 1, setting: int = 1, exclusion: str = "any",
                 test_classes=None, labels: str = "supervoxel", min_fg_pixels: int = 200,
                 augment: Transform | str | None = "default", augment_target: str = "random",
                 normalization: str = "zscore", seed: int | None = 0, max_retries: int = 100,
                 test_group: int | None = None, test_group_ids: str = "names", size_rule: str = "every",
                 augment_intensity: Transform | None = None):
        if isinstance(augment, str):
            if augment != "default":
                raise ValueError(f"augment must be a transform, 'default' or None, got {augment!r}")
            augment = default_augmentation()
        if augment_target not in ("support", "query", "random"):
            raise ValueError(f"augment_target must be 'support', 'query' or 'random', got {augment_target!r}")
        super().__init__(dataset, case_ids, n_shot, setting, exclusion, test_classes, labels,
                         min_fg_pixels, augment, normalization, seed, test_group, test_group_ids, size_rule)
        self.augment_target = augment_target
        # released mode: an intensity transform applied to a side drawn independently of the augment's
        self.augment_intensity = augment_intensity
        self.max_retries = int(max_retries)
        self._tables: dict[str, _RunTable] | None = None

    @property
    def run_length(self) -> int:
        return self.n_shot + 1

    def _build_table(self, cid: str) -> _RunTable:
        cmap = self.class_map(cid)
        if self.labels == "label":
            ids, counts = _per_slice_counts(cmap, self.label_pool())
        else:
            ids, counts = _per_slice_counts(cmap)
        allowed = self.allowed(cid)[:, None]
        run_ok = _windows_all(allowed & (counts > 0), self.run_length)
        big = allowed & (counts >= max(self.min_fg_pixels, 1))
        if self.size_rule == "max":  # the larger of the run's first two slices is big enough
            run_valid = run_ok & (big[:len(run_ok)] | big[1:len(run_ok) + 1])
        else:
            run_valid = _windows_all(big, self.run_length)
        pool = np.flatnonzero(run_ok.any(axis=0))
        return _RunTable(ids, counts, run_ok, run_valid, pool, int(run_valid.sum()))

    def _prepare(self) -> None:
        if self._tables is not None:
            return
        tables = {cid: self._build_table(cid) for cid in self.case_ids}
        self._usable = [cid for cid in self.case_ids if tables[cid].n_valid > 0]
        if not self._usable:
            what = "supervoxels" if self.labels == "supervoxel" else (
                f"organ labels {self.label_pool()} (" + (f"held-out group {self.test_group} removed)" if self.test_group
                                                         else f"test classes {self.test_classes} removed)"))
            n_runs = sum(int(t.run_ok.sum()) for t in tables.values())
            setting = f"Setting 2 ('{self.exclusion}' exclusion of {self.test_classes})" if self.setting == 2 else "Setting 1"
            raise EpisodeError(
                f"{self.dataset.name}: no episode possible: no run of {self.run_length} consecutive allowed slices "
                f"in cases {self.case_ids} has a class ({what}) with >= {self.min_fg_pixels} pixels "
                + ("in every slice " if self.size_rule == "every" else "in its support or query slice ") +
                f"[{setting}; {n_runs} runs contain a class at all]. Lower min_fg_pixels or n_shot, or use more cases."
            )
        self._tables = tables

    def sample(self, rng=None) -> Episode:
        """One episode. ``rng``: a numpy Generator (or a seed); default: the sampler's own stream."""
        rng = self._rng if rng is None else _as_rng(rng)
        self._prepare()
        cid = self._usable[int(rng.integers(len(self._usable)))]
        t = self._tables[cid]
        col = start = None
        for _ in range(self.max_retries):
            c = int(t.pool[rng.integers(len(t.pool))])
            starts = np.flatnonzero(t.run_ok[:, c])
            s = int(starts[rng.integers(len(starts))])
            if t.run_valid[s, c]:
                col, start = c, s
                break
        if col is None:  # rare classes only: pick among the admissible runs directly
            rs, cs = np.nonzero(t.run_valid)
            k = int(rng.integers(len(rs)))
            col, start = int(cs[k]), int(rs[k])
        rev = bool(rng.random() < 0.5)
        slices = list(range(start, start + self.run_length))
        if rev:
            slices.reverse()
        class_id = int(t.ids[col])
        img, cmap = self.image(cid), self.class_map(cid)
        images = [img[z].copy() for z in slices]
        masks = [(cmap[z] == class_id).astype(np.float32) for z in slices]

        target = None
        if self.augment is not None:
            target = self.augment_target
            if target == "random":
                target = "support" if rng.random() < 0.5 else "query"
            idx = range(self.n_shot) if target == "support" else [self.n_shot]
            for i in idx:
                images[i], masks[i] = self._augment(images[i], masks[i], rng)
        if self.augment_intensity is not None:
            side = "support" if rng.random() < 0.5 else "query"
            for i in (range(self.n_shot) if side == "support" else [self.n_shot]):
                images[i] = np.asarray(self.augment_intensity(images[i], [], rng)[0], np.float32)

        by_id = {v: k for k, v in self.dataset.classes.items()}
        return Episode(
            support_images=np.stack(images[: self.n_shot]).astype(np.float32),
            support_masks=np.stack(masks[: self.n_shot]).astype(np.float32),
            query_images=images[self.n_shot][None].astype(np.float32),
            query_masks=masks[self.n_shot][None].astype(np.float32),
            case=cid,
            class_source=self.labels,
            class_id=class_id,
            slices=tuple(slices),
            reversed=rev,
            class_name=by_id.get(class_id) if self.labels == "label" else None,
            augmented=target,
        )

    def config(self) -> dict:
        d = super().config()
        d.update(augment_target=self.augment_target if self.augment is not None else None,
                 reverse_p=0.5, max_retries=self.max_retries)
        if self.augment_intensity is not None:
            d["augment_intensity"] = repr(self.augment_intensity)
        return d


class SameSliceSampler(_SamplerBase):
    """SSL-ALPNet episodes: one slice, one random superpixel; support and query are two
    different augmentations of the same slice.

    The superpixel map of a slice is that slice of the supervoxel map. Slices are drawn
    uniformly over every admissible slice of the training cases (SSL-ALPNet indexes its
    dataset by slice), the superpixel uniformly among those with >= ``min_fg_pixels`` pixels
    in it. Setting 2 removes slices as in :func:`excluded_slices`. With ``n_shot`` K, the
    K supports and the query are K + 1 independent augmentations. ``augment`` is required:
    without it support and query would be identical.
    """

    def __init__(self, dataset, case_ids, n_shot: int = 1, setting: int = 1, exclusion: str = "any",
                 test_classes=None, min_fg_pixels: int = 200, augment: Transform | str = "default",
                 normalization: str = "zscore", seed: int | None = 0):
        if isinstance(augment, str):
            if augment != "default":
                raise ValueError(f"augment must be a transform or 'default', got {augment!r}")
            augment = default_augmentation()
        if augment is None:
            raise ValueError("SameSliceSampler needs an augmentation: support and query are two augmentations of one slice")
        super().__init__(dataset, case_ids, n_shot, setting, exclusion, test_classes, "supervoxel",
                         min_fg_pixels, augment, normalization, seed)
        self._slices = None

    def _prepare(self) -> None:
        if self._slices is not None:
            return
        entries = []  # (case, z, eligible ids)
        for cid in self.case_ids:
            ids, counts = _per_slice_counts(self.class_map(cid))
            ok = self.allowed(cid)
            big = counts >= max(self.min_fg_pixels, 1)
            for z in np.flatnonzero(ok & big.any(axis=1)):
                entries.append((cid, int(z), ids[big[z]]))
        if not entries:
            setting = f"Setting 2 ('{self.exclusion}' exclusion of {self.test_classes})" if self.setting == 2 else "Setting 1"
            raise EpisodeError(
                f"{self.dataset.name}: no episode possible: no allowed slice of cases {self.case_ids} has a "
                f"superpixel with >= {self.min_fg_pixels} pixels [{setting}]"
            )
        self._slices = entries

    def sample(self, rng=None) -> Episode:
        rng = self._rng if rng is None else _as_rng(rng)
        self._prepare()
        cid, z, ids = self._slices[int(rng.integers(len(self._slices)))]
        class_id = int(ids[rng.integers(len(ids))])
        image = self.image(cid)[z]
        mask = (self.class_map(cid)[z] == class_id).astype(np.float32)
        views = [self._augment(image.copy(), mask.copy(), rng) for _ in range(self.n_shot + 1)]
        return Episode(
            support_images=np.stack([v[0] for v in views[: self.n_shot]]).astype(np.float32),
            support_masks=np.stack([v[1] for v in views[: self.n_shot]]).astype(np.float32),
            query_images=views[-1][0][None].astype(np.float32),
            query_masks=views[-1][1][None].astype(np.float32),
            case=cid,
            class_source="supervoxel",
            class_id=class_id,
            slices=tuple([z] * (self.n_shot + 1)),
            reversed=False,
            augmented="both",
        )
