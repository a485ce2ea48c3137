"""Synthetic image + mask cases from a trained generator (docs/generative-augmentation.md, §3–4).

A synthetic case is a real case's label volume with one random in-plane **edit** applied to the
whole volume, and every slice of its image **generated** by the mask-conditioned generator
(``method: generator``, :mod:`fsmis.genaug.generator`) for the edited mask: the edited mask is
the label. It is written as an ordinary dataset folder (``tools/synthesize.py`` is the command
line)::

    OUT/image_<id>.nii.gz, OUT/label_<id>.nii.gz       the source case's stored grid, affine and header
    OUT/<supervoxels_N>/superpix-MIDDLE_<id>.nii.gz    the source's supervoxels, edited alike (if it has them)
    OUT/dataset.json                                   name "<source>_synthetic", modality, labels, test_labels,
                                                       supervoxels, case_ids and the "synthetic" block
    OUT/samples.png                                    rows of [real source slice | edited mask | generated slice]
    OUT/quality.json                                   fsmis.genaug.quality.write_quality (unless quality=False)

The ``synthetic`` block: ``checkpoint`` (the generator run, absolute), ``sources`` {synthetic id:
source id}, ``edits`` {synthetic id: {"kind": ..., parameters}}, ``seed``, ``steps``, ``guidance``,
``per_case``, and how the sources were chosen.

As implemented:

- **Sources.** By default the generator run's own training cases (``RUN/data.json``), of the one
  training dataset whose resolved image folder is ``data``; a ``data`` the generator did not train
  on is refused. Never a case outside that list unless ``cases`` names it explicitly (a synthetic
  case made from a test case would leak it into training); such cases are listed in the block
  (``outside_training``).
- **Edits** (:func:`draw_edit`, :func:`apply_edit`): one per synthetic case, the kind uniformly
  from :data:`EDIT_KINDS`: ``scale`` (factor 0.85–1.15) and ``rotate`` (±10°) about the in-plane
  centroid of the volume's test-class foreground, ``translate`` (up to ±8 % of the in-plane size
  per axis), ``elastic`` (a random displacement field smoothed with a gaussian of σ = 8 % of the
  smaller in-plane size, scaled so that its largest displacement is the amplitude, 2–4 pixels;
  the field is drawn from the ``field_seed`` the edit records). The same in-plane map is applied
  to every slice (nearest neighbour, ``scipy.ndimage.map_coordinates(order=0)``, zero outside),
  so label and supervoxel ids are kept. An edit is reproducible from its JSON record alone.
- **Labels.** Only the dataset's test classes are kept (other ids become 0).
- **Conditioning.** Each slice is generated for the binary union of the test classes in its
  edited label slice (an empty slice gives an empty mask, not a dropped one), with the
  generator's modality token of the dataset and the **class token dropped**: a union of organs
  is no single class, and the generator learnt the class-free score through its class dropout.
- **Randomness.** Synthetic case k of the source with ordinal i (its index in the dataset's
  case ids) draws its edit from ``numpy.random.default_rng([seed, i, k])`` and all its slices,
  in slice order, from one ``torch.Generator`` seeded from ``SeedSequence([seed, i, k, 1])``:
  the same seed gives the same arrays in every file.
- **Intensities.** Generated values in [-1, 1] are mapped linearly to the source volume's
  [min, max] and written float32; labels keep the source label file's integer dtype (a float
  label file gets the smallest of uint8 / int16 / int32 that holds its ids), supervoxels likewise.
- **Case ids** (:func:`synthetic_case_id`): ``M · (k + 1) + i`` with ``M`` = 1000, or the next
  power of ten above both the number of source-dataset cases and its largest numeric case id, so
  synthetic ids never equal a source id, are all digits (the loader sorts them numerically) and
  are unique.
- **Atomic.** Everything is written into a temporary folder beside ``out``
  (:func:`fsmis.atomic.atomic_directory`) that replaces ``out`` at the end: an interrupted run
  leaves ``out`` as it was. ``out`` must not be (or contain, or lie inside) the data folder, its
  supervoxel folder or the generator run; an existing non-empty ``out`` needs ``overwrite``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..data.nifti import DataError

EDIT_KINDS = ("elastic", "scale", "translate", "rotate")
SCALE_RANGE = (0.85, 1.15)
TRANSLATE_FRACTION = 0.08  # of the in-plane size, per axis
ROTATE_DEGREES = 10.0
ELASTIC_AMPLITUDE = (2.0, 4.0)  # pixels: the largest displacement of the field
ELASTIC_SIGMA_FRACTION = 0.08  # gaussian sigma as a fraction of the smaller in-plane size
SAMPLE_ROWS = 4  # rows of samples.png (one per synthetic case, the first ones)
QUALITY_NAME = "quality.json"
SAMPLES_NAME = "samples.png"


class SynthesisError(ValueError):
    """Bad input to the synthesis (a run, a data folder, an output folder); the message names it."""


# -- edits ----------------------------------------------------------------------------------------
def foreground_center(volume: np.ndarray) -> tuple[float, float]:
    """In-plane (y, x) centroid of the non-zero voxels of a [Z, Y, X] volume (image centre if none)."""
    vol = np.asarray(volume)
    fg = np.argwhere(vol.reshape(-1, *vol.shape[-2:]).any(axis=0))
    if len(fg) == 0:
        return (float(vol.shape[-2] - 1) / 2, float(vol.shape[-1] - 1) / 2)
    yx = fg.mean(axis=0)
    return (float(yx[0]), float(yx[1]))


def draw_edit(rng: np.random.Generator, shape_yx, center=None) -> dict:
    """One random edit for an in-plane size ``shape_yx`` (JSON-ready): {"kind": ..., parameters}.

    ``center``: (y, x) about which ``scale`` and ``rotate`` act (default: the image centre)."""
    h, w = (int(s) for s in shape_yx)
    cy, cx = center if center is not None else ((h - 1) / 2, (w - 1) / 2)
    kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
    if kind == "scale":
        return {"kind": kind, "factor": float(rng.uniform(*SCALE_RANGE)), "center": [float(cy), float(cx)]}
    if kind == "rotate":
        return {"kind": kind, "degrees": float(rng.uniform(-ROTATE_DEGREES, ROTATE_DEGREES)),
                "center": [float(cy), float(cx)]}
    if kind == "translate":
        dy, dx = rng.uniform(-TRANSLATE_FRACTION, TRANSLATE_FRACTION, size=2)
        return {"kind": kind, "dy": float(dy * h), "dx": float(dx * w)}
    return {"kind": kind, "amplitude": float(rng.uniform(*ELASTIC_AMPLITUDE)),
            "sigma": float(ELASTIC_SIGMA_FRACTION * min(h, w)), "field_seed": int(rng.integers(2 ** 31))}


def elastic_field(edit: dict, shape_yx) -> np.ndarray:
    """The displacement field [2, H, W] (dy, dx in pixels) of an elastic edit: gaussian noise
    smoothed with ``sigma`` and scaled so that its largest displacement length is ``amplitude``."""
    from scipy.ndimage import gaussian_filter

    h, w = (int(s) for s in shape_yx)
    rng = np.random.default_rng(int(edit["field_seed"]))
    raw = rng.standard_normal((2, h, w))
    field = np.stack([gaussian_filter(raw[i], float(edit["sigma"]), mode="reflect") for i in range(2)])
    peak = float(np.sqrt((field ** 2).sum(0)).max())
    return field * (float(edit["amplitude"]) / peak if peak > 0 else 0.0)


def edit_coordinates(edit: dict, shape_yx) -> np.ndarray:
    """Source coordinates [2, H, W] (y, x) of every output pixel: output(p) = input(coords[:, p])."""
    h, w = (int(s) for s in shape_yx)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    kind = edit.get("kind")
    if kind == "translate":
        return np.stack([yy - float(edit["dy"]), xx - float(edit["dx"])])
    if kind == "elastic":
        return np.stack([yy, xx]) + elastic_field(edit, (h, w))
    if kind in ("scale", "rotate"):
        cy, cx = (float(c) for c in edit["center"])
        y, x = yy - cy, xx - cx
        if kind == "scale":
            s = float(edit["factor"])
            return np.stack([cy + y / s, cx + x / s])
        a = np.deg2rad(float(edit["degrees"]))  # output = R(a) · input about the centre: pull back with R(-a)
        c, s = np.cos(a), np.sin(a)
        return np.stack([cy + c * y + s * x, cx - s * y + c * x])
    raise ValueError(f"unknown edit kind {kind!r} (one of {', '.join(EDIT_KINDS)})")


def apply_edit(volume: np.ndarray, edit: dict) -> np.ndarray:
    """The edit applied to every slice of a label-like volume [Z, Y, X] (or one slice [Y, X]):
    nearest-neighbour resampling, zero outside, dtype and ids kept."""
    from scipy.ndimage import map_coordinates

    vol = np.asarray(volume)
    flat = vol.reshape(-1, *vol.shape[-2:])
    coords = edit_coordinates(edit, flat.shape[-2:])
    out = np.empty_like(flat)
    for z in range(flat.shape[0]):
        out[z] = map_coordinates(flat[z], coords, order=0, mode="constant", cval=0)
    return out.reshape(vol.shape)


# -- seeds and ids ----------------------------------------------------------------------------------
def edit_rng(seed: int, source_index: int, k: int) -> np.random.Generator:
    """The numpy stream of synthetic case ``k`` of the source with ordinal ``source_index``."""
    return np.random.default_rng([int(seed), int(source_index), int(k)])


def torch_seed(seed: int, source_index: int, k: int) -> int:
    """The torch.Generator seed of synthetic case ``k`` of the source with ordinal ``source_index``."""
    state = np.random.SeedSequence([int(seed), int(source_index), int(k), 1]).generate_state(1, np.uint64)[0]
    return int(state) & (2 ** 63 - 1)


def id_base(source_ids) -> int:
    """``M`` of :func:`synthetic_case_id`: 1000, or the next power of ten above the number of source
    cases and every numeric source id."""
    ids = [str(c) for c in source_ids]
    top = max([len(ids)] + [int(c) for c in ids if c.isdigit()])
    m = 1000
    while m <= top:
        m *= 10
    return m


def synthetic_case_id(source_index: int, k: int, base: int) -> str:
    """The id of synthetic case ``k`` of the source with ordinal ``source_index``: ``base·(k+1) + source_index``."""
    return str(int(base) * (int(k) + 1) + int(source_index))


# -- inputs -------------------------------------------------------------------------------------------
def _resolved(p) -> Path:
    return Path(p).expanduser().resolve()


def _inside(a: Path, b: Path) -> bool:
    """a equals b or lies inside it."""
    return a == b or b in a.parents


def check_out_folder(out, data_paths, run_dir, overwrite: bool) -> Path:
    """Refuse an ``out`` that is (inside or around) a data folder or the run, or not empty without overwrite."""
    out_r = _resolved(out)
    for label, p in [*(("the data folder", d) for d in data_paths), ("the generator run", run_dir)]:
        if p is None:
            continue
        pr = _resolved(p)
        if _inside(out_r, pr):
            raise SynthesisError(f"{out}: the output folder is {'' if out_r == pr else 'inside '}{label} {pr}; "
                                 "choose a folder outside it")
        if _inside(pr, out_r):
            raise SynthesisError(f"{out}: the output folder contains {label} {pr}; choose another folder")
    if out_r.exists():
        if not out_r.is_dir():
            raise SynthesisError(f"{out}: exists and is not a folder")
        if any(out_r.iterdir()) and not overwrite:
            raise SynthesisError(f"{out}: folder exists and is not empty (pass --overwrite to replace it)")
    return out_r


def load_generator(checkpoint, device=None):
    """``load_run(checkpoint, "last")`` of a generator run (SynthesisError for any other run)."""
    from ..engine.checkpoints import CheckpointError
    from ..engine.runs import load_run, run_folder

    run = run_folder(checkpoint)
    try:
        from ..config import load_config

        method = load_config(run / "config.yaml").method
    except Exception as exc:  # noqa: BLE001 - reported as the run's problem
        raise CheckpointError(f"{run / 'config.yaml'}: cannot be read ({exc})") from None
    if method != "generator":
        raise SynthesisError(f"{run}: a {method!r} run, not a generator run (method: generator; "
                             "train one with train.py --config configs/generator_*.yaml)")
    return load_run(run, "last", device=device)


def select_sources(loaded, ds, cases=None) -> tuple[list[str], dict]:
    """(source case ids in dataset order, facts for the synthetic block) for the generator run
    ``loaded`` and the dataset ``ds`` (see the module docstring)."""
    from ..engine.runs import DATA_NAME

    ident = loaded.data_identity
    meta = loaded.run_dir / DATA_NAME
    here = str(_resolved(ds.image_dir))
    di, trained = None, None
    if ident is not None:
        dsets = ident.get("datasets") or []
        for i, d in enumerate(dsets):
            if isinstance(d, dict) and d.get("image_dir") == here:
                di = i
                break
        if di is not None:
            trained = [str(c) for d, c in ident.get("cases", []) if int(d) == di]
    if cases is None:
        if ident is None:
            raise SynthesisError(f"{meta}: file not found, so the generator's training cases are unknown; "
                                 "give the source cases explicitly (--cases ID ...)")
        if di is None:
            known = ", ".join(str(d.get("image_dir")) for d in ident.get("datasets") or [] if isinstance(d, dict))
            raise SynthesisError(f"{ds.image_dir}: not the generator's training dataset (it trained on {known or 'none'}, "
                                 f"{meta}); give --data the folder it trained on, or the source cases explicitly "
                                 "(--cases ID ...)")
        if not trained:
            raise SynthesisError(f"{meta}: lists no training case of {ds.image_dir}")
        missing = [c for c in trained if c not in ds.case_ids]
        if missing:
            raise SynthesisError(f"{meta}: training case(s) {missing[:5]} are not cases of {ds.image_dir}")
        order = {c: i for i, c in enumerate(ds.case_ids)}
        return sorted(trained, key=order.get), {"selection": "the generator run's training cases", "dataset_index": di}
    ids = [str(c) for c in cases]
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise SynthesisError(f"--cases: case(s) {dup} given more than once")
    bad = [c for c in ids if c not in ds.case_ids]
    if bad:
        raise SynthesisError(f"{ds.image_dir}: no case(s) {bad} (cases: {', '.join(ds.case_ids)})")
    facts = {"selection": "explicit (--cases)", "dataset_index": di}
    if trained is not None:
        facts["outside_training"] = [c for c in ids if c not in trained]
    else:
        facts["outside_training"] = None  # unknown: the generator did not train on this folder (or no data.json)
    return ids, facts


def _modality(loaded, ds, di) -> str:
    from .generator import modality_token

    mods = loaded.cfg.data.modality
    override = None
    if di is not None:
        override = mods[di] if isinstance(mods, (list, tuple)) else mods
    tok = modality_token(ds, override)
    if tok not in loaded.cfg.model.modalities:
        raise SynthesisError(f"{ds.image_dir}: modality token {tok!r} is not one the generator {loaded.run_dir} knows "
                             f"({list(loaded.cfg.model.modalities)})")
    return tok


def _label_dtype(path, values_max: int):
    import nibabel as nib

    dt = np.dtype(nib.load(str(path)).get_data_dtype())
    if np.issubdtype(dt, np.integer) and np.iinfo(dt).max >= values_max:
        return dt
    for cand in (np.uint8, np.int16, np.int32):
        if np.iinfo(cand).max >= values_max:
            return np.dtype(cand)
    return np.dtype(np.int32)


# -- the picture -----------------------------------------------------------------------------------------
def samples_figure(rows: list[dict], path) -> Path:
    """Rows of [real source slice | edited mask | generated slice] as a PNG (dicts: real, mask, fake, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation.figures import save_figure

    n = max(1, len(rows))
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r]
        ax[0].imshow(row["real"], cmap="gray")
        ax[1].imshow(row["mask"], cmap="magma", vmin=0, vmax=1)
        ax[2].imshow(row["fake"], cmap="gray")
        ax[0].set_ylabel(row.get("label", ""), fontsize=8)
        for a, t in zip(ax, ("real source slice", "edited mask", "generated slice")):
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(t, fontsize=8)
    if not rows:
        for a in axes[0]:
            a.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


