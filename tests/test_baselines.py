"""The prototype baselines and UniverSeg as methods (fsmis/models/baselines/prototypes.py,
fsmis/methods/baselines.py): prototype pooling and local prototypes on crafted features, the
alignment loss when support and query coincide, ADNet's threshold, batched == one at a time, and
train.py / test.py on each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fsmis.config import load_config
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine.method import method_class
from fsmis.models.baselines import prototypes as P

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("panet", "alpnet", "adnet", "universeg")


class TwoClassFeatures(nn.Module):
    """A crafted 'encoder': channel 0 = 1 where the image is positive, channel 1 = 1 elsewhere, on the
    image grid: foreground and background features are orthogonal."""

    def forward(self, x):
        fg = (x[:, :1] > 0).float()
        return torch.cat([fg, 1.0 - fg], dim=1)


def _square(size=16, lo=4, hi=10):
    m = torch.zeros(size, size)
    m[lo:hi, lo:hi] = 1.0
    return m


def test_masked_average_pools_the_region_mean():
    feats = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0
    proto = P.masked_average(feats, mask)
    exp = feats[0, :, :2, :2].mean(dim=(1, 2))
    assert torch.allclose(proto[0], exp, atol=1e-4)
    # the mask resized to the features (SSL-ALPNet) vs the features to the mask (PANet, ADNet)
    big = torch.zeros(1, 8, 8)
    big[0, :4, :4] = 1.0
    assert torch.allclose(P.masked_average(feats, big, upsample=False)[0], exp, atol=1e-4)
    up = P.masked_average(feats, big, upsample=True)[0]
    assert up.shape == (2,) and not torch.allclose(up, exp)  # bilinear features differ at the border


def test_local_prototypes_keep_the_windows_inside_the_mask():
    feats = torch.arange(4 * 4, dtype=torch.float32).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0  # exactly the top-left 2 x 2 window
    mask[0, 2, 2] = 1.0  # a quarter of the bottom-right window: below 0.95
    protos = P.local_prototypes(feats, mask, window=2, thresh=0.95)
    assert protos.shape == (1, 3)
    assert torch.allclose(protos[0], feats[0, :, :2, :2].mean(dim=(1, 2)))
    assert P.local_prototypes(feats, mask, window=2, thresh=0.2).shape == (2, 3)
    # the class score is sum softmax(d) * d: with one prototype it is the scaled cosine
    q = torch.randn(2, 3, 4, 4)
    assert torch.allclose(P.alp_score(q, protos), P.cosine_map(q, protos, eps=1e-4), atol=1e-5)


def test_cosine_map_is_the_scaled_cosine():
    f = torch.randn(2, 5, 3, 3)
    p = torch.randn(4, 5)
    ref = torch.stack([torch.nn.functional.cosine_similarity(f, p[i][None, :, None, None], dim=1)
                       for i in range(4)], dim=1) * 20
    assert torch.allclose(P.cosine_map(f, p), ref, atol=1e-5)


@pytest.mark.parametrize("name", ["panet", "alpnet", "adnet"])
def test_the_alignment_loss_vanishes_when_support_and_query_coincide(name):
    # ADNet's loss is bounded below by its threshold's softness: sharpen it (scaler 200, t half-way)
    kw = {"alpnet": {"window": 2, "window_eval": 2}, "adnet": {"scaler": 200.0, "t_init": -100.0}}.get(name, {})
    net = P.MODELS[name](TwoClassFeatures(), **kw)
    net.train()
    mask = _square()
    img = mask * 2 - 1  # positive inside the square
    feats = net.encoder(img[None, None])
    out = net.logits(feats, mask[None], feats)
    same = net.align_loss(feats, out, feats, mask[None])
    assert float(same.detach()) < 1e-4
    # a query prediction with foreground and background swapped: its prototypes cannot segment the support
    assert float(net.align_loss(feats, out.flip(1), feats, mask[None]).detach()) > 0.1


def test_adnet_threshold_moves_the_decision():
    net = P.ADNet(TwoClassFeatures())
    torch.manual_seed(0)
    feats = torch.randn(1, 2, 16, 16)
    mask = _square()
    areas = []
    for t in (-40.0, -20.0, -10.0, 0.0, 10.0, 40.0):
        net.t.data.fill_(t)
        p = net.logits(feats, mask[None], feats)[:, 1]
        areas.append(int((p > 0.5).sum()))
    assert areas == sorted(areas)  # a higher threshold admits more anomalous pixels as foreground
    assert areas[0] == 0 and areas[-1] == 16 * 16


def test_alpnet_falls_back_to_the_global_prototype_for_a_tiny_class():
    net = P.ALPNet(TwoClassFeatures(), window=4, window_eval=4).eval()
    mask = torch.zeros(16, 16)
    mask[7:9, 7:9] = 1.0  # no 4 x 4 window reaches 0.95
    feats = net.encoder((mask * 2 - 1)[None, None])
    out = net.logits(feats, mask[None], feats)
    assert torch.isfinite(out).all() and out.shape == (1, 2, 16, 16)
    assert (out.argmax(dim=1)[0].bool() == mask.bool()).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bl") / "ct"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    return out


def _cfg(name, data, *extra):
    over = [f"data.root={data}", "data.image_size=32", "data.min_fg_pixels=10", "train.max_steps=3",
            "train.batch_size=2", "train.val_every=0", "train.ckpt_every=3", "train.warmup_steps=1",
            "eval.chunk_batch=3", *extra]
    if name == "universeg":
        over += ["model.encoder_blocks=[4, 4, 4]", "data.n_shot=2"]
    else:
        over += ["model.backbone_widths=[4, 4, 8, 8]", "model.feat_dim=8"]
    return load_config(ROOT / "configs" / f"{name}_demo.yaml", over)


@pytest.mark.parametrize("name", METHODS)
def test_batched_prediction_equals_one_query_at_a_time(name, tiny):
    cfg = _cfg(name, tiny)
    torch.manual_seed(0)
    method = method_class(name)(cfg, "cpu")
    method.build()
    rng = np.random.default_rng(1)
    s_img = rng.normal(size=(2, 40, 40)).astype(np.float32)
    s_msk = np.zeros((2, 40, 40), np.float32)
    s_msk[:, 10:25, 12:30] = 1
    q_img = rng.normal(size=(5, 40, 40)).astype(np.float32)
    pred = method.predictor()
    batched = pred.probability(s_img, s_msk, q_img)
    method.cfg.eval.chunk_batch = 1
    single = np.concatenate([pred.probability(s_img, s_msk, q_img[i:i + 1]) for i in range(5)])
    assert batched.shape == (5, 40, 40)
    assert np.allclose(batched, single, atol=1e-5)
    assert set(np.unique(pred.predict(s_img, s_msk, q_img))) <= {0, 1}


def test_universeg_prediction_is_invariant_to_the_order_of_the_support(tiny):
    cfg = _cfg("universeg", tiny)
    torch.manual_seed(0)
    method = method_class("universeg")(cfg, "cpu")
    method.build()
    rng = np.random.default_rng(2)
    s_img = rng.normal(size=(8, 32, 32)).astype(np.float32)
    s_msk = (rng.random((8, 32, 32)) > 0.7).astype(np.float32)
    q = rng.normal(size=(2, 32, 32)).astype(np.float32)
    pred = method.predictor()
    a = pred.probability(s_img, s_msk, q)
    order = rng.permutation(8)
    assert np.allclose(a, pred.probability(s_img[order], s_msk[order], q), atol=1e-5)
    assert pred.probability(s_img[:1], s_msk[:1], q).shape == (2, 32, 32)


def test_same_slice_sampler_needs_augmentation(tiny):
    cfg = _cfg("alpnet", tiny, "data.augment=false")
    method = method_class("alpnet")(cfg, "cpu")
    with pytest.raises(ValueError, match="augment"):
        method.setup_data()


@pytest.mark.parametrize("name", METHODS)
def test_each_baseline_trains_with_train_py_and_is_scored_by_test_py(name, tiny, tmp_path):
    extra = ["data.image_size=32", "data.min_fg_pixels=10", "train.max_steps=2", "train.batch_size=2",
             "train.val_every=0", "train.ckpt_every=2", "train.warmup_steps=1", "eval.chunk_batch=8"]
    extra += (["model.encoder_blocks=[4, 4, 4]", "data.n_shot=2"] if name == "universeg"
              else ["model.backbone_widths=[4, 4, 8, 8]", "model.feat_dim=8"])
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{name}_demo.yaml"),
                        "--out", str(run), "--quiet", "--device", "cpu", f"data.root={tiny}", *extra],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 2
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, str(ROOT / "test.py"), "--method", name, "--checkpoint", str(run),
                        "--data", str(tiny), "--out", str(out), "--quiet", "--no-figures", "--no-nifti",
                        "--no-surface"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["method"]["method"] == name and 0.0 <= res["mean_dice"] <= 1.0
    # the other method's name is refused for this run
    wrong = "panet" if name != "panet" else "adnet"
    r = subprocess.run([sys.executable, str(ROOT / "test.py"), "--method", wrong, "--checkpoint", str(run),
                        "--data", str(tiny), "--out", str(tmp_path / "bad"), "--quiet"], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and name in r.stderr


def test_dry_run_checks_a_coco_layout_backbone_file(tmp_path):
    """train.py --dry-run with model.backbone_weights: exit 0 on a complete COCO-layout file (torchvision
    deeplabv3_resnet101 key names, backbone. prefix, random weights), 2 naming the key when one trunk
    tensor is missing."""
    from fsmis.models.baselines.backbones import ResNetTrunk

    torch.manual_seed(0)
    trunk = ResNetTrunk(101).state_dict()
    full = {f"backbone.{k}": v for k, v in trunk.items()}
    full.update({"classifier.4.weight": torch.zeros(21, 256, 1, 1), "aux_classifier.4.weight": torch.zeros(21, 256, 1, 1)})
    good = tmp_path / "coco.pth"
    torch.save(full, good)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "alpnet_abd_mri_setting1.yaml"),
           "--dry-run", f"data.root={tmp_path / 'no_data'}"]
    r = subprocess.run([*cmd, f"model.backbone_weights={good}"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(trunk)}/{len(trunk)}" in r.stdout and "2 head tensors ignored" in r.stdout
    gone = "backbone.layer3.7.conv2.weight"
    del full[gone]
    bad = tmp_path / "partial.pth"
    torch.save(full, bad)
    r = subprocess.run([*cmd, f"model.backbone_weights={bad}"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2
    assert "layer3.7.conv2.weight" in r.stderr and str(bad) in r.stderr


def test_the_pseudolabel_folder_is_a_data_option(tiny, tmp_path):
    """data.pseudolabels names the folder episodes draw classes from (SSL-ALPNet's 2D superpixels);
    a missing folder stops with the command that writes it."""
    import shutil

    from fsmis.data.datasets import open_dataset
    from fsmis.data.nifti import DataError

    data = tmp_path / "ct"
    shutil.copytree(tiny, data)
    sv = open_dataset(data).supervoxel_dir
    shutil.copytree(sv, data / "superpixels_400")
    assert open_dataset(data, pseudolabels="superpixels_400").supervoxel_dir == data / "superpixels_400"
    with pytest.raises(DataError, match="--mode 2d"):
        open_dataset(data, pseudolabels="superpixels_99")
    cfg = _cfg("alpnet", data, "data.pseudolabels=superpixels_400")
    method = method_class("alpnet")(cfg, "cpu")
    method.setup_data()
    assert method.dataset.supervoxel_dir == data / "superpixels_400"
