"""UniverSeg (fsmis.models.baselines.universeg): shapes, support-order invariance, batch independence,
the official pair-convolution semantics, the published key layout, and strict weight loading.

Tiny configurations on 32 x 32 inputs; the published nf64 network is only built on the meta device.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fsmis.models.baselines.universeg import (UniverSeg, load_universeg_weights, universeg_from_config,
                                              universeg_v1)
from fsmis.models.weights import ComponentLoad, WeightLoadError

TINY = {"encoder_blocks": [8, 8, 8]}
H = W = 32


def _model(seed: int = 0, config=TINY) -> UniverSeg:
    torch.manual_seed(seed)
    return universeg_from_config(config).eval()


def _inputs(b: int = 2, s: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, H, W, generator=g), torch.rand(b, s, 1, H, W, generator=g),
            (torch.rand(b, s, 1, H, W, generator=g) > 0.5).float())


@pytest.mark.parametrize("s", [1, 8])
def test_logits_shape_for_support_sizes(s):
    model = _model()
    with torch.no_grad():
        y = model(*_inputs(b=2, s=s))
    assert y.shape == (2, 1, H, W)
    assert torch.isfinite(y).all()


def test_support_order_does_not_matter():
    model = _model()
    x, si, sl = _inputs(b=2, s=5)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        a = model(x, si, sl)
        b = model(x, si[:, perm], sl[:, perm])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_batch_equals_one_at_a_time():
    model = _model()
    x, si, sl = _inputs(b=3, s=4)
    with torch.no_grad():
        batched = model(x, si, sl)
        single = torch.cat([model(x[i:i + 1], si[i:i + 1], sl[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def _reference_forward(sd: dict, n_levels: int, x, si, sl):
    """The official forward written literally from its state_dict: each CrossConv runs one conv over
    the concatenated [target | support entry] of every pair (target repeated S times), no nonlinearity,
    target = mean over pairs; then conv + LeakyReLU per side; max-pool down, bilinear
    (align_corners=True) up with [upsampled, skip] order; 1x1 output conv."""
    def block(prefix, t, s):  # t [B, 1, C, H, W], s [B, S, C, H, W]
        b, n = s.shape[:2]
        pairs = torch.cat([t.expand(-1, n, -1, -1, -1), s], dim=2).flatten(0, 1)
        z = F.conv2d(pairs, sd[f"{prefix}.cross.cross_conv.weight"], sd[f"{prefix}.cross.cross_conv.bias"],
                     padding=1).unflatten(0, (b, n))
        t = z.mean(dim=1, keepdim=True)

        def side(name, v):
            k = v.shape[1]
            out = F.conv2d(v.flatten(0, 1), sd[f"{prefix}.{name}.vmapped.conv.weight"],
                           sd[f"{prefix}.{name}.vmapped.conv.bias"], padding=1)
            return F.leaky_relu(out).unflatten(0, (v.shape[0], k))
        return side("target", t), side("support", z)

    def each(fn, v):
        return fn(v.flatten(0, 1)).unflatten(0, v.shape[:2])

    t, s = x.unsqueeze(1), torch.cat([si, sl], dim=2)
    skips = []
    for i in range(n_levels):
        t, s = block(f"enc_blocks.{i}", t, s)
        if i < n_levels - 1:
            skips.append((t, s))
            t, s = each(lambda v: F.max_pool2d(v, 2), t), each(lambda v: F.max_pool2d(v, 2), s)
    up = torch.nn.UpsamplingBilinear2d(scale_factor=2)
    for i in range(n_levels - 1):
        ts, ss = skips.pop()
        t = torch.cat([each(up, t), ts], dim=2)
        s = torch.cat([each(up, s), ss], dim=2)
        t, s = block(f"dec_blocks.{i}", t, s)
    return F.conv2d(t[:, 0], sd["out_conv.conv.weight"], sd["out_conv.conv.bias"])


def test_matches_concatenated_pair_convolution():
    """The split cross convolution equals the official conv over [target | support] pairs."""
    model = _model(config={"encoder_blocks": [8, 12, 16]})
    inputs = _inputs(b=2, s=3)
    with torch.no_grad():
        ours = model(*inputs)
        ref = _reference_forward(model.state_dict(), 3, *inputs)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_published_layout():
    """Key names / shapes as in JJGO/UniverSeg universeg/model.py (UniverSeg(encoder_blocks=[64]*4))
    and its parameter count, computed by hand from that architecture:
    enc 0: cross 3->64 (1,792) + two 64->64 3x3 convs (2 x 36,928) = 75,648;
    enc 1-3: cross 128->64 (73,792) + 73,856 = 147,648 each;
    dec 0-2: cross 256->64 (147,520) + 73,856 = 221,376 each; out 1x1 64->1: 65;
    total 75,648 + 3 x 147,648 + 3 x 221,376 + 65 = 1,182,785 (the paper's "1.18M")."""
    with torch.device("meta"):
        model = universeg_v1()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["enc_blocks.0.cross.cross_conv.weight"] == (64, 3, 3, 3)
    assert shapes["enc_blocks.1.cross.cross_conv.weight"] == (64, 128, 3, 3)
    assert shapes["enc_blocks.3.support.vmapped.conv.weight"] == (64, 64, 3, 3)
    assert shapes["dec_blocks.0.cross.cross_conv.weight"] == (64, 256, 3, 3)
    assert shapes["dec_blocks.2.target.vmapped.conv.bias"] == (64,)
    assert shapes["out_conv.conv.weight"] == (1, 64, 1, 1)
    assert shapes["out_conv.conv.bias"] == (1,)
    assert len(shapes) == 44 and not any(k.startswith("dec_blocks.3") for k in shapes)
    assert sum(p.numel() for p in model.parameters()) == 1_182_785
    assert model.config == {"encoder_blocks": [[64, 64]] * 4, "decoder_blocks": [[64, 64]] * 3}


def test_config_builder():
    model = universeg_from_config({"encoder_blocks": [16, 16, 16], "decoder_blocks": [[16, 8], 8]})
    assert len(model.enc_blocks) == 3 and len(model.dec_blocks) == 2
    assert model.state_dict()["out_conv.conv.weight"].shape == (1, 8, 1, 1)
    rebuilt = universeg_from_config(model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="encoder_block"):
        universeg_from_config({"encoder_block": [16]})
    with pytest.raises(ValueError, match="decoder_blocks needs 2"):
        universeg_from_config({"encoder_blocks": [16, 16, 16], "decoder_blocks": [16]})
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 1, 30, 30), torch.rand(1, 2, 1, 30, 30), torch.rand(1, 2, 1, 30, 30))