# -- the synthesis ----------------------------------------------------------------------------------------
def synthesize(checkpoint, data, out, per_case: int, seed: int = 0, steps: int | None = None,
               guidance: float | None = None, cases=None, device=None, progress: bool = False,
               quality: bool = True, overwrite: bool = False) -> dict:
    """Write ``per_case`` synthetic cases per source case of ``data`` into ``out`` (see the module
    docstring) and return a summary: {"out", "cases", "slices", "seconds", "sources", "quality", ...}."""
    import torch

    from ..atomic import atomic_directory, atomic_write_json
    from ..data.datasets import open_dataset
    from ..data.nifti import save_like

    t0 = time.perf_counter()
    per_case = int(per_case)
    if per_case < 1:
        raise SynthesisError(f"per_case must be >= 1, got {per_case}")
    if int(seed) < 0:
        raise SynthesisError(f"seed must be >= 0, got {seed}")
    if steps is not None and int(steps) < 1:
        raise SynthesisError(f"steps must be >= 1, got {steps}")
    if guidance is not None and not float(guidance) >= 0:
        raise SynthesisError(f"guidance must be >= 0, got {guidance}")
    ds = open_dataset(data)
    # refuse a bad output folder before the (slow) model load
    data_paths = [ds.input_root, ds.image_dir, ds.supervoxel_dir]
    check_out_folder(out, data_paths, None, overwrite)
    loaded = load_generator(checkpoint, device)
    out = check_out_folder(out, data_paths, loaded.run_dir, overwrite)
    method = loaded.method
    mcfg = loaded.cfg.model
    steps = int(steps or mcfg.sample_steps)
    guidance = float(mcfg.guidance if guidance is None else guidance)
    sources, facts = select_sources(loaded, ds, cases)
    token = _modality(loaded, ds, facts.get("dataset_index"))
    test_ids = [int(ds.class_id(c)) for c in ds.test_classes]
    base = id_base(ds.case_ids)
    ordinal = {c: i for i, c in enumerate(ds.case_ids)}
    sv_name = ds.supervoxel_dir.name if ds.supervoxel_dir is not None else None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(int(ds.load_case(c).image.shape[0]) for c in sources) * per_case
        bar = tqdm(total=total, desc="synthesize", unit="slice")
    block_sources, edits, samples, ids = {}, {}, [], []
    n_slices = 0
    try:
        with atomic_directory(out) as tmp:
            tmp = Path(tmp)
            if sv_name:
                (tmp / sv_name).mkdir()
            for src in sources:
                i = ordinal[src]
                case = ds.load_case(src, supervoxels=sv_name is not None)
                lo, hi = float(case.image.min()), float(case.image.max())
                kept = np.where(np.isin(case.label, test_ids), case.label, 0).astype(case.label.dtype)
                center = foreground_center(kept)
                lab_dtype = _label_dtype(ds.label_path(src), int(kept.max()) if kept.size else 0)
                sv_dtype = None
                if sv_name:
                    sv_dtype = _label_dtype(ds.supervoxel_path(src), int(case.supervoxels.max()))
                for k in range(per_case):
                    sid = synthetic_case_id(i, k, base)
                    edit = draw_edit(edit_rng(seed, i, k), kept.shape[-2:], center)
                    label = apply_edit(kept, edit)
                    union = (label > 0).astype(np.float32)
                    gen = torch.Generator().manual_seed(torch_seed(seed, i, k))
                    fake = method.generate(union, token, None, gen, steps=steps, guidance=guidance)
                    image = (lo + (fake.astype(np.float64) + 1.0) / 2.0 * (hi - lo)).astype(np.float32)
                    save_like(image, case.image_volume, tmp / f"image_{sid}.nii.gz", dtype=np.float32)
                    save_like(label, case.image_volume, tmp / f"label_{sid}.nii.gz", dtype=lab_dtype)
                    if sv_name:
                        sv = apply_edit(case.supervoxels, edit)
                        save_like(sv, case.image_volume, tmp / sv_name / f"superpix-MIDDLE_{sid}.nii.gz",
                                  dtype=sv_dtype)
                    block_sources[sid], edits[sid] = src, edit
                    ids.append(sid)
                    n_slices += int(image.shape[0])
                    if len(samples) < SAMPLE_ROWS:
                        area = union.reshape(union.shape[0], -1).sum(1)
                        z = int(np.argmax(area))
                        samples.append({"real": case.image[z], "mask": union[z], "fake": image[z],
                                        "label": f"{sid} ← {src}, z={z}\n{edit['kind']}"})
                    if bar is not None:
                        bar.update(int(image.shape[0]))
            from ..data.case_ids import sort_case_ids

            case_ids = sort_case_ids(ids)
            block = {"checkpoint": str(loaded.run_dir.resolve()), "step": loaded.step,
                     "source_data": str(_resolved(ds.image_dir)), "selection": facts["selection"],
                     "sources": {c: block_sources[c] for c in case_ids},
                     "edits": {c: edits[c] for c in case_ids}, "seed": int(seed), "steps": steps,
                     "guidance": guidance, "per_case": per_case, "modality_token": token, "class_token": None,
                     "conditioning": "binary union of the test classes of each edited label slice"}
            if "outside_training" in facts:
                block["outside_training"] = facts["outside_training"]
            meta = {"name": f"{ds.name}_synthetic", "modality": ds.modality,
                    "labels": {"background": 0, **{c: int(ds.class_id(c)) for c in ds.test_classes}},
                    "test_labels": list(ds.test_classes)}
            if sv_name:
                meta["supervoxels"] = sv_name
            meta.update({"case_ids": case_ids, "synthetic": block})
            atomic_write_json(tmp / "dataset.json", meta)
            samples_figure(samples, tmp / SAMPLES_NAME)
            if sv_name:  # atomic_directory syncs the top-level files; these lie one folder down
                import os

                for f in (tmp / sv_name).iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    summary = {"out": str(out), "cases": len(ids), "slices": n_slices, "sources": len(sources),
               "per_case": per_case, "steps": steps, "guidance": guidance, "seed": int(seed),
               "checkpoint": str(loaded.run_dir.resolve()), "seconds_synthesis": round(seconds, 3),
               "quality": None}
    if quality:
        summary["quality"] = run_quality(ds.input_root, out, device=device, progress=progress)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def run_quality(real, synthetic, device=None, progress: bool = False) -> str:
    """``write_quality(real, synthetic, synthetic/quality.json)``; returns the file written. The
    synthetic folder is complete before this runs: a failure here names it and leaves it in place."""
    from ..cli import expected_errors
    from .quality import write_quality

    path = Path(synthetic) / QUALITY_NAME
    try:
        write_quality(real=real, synthetic=synthetic, out_json=path, device=device, progress=progress)
    except expected_errors() as exc:
        raise SynthesisError(f"{synthetic}: written, but its quality report failed: {exc} (rerun it with "
                             f"tools/synth_quality.py --real {real} --synthetic {synthetic} --out {path})") from exc
    return str(path)


def read_block(path) -> dict:
    """The ``synthetic`` block of ``path`` (a synthetic folder or its dataset.json)."""
    p = Path(path)
    meta = p / "dataset.json" if p.is_dir() else p
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta}: cannot be read ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("synthetic"), dict):
        raise DataError(f"{meta}: no 'synthetic' block")
    return info["synthetic"]


__all__ = ["EDIT_KINDS", "SynthesisError", "draw_edit", "apply_edit", "edit_coordinates", "elastic_field",
           "foreground_center", "edit_rng", "torch_seed", "id_base", "synthetic_case_id", "check_out_folder",
           "load_generator", "select_sources", "samples_figure", "synthesize", "run_quality", "read_block"]
