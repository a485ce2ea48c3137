"""Dataset roots: the published benchmark folders and nnU-Net-style folders (docs/protocol.md §1, §3).

A dataset is a folder of ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` pairs plus its class
names. Two kinds of root are accepted:

(a) the published preprocessed benchmark folders, as users have them on disk: the benchmark
    folder (``SABS/``, ``CHAOST2/``, ``CMR/``) or its inner ``*_normalized`` folder; class
    names and label ids come from :data:`BENCHMARKS`;
(b) any folder with the pairs and a ``dataset.json`` (``name``, ``modality``,
    ``labels`` {class name: id}, optional ``test_labels`` [class names or ids],
    optional ``supervoxels`` (folder name)).

Label arrays keep the ids stored in the files (CMR keeps 200/500/600); every report speaks
of class names, and masks are always taken as ``label == classes[name]``.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .case_ids import sort_case_ids
from .nifti import DataError, Volume, check_pair, load_volume


@dataclass(frozen=True)
class Benchmark:
    name: str
    folder: str  # the inner "*_normalized" folder
    modality: str
    supervoxels: str  # sibling folder with superpix-MIDDLE_<id>.nii.gz
    labels: dict  # class name -> id stored in the label files
    test_classes: tuple


BENCHMARKS: dict[str, Benchmark] = {
    "SABS": Benchmark(
        "SABS", "sabs_CT_normalized", "CT", "supervoxels_5000",
        {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5,
         "liver": 6, "stomach": 7, "aorta": 8, "ivc": 9, "portal_splenic_vein": 10,
         "pancreas": 11, "right_adrenal": 12, "left_adrenal": 13},
        ("liver", "spleen", "left_kidney", "right_kidney"),
    ),
    "CHAOST2": Benchmark(
        "CHAOST2", "chaos_MR_T2_normalized", "MR", "supervoxels_5000",
        {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4},
        ("liver", "spleen", "left_kidney", "right_kidney"),
    ),
    "CMR": Benchmark(
        "CMR", "cmr_MR_normalized", "MR", "supervoxels_1000",
        {"LV-MYO": 200, "LV-BP": 500, "RV": 600},
        ("LV-MYO", "LV-BP", "RV"),
    ),
}

_IMAGE_RE = re.compile(r"^image_(.+)\.nii(\.gz)?$")
_LABEL_RE = re.compile(r"^label_(.+)\.nii(\.gz)?$")


@dataclass
class Case:
    id: str
    image: np.ndarray  # float32 [Z, Y, X], as stored (clipped, not normalised)
    label: np.ndarray  # int32 [Z, Y, X], stored ids
    spacing: tuple  # (z, y, x) mm
    image_volume: Volume = field(repr=False)
    supervoxels: np.ndarray | None = field(default=None, repr=False)


class FSMISDataset:
    """One benchmark or dataset folder. Cases load lazily and are cached."""

    def __init__(self, root: str | Path, cache: bool = True, pseudolabels: str | None = None):
        """``pseudolabels``: the name of the pseudo-label folder to train on (e.g. ``superpixels_400``,
        SSL-ALPNet's 2D superpixels); default: the dataset's supervoxels."""
        root = Path(root)
        if not root.exists():
            raise DataError(f"{root}: dataset folder not found")
        self.input_root = root
        self.cache = cache
        self._cases: dict[str, Case] = {}
        self._slices: dict[str, dict[int, np.ndarray]] = {}
        self._resolve(root)
        if pseudolabels:
            found = [b / pseudolabels for b in (self.image_dir, self.image_dir.parent) if (b / pseudolabels).is_dir()]
            if not found:
                mode = "--mode 2d " if str(pseudolabels).startswith("superpixels") else ""
                raise DataError(f"{self.image_dir}: no pseudo-label folder {pseudolabels!r} beside or inside it; run "
                                f"tools/make_supervoxels.py --data {self.input_root} {mode}(the folder it writes is "
                                "named after the mode and --min-size)")
            self.supervoxel_dir = found[0]
        self.case_ids = self._find_cases()
        if not self.case_ids:
            raise DataError(f"{self.image_dir}: no image_<id>.nii.gz files")
        for name in self.test_classes:
            if name not in self.classes:
                raise DataError(f"{self.image_dir}: test class {name!r} is not among the classes {list(self.classes)}")
        self._reference_affine = None
        self._reference_id = None

    # -- discovery ---------------------------------------------------------------------------
    def _resolve(self, root: Path) -> None:
        meta = root / "dataset.json"
        if meta.is_file():
            self._from_dataset_json(root, meta)
            return
        for bench in BENCHMARKS.values():
            if root.name == bench.folder:
                return self._from_benchmark(bench, root)
            if (root / bench.folder).is_dir():
                return self._from_benchmark(bench, root / bench.folder)
        raise DataError(
            f"{root}: not a dataset root: expected a dataset.json, or a published benchmark folder "
            f"({', '.join(b.name + '/' + b.folder for b in BENCHMARKS.values())})"
        )

    def _from_benchmark(self, bench: Benchmark, image_dir: Path) -> None:
        self.name = bench.name
        self.modality = bench.modality
        self.image_dir = image_dir
        self.classes = dict(bench.labels)
        self.test_classes = list(bench.test_classes)
        self.supervoxel_dir = self._find_supervoxels(image_dir, bench.supervoxels)
        self.synthetic_block, self.excluded_slices = {}, {}

    def _from_dataset_json(self, root: Path, meta: Path) -> None:
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta}: invalid JSON ({exc})") from exc
        for key in ("name", "labels"):
            if key not in info:
                raise DataError(f"{meta}: missing key {key!r}")
        if not isinstance(info["labels"], dict):
            raise DataError(f"{meta}: 'labels' must map class names to label ids, e.g. {{\"liver\": 6}}, "
                            f"not a {type(info['labels']).__name__}")
        labels, owner = {}, {}
        for k, v in info["labels"].items():
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit())):
                raise DataError(f"{meta}: label id of {k!r} must be an integer, got {v!r}")
            v = int(v)
            if v < 0:
                raise DataError(f"{meta}: label id of {k!r} is negative ({v})")
            if v in owner:
                raise DataError(f"{meta}: classes {owner[v]!r} and {k!r} share the label id {v}")
            owner[v] = str(k)
            if v != 0:
                labels[str(k)] = v
        self.name = str(info["name"])
        self.modality = str(info.get("modality", "unknown"))
        self.image_dir = root
        self.classes = labels
        by_id = {v: k for k, v in labels.items()}
        tests = info.get("test_labels", list(labels))
        self.test_classes = []
        for t in tests:
            if str(t).lstrip("-").isdigit():
                if int(t) not in by_id:
                    raise DataError(f"{meta}: test label id {t} is not among the labels {labels}")
                self.test_classes.append(by_id[int(t)])
            else:
                if str(t) not in labels:
                    raise DataError(f"{meta}: test label {t!r} is not among the labels {labels}")
                self.test_classes.append(str(t))
        self.supervoxel_dir = self._find_supervoxels(root, info.get("supervoxels"))
        # a synthetic folder (fsmis.genaug): its block, and the slices its filters removed
        block = info.get("synthetic")
        self.synthetic_block = block if isinstance(block, dict) else {}
        self.excluded_slices = {}
        excluded = self.synthetic_block.get("excluded_slices") or {}
        if not isinstance(excluded, dict):
            raise DataError(f"{meta}: synthetic.excluded_slices must map case ids to lists of slice indices")
        for cid, zs in excluded.items():
            if not isinstance(zs, list) or not all(isinstance(z, int) and not isinstance(z, bool) and z >= 0 for z in zs):
                raise DataError(f"{meta}: synthetic.excluded_slices[{cid!r}] must be a list of slice indices >= 0, "
                                f"got {zs!r}")
            self.excluded_slices[str(cid)] = sorted(set(zs))

    @staticmethod
    def _find_supervoxels(image_dir: Path, preferred: str | None) -> Path | None:
        for base in (image_dir, image_dir.parent):
            if preferred and (base / preferred).is_dir():
                return base / preferred
        found = sorted(p for base in (image_dir, image_dir.parent) for p in base.glob("supervoxels_*") if p.is_dir())
        return found[0] if found else None

    def _find_cases(self) -> list[str]:
        ids, labels = [], []
        for p in self.image_dir.iterdir():
            m = _IMAGE_RE.match(p.name)
            if m:
                ids.append(m.group(1))
            m = _LABEL_RE.match(p.name)
            if m:
                labels.append((m.group(1), p.name))
        orphans = sorted((name, cid) for cid, name in labels if cid not in set(ids))
        if orphans:
            (first, cid), rest = orphans[0], [name for name, _ in orphans[1:]]
            raise DataError(f"{self.image_dir / first}: label file without an image (no image_{cid}.nii.gz)"
                            + (f"; also {', '.join(rest[:9])}" if rest else "")
                            + (f" ... ({len(orphans)} in all)" if len(orphans) > 10 else ""))
        return sort_case_ids(ids)

    # -- files -------------------------------------------------------------------------------
    def _file(self, kind: str, case_id: str) -> Path:
        for ext in (".nii.gz", ".nii"):
            p = self.image_dir / f"{kind}_{case_id}{ext}"
            if p.is_file():
                return p
        raise DataError(f"{self.image_dir / f'{kind}_{case_id}.nii.gz'}: file not found")

    def image_path(self, case_id: str) -> Path:
        return self._file("image", case_id)

    def label_path(self, case_id: str) -> Path:
        return self._file("label", case_id)

    def supervoxel_path(self, case_id: str) -> Path:
        if self.supervoxel_dir is None:
            raise DataError(f"{self.image_dir}: no supervoxels_<n> folder; run tools/make_supervoxels.py --data {self.input_root}")
        p = self.supervoxel_dir / f"superpix-MIDDLE_{case_id}.nii.gz"
        if not p.is_file():
            raise DataError(f"{p}: file not found; run tools/make_supervoxels.py --data {self.input_root}")
        return p

    @property
    def reference_affine(self):
        """The dataset's reference layout: the most common stored orientation (ties: first case)."""
        if self._reference_id is None:
            import nibabel as nib
            from nibabel import orientations as nio

            from .nifti import OBLIQUE_DEGREES, obliquity

            affines, keys = {}, []
            for cid in self.case_ids:
                try:
                    aff = np.asarray(nib.load(str(self.image_path(cid))).affine, float)
                except Exception as exc:
                    raise DataError(f"{self.image_path(cid)}: not a readable NIfTI file ({type(exc).__name__}: "
                                    f"{exc})") from None
                if obliquity(aff) > OBLIQUE_DEGREES:
                    continue
                key = tuple(map(tuple, nio.io_orientation(aff)))
                affines.setdefault(key, (cid, aff))
                keys.append(key)
            if keys:
                best = Counter(keys).most_common()
                top = max(c for _, c in best)
                key = next(k for k in keys if dict(best)[k] == top)
                self._reference_id, self._reference_affine = affines[key]
            else:
                self._reference_id = ""
        return self._reference_affine

    # -- cases -------------------------------------------------------------------------------
    def load_case(self, case_id: str, supervoxels: bool = False) -> Case:
        case_id = str(case_id)
        if case_id not in self.case_ids:
            raise DataError(f"{self.image_dir}: no case {case_id!r} (cases: {', '.join(self.case_ids)})")
        case = self._cases.get(case_id)
        if case is None:
            ref = self.reference_affine
            img = load_volume(self.image_path(case_id), ref, role="image")
            lab = load_volume(self.label_path(case_id), ref, role="label")
            check_pair(img, lab)
            case = Case(case_id, img.array, lab.array, img.spacing, img)
            if self.cache:
                self._cases[case_id] = case
        if supervoxels and case.supervoxels is None:
            sv = load_volume(self.supervoxel_path(case_id), self.reference_affine, role="label")
            if sv.stored_shape != case.image_volume.stored_shape:
                raise DataError(f"{sv.path}: shape {sv.stored_shape} differs from {case.image_volume.path.name} {case.image_volume.stored_shape}")
            case.supervoxels = sv.array
        return case

    def class_id(self, name: str) -> int:
        if name not in self.classes:
            raise DataError(f"{self.name}: unknown class {name!r} (classes: {', '.join(self.classes)})")
        return self.classes[name]

    def class_slices(self, case_id: str, name: str) -> np.ndarray:
        """Sorted slice indices of ``case_id`` whose label contains class ``name``."""
        per_case = self._slices.get(case_id)
        if per_case is None:
            lab = self.load_case(case_id).label
            present = {}
            flat = lab.reshape(lab.shape[0], -1)
            for cid in self.classes.values():
                present[cid] = np.flatnonzero((flat == cid).any(axis=1))
            per_case = self._slices[case_id] = present
        return per_case[self.class_id(name)]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "modality": self.modality,
            "root": str(self.image_dir),
            "n_cases": len(self.case_ids),
            "cases": list(self.case_ids),
            "classes": dict(self.classes),
            "test_classes": list(self.test_classes),
            "supervoxels": str(self.supervoxel_dir) if self.supervoxel_dir else None,
        }

    def layout_report(self) -> list[dict]:
        """Per case: stored orientation, kind (axis-aligned / oblique) and what was changed on load."""
        rows = []
        for cid in self.case_ids:
            vol = self.load_case(cid).image_volume
            rows.append({
                "case": cid,
                "stored": "".join(vol.layout.stored_codes),
                "kind": vol.layout.kind,
                "obliquity_deg": round(vol.layout.obliquity_deg, 1),
                "on_load": vol.layout.describe(),
                "shape_zyx": list(vol.shape),
                "spacing_zyx": [round(s, 4) for s in vol.spacing],
            })
        return rows


def open_dataset(root: str | Path, cache: bool = True, pseudolabels: str | None = None) -> FSMISDataset:
    return FSMISDataset(root, cache=cache, pseudolabels=pseudolabels)
