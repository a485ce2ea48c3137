"""Test-time support enlargement (fsmis/genaug/support.py; test.py / tools/predict.py
--synthetic-support): the wrapped predictor sees K = 1 + M support slices, the variants are
deterministic and on the support's scale, and the results' protocol block records M."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fsmis.config import load_config
from fsmis.data.datasets import open_dataset
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine.trainer import Trainer
from fsmis.evaluation.protocol import ProtocolConfig, evaluate
from fsmis.genaug.support import SyntheticSupport
from fsmis.methods.base import Predictor
from fsmis.methods.support_copy import SupportCopy
from fsmis.models.presets import TINY_UNET, TINY_VAE

from _cli import clean_error, run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("support")
    data = root / "ct"
    make_phantom_dataset(data, modality="ct", n_cases=4, seed=3, shape=(8, 48, 48), supervoxels=True, progress=False)
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(root / "vae"), safe_serialization=True)
    raw = {"name": "gen", "method": "generator",
           "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "fold": 0},
           "model": {"vae_path": str(root / "vae"), "unet": dict(TINY_UNET), "sample_steps": 2, "preview_steps": 2},
           "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "ckpt_every": 2, "val_every": 0,
                     "image_every": 0, "log_every": 1, "seed": 5}}
    (root / "gen.yaml").write_text(yaml.safe_dump(raw))
    Trainer(load_config(root / "gen.yaml"), root / "gen", "cpu", progress=False).setup().fit()
    return {"root": root, "data": data, "gen": root / "gen"}


class Recorder(Predictor):
    name = "recorder"
    normalization = "minmax"

    def __init__(self):
        self.calls = []

    def predict(self, support_images, support_masks, query_images):
        self.calls.append((np.array(support_images), np.array(support_masks)))
        return np.zeros(query_images.shape, np.uint8)


def _support(ds, case="1"):
    from fsmis.data.normalize import normalize_volume

    c = ds.load_case(case)
    z = int(np.argmax((c.label > 0).reshape(c.label.shape[0], -1).sum(1)))
    img = normalize_volume(c.image, "minmax")[z:z + 1]
    ids, counts = np.unique(c.label[z][c.label[z] > 0], return_counts=True)
    cls = int(ids[np.argmax(counts)])  # the largest class of the slice
    return img, (c.label[z:z + 1] == cls).astype(np.float32)


def test_the_predictor_sees_one_plus_m_support_slices(env):
    ds = open_dataset(env["data"])
    img, msk = _support(ds)
    rec = Recorder()
    wrapped = SyntheticSupport(rec, env["gen"], 3, "CT", seed=4)
    q = np.zeros((2,) + img.shape[1:], np.float32)
    wrapped.predict(img, msk, q)
    wrapped.predict(img, msk, q)
    (si, sm), (si2, sm2) = rec.calls
    assert si.shape == (4,) + img.shape[1:] and sm.shape == si.shape
    assert np.array_equal(si[0], img[0]) and np.array_equal(sm[0], msk[0])  # the real support first
    assert np.array_equal(si, si2) and np.array_equal(sm, sm2)  # deterministic per support
    assert wrapped.generator.generated == 3  # the second call was served from the cache
    rec_fresh = Recorder()  # a fresh wrapper (empty cache) generates the same variants
    fresh = SyntheticSupport(rec_fresh, env["gen"], 3, "CT", seed=4)
    fresh.predict(img, msk, q)
    assert fresh.generator.generated == 3 and np.array_equal(rec_fresh.calls[0][0], si)
    lo, hi = img.min(), img.max()
    assert si[1:].min() >= lo - 1e-5 and si[1:].max() <= hi + 1e-5  # on the support's scale
    assert set(np.unique(sm[1:])) <= {0.0, 1.0} and all(sm[k].sum() > 0 for k in range(1, 4))
    assert not all(np.array_equal(sm[k], sm[0]) for k in range(1, 4))  # edited masks
    assert wrapped.describe()["synthetic_support"] == 3 and wrapped.name == "recorder"
    # another seed gives other variants
    rec2 = Recorder()
    SyntheticSupport(rec2, env["gen"], 3, "CT", seed=5).predict(img, msk, q)
    assert not np.array_equal(rec2.calls[0][0], si)
    with pytest.raises(ValueError, match="modalities"):
        SyntheticSupport(rec, env["gen"], 1, "XR")
    with pytest.raises(ValueError, match=">= 1"):
        SyntheticSupport(rec, env["gen"], 0, "CT")


def test_results_protocol_records_the_synthetic_support(env):
    ds = open_dataset(env["data"])
    cfg = ProtocolConfig(support_case="1", query_cases=["2"], surface_metrics=False)
    plain = evaluate(ds, SupportCopy(), cfg, progress=False)
    assert plain["protocol"]["synthetic_support"] == 0
    enlarged = evaluate(ds, SyntheticSupport(SupportCopy(), env["gen"], 2, "CT"),
                        ProtocolConfig(support_case="1", query_cases=["2"], surface_metrics=False), progress=False)
    assert enlarged["protocol"]["synthetic_support"] == 2
    from pathlib import Path

    assert Path(enlarged["method"]["generator"]).resolve() == env["gen"].resolve()


def test_test_py_and_predict_py_options(env, tmp_path):
    data = env["data"]
    p = run(["test.py", "--method", "support-copy", "--data", data, "--out", tmp_path / "r", "--synthetic-support", "2",
             "--quiet"])
    assert p.returncode == 2 and "go together" in p.stderr
    p = run(["test.py", "--method", "support-copy", "--data", data, "--out", tmp_path / "r", "--synthetic-support", "1",
             "--generator", env["gen"], "--support-case", "1", "--query-cases", "2", "--no-surface", "--no-nifti",
             "--no-figures", "--quiet"])
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["protocol"]["synthetic_support"] == 1 and "synthetic support 1" in (tmp_path / "r" / "results.md").read_text()
    p = run(["tools/predict.py", "--method", "support-copy", "--support-image", data / "image_1.nii.gz",
             "--support-label", data / "label_1.nii.gz", "--label", "1", "--query-image", data / "image_2.nii.gz",
             "--out", tmp_path / "p.nii.gz", "--synthetic-support", "1"])
    assert p.returncode == 2 and "--generator" in p.stderr
    p = run(["tools/predict.py", "--method", "support-copy", "--support-image", data / "image_1.nii.gz",
             "--support-label", data / "label_1.nii.gz", "--label", "1", "--query-image", data / "image_2.nii.gz",
             "--out", tmp_path / "p.nii.gz", "--synthetic-support", "1", "--generator", env["gen"], "--modality", "XR"])
    clean_error(p, "modalities")
    p = run(["tools/predict.py", "--method", "support-copy", "--support-image", data / "image_1.nii.gz",
             "--support-label", data / "label_1.nii.gz", "--label", "1", "--query-image", data / "image_2.nii.gz",
             "--out", tmp_path / "p.nii.gz", "--synthetic-support", "1", "--generator", env["gen"], "--modality", "CT"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "p.nii.gz").is_file()


# -- the zero-shot support ----------------------------------------------------------------------------
def test_zero_shot_support_in_the_evaluator(env, tmp_path):
    from fsmis.genaug.zeroshot import MaskSupportGenerator, MaskSupportSource

    other = tmp_path / "mr"
    make_phantom_dataset(other, modality="mr", n_cases=4, seed=9, shape=(8, 48, 48), supervoxels=False, progress=False)
    ds = open_dataset(env["data"])
    src = MaskSupportSource(other, MaskSupportGenerator(env["gen"], "CT", seed=1))
    res = evaluate_with(ds, SupportCopy(), src)
    assert res["protocol"]["support_from_mask"] == open_dataset(other).name
    assert res["support_source"]["dataset"] == open_dataset(other).name
    # support-copy of the generated support is support-copy of the other dataset's mask: the same Dice as a
    # hand-made evaluation whose support slices are those masks
    mask_case = res["folds"][0]["support"].split(":")[1]
    assert mask_case == src.mask_case(0, "canonical", 2, 5)
    rec = Recorder()
    evaluate_with(ds, rec, src)
    lab = open_dataset(other).load_case(mask_case).label
    for si, sm in rec.calls:
        assert si.shape == sm.shape and si.shape[0] == 1
        assert any(np.array_equal(sm[0], (lab[z] == k).astype(np.float32)) for z in range(lab.shape[0])
                   for k in open_dataset(other).classes.values())
        assert -1.0 - 1e-5 <= si.min() and si.max() <= 1.0 + 1e-5  # generated, minmax-normalised


def evaluate_with(ds, predictor, source):
    from fsmis.evaluation.protocol import Evaluator

    cfg = ProtocolConfig(fold_ids=[0], surface_metrics=False)
    return Evaluator(ds, predictor, cfg, progress=False, support_source=source).run()


def test_zero_shot_predict_py_writes_on_the_query_grid(env, tmp_path):
    import nibabel as nib

    data = env["data"]
    out = tmp_path / "z.nii.gz"
    p = run(["tools/predict.py", "--method", "support-copy", "--support-mask", data / "label_1.nii.gz",
             "--generator", env["gen"], "--modality", "CT", "--label", "1", "--query-image", data / "image_2.nii.gz",
             "--out", out])
    assert p.returncode == 0, p.stderr[-2000:]
    q = nib.load(str(data / "image_2.nii.gz"))
    o = nib.load(str(out))
    assert o.shape == q.shape and np.allclose(o.affine, q.affine)
    assert np.asarray(o.dataobj).any()
    p = run(["tools/predict.py", "--method", "support-copy", "--support-mask", data / "label_1.nii.gz",
             "--label", "1", "--query-image", data / "image_2.nii.gz", "--out", out])
    assert p.returncode == 2 and "--generator" in p.stderr
    p = run(["tools/predict.py", "--method", "support-copy", "--support-mask", data / "label_1.nii.gz",
             "--support-image", data / "image_1.nii.gz", "--generator", env["gen"], "--modality", "CT", "--label", "1",
             "--query-image", data / "image_2.nii.gz", "--out", out])
    assert p.returncode == 2 and "one kind of support" in p.stderr
    p = run(["test.py", "--method", "support-copy", "--data", data, "--out", tmp_path / "r", "--support-from-mask-of",
             data, "--quiet"])
    assert p.returncode == 2 and "go together" in p.stderr