def _save(sd: dict, path, fmt: str):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip_loads_strictly(tmp_path, fmt):
    src, dst = _model(seed=0), _model(seed=1)
    path = tmp_path / f"universeg.{fmt}"
    _save(src.state_dict(), path, fmt)
    inputs = _inputs()
    with torch.no_grad():
        assert not torch.allclose(src(*inputs), dst(*inputs))
        report = load_universeg_weights(dst, path)
        torch.testing.assert_close(dst(*inputs), src(*inputs), atol=0, rtol=0)
    assert isinstance(report, ComponentLoad) and report.ok and report.pretrained
    assert report.loaded == report.expected == len(src.state_dict())
    assert report.source == str(path) and not (report.missing or report.unexpected or report.mismatched)


@pytest.mark.parametrize("outer", ["state_dict", "model"])
def test_nested_state_dict(tmp_path, outer):
    src, dst = _model(seed=0), _model(seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save({outer: src.state_dict(), "step": 3}, path)
    report = load_universeg_weights(dst, path)
    assert report.loaded == report.expected
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_missing_key_is_named(tmp_path):
    sd = _model().state_dict()
    del sd["dec_blocks.1.support.vmapped.conv.bias"]
    path = tmp_path / "missing.pt"
    torch.save(sd, path)
    with pytest.raises(WeightLoadError, match=r"1 missing key\(s\): dec_blocks\.1\.support\.vmapped\.conv\.bias") as e:
        load_universeg_weights(_model(seed=1), path)
    assert str(path) in str(e.value)


def test_unexpected_key_is_named(tmp_path):
    sd = _model().state_dict()
    sd["extra.head.weight"] = torch.zeros(2)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightLoadError, match=r"1 unexpected key\(s\): extra\.head\.weight") as e:
        load_universeg_weights(_model(seed=1), path)
    assert str(path) in str(e.value)


def test_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(_model(config={"encoder_blocks": [16, 16, 16]}).state_dict(), path)
    with pytest.raises(WeightLoadError, match=r"shape-mismatched key\(s\): dec_blocks\.0\.cross\.cross_conv\.bias"):
        load_universeg_weights(_model(), path)


class _NotATensor:
    pass


def test_refuses_pickled_objects_and_bad_files(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"w": torch.zeros(1), "obj": _NotATensor()}, path)
    with pytest.raises(WeightLoadError, match="weights_only|pickles more than tensors"):
        load_universeg_weights(_model(), path)
    with pytest.raises(WeightLoadError, match="no such file"):
        load_universeg_weights(_model(), tmp_path / "absent.pt")
    other = tmp_path / "weights.ckpt"
    other.write_bytes(b"")
    with pytest.raises(WeightLoadError, match="unsupported weight file type"):
        load_universeg_weights(_model(), other)
