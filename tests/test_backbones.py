"""CNN backbones of the baselines (fsmis.models.baselines.backbones) and their strict loader
(fsmis.models.weights.load_backbone_weights), without torchvision.

Architecture facts are checked against torchvision's known answers: parameter counts (resnet101
44,549,160 and resnet50 25,557,032 with the 2048 x 1000 fc), key names, and the DeepLabV3 dilation
rule. The big trunks are built on the meta device; the loader runs on COCO-DeepLabV3-layout files
written here from random weights (resnet50 for the round trip, the small backbone for the failures).
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

from fsmis.models.baselines.backbones import ResNetTrunk, SmallBackbone, build_backbone
from fsmis.models.weights import RANDOM_INIT, WeightLoadError, load_backbone_weights

FC = 2048 * 1000 + 1000
HEADS = {"classifier.4.weight": torch.randn(21, 256, 1, 1), "aux_classifier.0.weight": torch.randn(256, 1024, 3, 3)}


def _meta(name):
    with torch.device("meta"):
        return build_backbone(name)


def _coco_layout(module) -> dict:
    sd = {f"backbone.{k}": v.clone() for k, v in module.state_dict().items()}
    sd.update({k: v.clone() for k, v in HEADS.items()})
    return sd


@pytest.mark.parametrize("name, channels", [("resnet101", 2048), ("resnet50", 2048)])
def test_trunk_output_stride_and_channels_on_meta(name, channels):
    net = _meta(name)
    assert net.out_channels == channels and net.output_stride == 8
    feats = net.features(torch.empty(2, 3, 64, 96, device="meta"))
    assert [tuple(v.shape) for v in feats.values()] == [(2, 256, 16, 24), (2, 512, 8, 12), (2, 1024, 8, 12),
                                                        (2, 2048, 8, 12)]
    assert tuple(net(torch.empty(1, 3, 32, 32, device="meta")).shape) == (1, 2048, 4, 4)


def test_small_backbone_runs_on_cpu():
    torch.manual_seed(0)
    net = build_backbone("small").eval()
    assert net.out_channels == 128 and net.output_stride == 8
    assert net.load_report.source == RANDOM_INIT and not net.load_report.pretrained and net.load_report.ok
    x = torch.randn(2, 3, 64, 64)
    feats = net.features(x)
    assert list(feats) == ["layer1", "layer2", "layer3", "layer4"]
    assert [tuple(v.shape) for v in feats.values()] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 8, 8), (2, 128, 8, 8)]
    with torch.no_grad():
        assert torch.equal(net(x), net.features(x)["layer4"])
    wide = SmallBackbone(widths=(8, 8, 16, 24), blocks=(2, 1, 2, 1))
    assert wide.out_channels == 24 and tuple(wide(torch.randn(1, 3, 40, 40)).shape) == (1, 24, 5, 5)


def test_exact_parameter_counts_and_torchvision_key_names():
    assert sum(p.numel() for p in _meta("resnet101").parameters()) == 44_549_160 - FC
    assert sum(p.numel() for p in _meta("resnet50").parameters()) == 25_557_032 - FC
    # dilation changes no shape
    undilated = ResNetTrunk(50, replace_stride_with_dilation=(False, False, False)).to("meta")
    assert undilated.output_stride == 32
    assert {k: v.shape for k, v in undilated.state_dict().items()} == {
        k: v.shape for k, v in _meta("resnet50").state_dict().items()}
    keys = set(_meta("resnet101").state_dict())
    for k in ("conv1.weight", "bn1.num_batches_tracked", "layer4.2.conv3.weight", "layer3.22.bn3.running_var",
              "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean", "layer3.0.downsample.0.weight"):
        assert k in keys
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys) and "layer3.23.conv1.weight" not in keys
    assert not any(".downsample." in k for k in keys if not k.split(".")[1] == "0")
    # 101 bottlenecks = 33 blocks x (3 convs, 3 BNs x 5 tensors) + 4 downsamples (conv + BN) + stem
    assert len(keys) == 33 * 18 + 4 * 6 + 6


def test_dilation_follows_torchvision_rule():
    net = _meta("resnet101")
    got = {b: (getattr(net, b.split(".")[0])[int(b.split(".")[1])].conv2.stride,
               getattr(net, b.split(".")[0])[int(b.split(".")[1])].conv2.dilation)
           for b in ("layer1.0", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer3.22", "layer4.0", "layer4.1")}
    assert got == {"layer1.0": ((1, 1), (1, 1)), "layer2.0": ((2, 2), (1, 1)), "layer2.1": ((1, 1), (1, 1)),
                   "layer3.0": ((1, 1), (1, 1)), "layer3.1": ((1, 1), (2, 2)), "layer3.22": ((1, 1), (2, 2)),
                   "layer4.0": ((1, 1), (2, 2)), "layer4.1": ((1, 1), (4, 4))}
    assert net.layer3[1].conv2.padding == (2, 2) and net.layer4[1].conv2.padding == (4, 4)
    assert net.layer2[0].downsample[0].stride == (2, 2) and net.layer3[0].downsample[0].stride == (1, 1)
    assert net.layer4[0].downsample[0].stride == (1, 1)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="resnet101, resnet50, small"):
        build_backbone("resnet18")


@pytest.fixture(scope="module")
def coco_resnet50(tmp_path_factory):
    torch.manual_seed(0)
    src = ResNetTrunk(50)
    for m in src.modules():  # non-default running stats, so a load is told from a fresh model
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    sd = _coco_layout(src)
    folder = tmp_path_factory.mktemp("coco")
    torch.save(sd, folder / "coco.pth")
    save_file(sd, str(folder / "coco.safetensors"))
    return src.state_dict(), folder


@pytest.mark.parametrize("fname", ["coco.pth", "coco.safetensors"])
def test_coco_layout_round_trip(coco_resnet50, fname):
    ref, folder = coco_resnet50
    net = build_backbone("resnet50", folder / fname)
    row = net.load_report
    assert row.ok and row.pretrained and row.source == str(folder / fname)
    assert row.loaded == row.expected == len(ref) == 16 * 18 + 4 * 6 + 6
    assert not (row.missing or row.unexpected or row.mismatched)
    assert any("2 head tensors ignored" in n for n in row.notes), row.notes
    assert row.params == 25_557_032 - FC
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())


@pytest.fixture
def small_sd():
    torch.manual_seed(1)
    return _coco_layout(SmallBackbone())


def _load(sd, tmp_path, name="w.pth", **kw):
    torch.save(sd, tmp_path / name)
    return load_backbone_weights(SmallBackbone(), tmp_path / name, **kw)


def test_missing_tensor_is_named(small_sd, tmp_path):
    del small_sd["backbone.layer3.0.conv2.weight"]
    with pytest.raises(WeightLoadError, match=r"w\.pth.*1 missing key\(s\): layer3\.0\.conv2\.weight") as err:
        _load(small_sd, tmp_path)
    row = err.value.component
    assert row.missing == ["layer3.0.conv2.weight"] and row.loaded == row.expected - 1


def test_missing_num_batches_tracked_is_refused(small_sd, tmp_path):
    for k in [k for k in small_sd if k.endswith("num_batches_tracked")]:
        del small_sd[k]
    with pytest.raises(WeightLoadError, match="bn1.num_batches_tracked"):
        _load(small_sd, tmp_path)


def test_unexpected_key_is_named(small_sd, tmp_path):
    small_sd["backbone.layer9.weight"] = torch.zeros(3)
    small_sd["decoder.weight"] = torch.zeros(3)
    with pytest.raises(WeightLoadError, match=r"2 unexpected key\(s\): backbone\.layer9\.weight, decoder\.weight"):
        _load(small_sd, tmp_path)


def test_shape_mismatch_is_named(small_sd, tmp_path):
    small_sd["backbone.layer2.0.bn1.weight"] = torch.ones(33)
    with pytest.raises(WeightLoadError, match=r"layer2\.0\.bn1\.weight: file \(33,\) vs model \(32,\)"):
        _load(small_sd, tmp_path)


def test_wrong_prefix_says_so(small_sd, tmp_path):
    with pytest.raises(WeightLoadError, match="no tensor under 'encoder.'"):
        _load(small_sd, tmp_path, prefix="encoder.")


@pytest.mark.parametrize("nest", ["state_dict", "model"])
def test_nested_checkpoint_loads(small_sd, tmp_path, nest):
    row = _load({nest: small_sd, "epoch": 3}, tmp_path)
    assert row.ok and row.loaded == row.expected == len(small_sd) - len(HEADS)
    assert any(f"nested under {nest!r}" in n for n in row.notes), row.notes


def test_plain_state_dict_with_empty_prefix(tmp_path):
    torch.manual_seed(2)
    src = SmallBackbone()
    sd = dict(src.state_dict(), **{"fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    net = build_backbone("small", tmp_path / "plain.safetensors", prefix="", ignore_prefixes=("fc.",))
    assert net.load_report.ok and net.load_report.loaded == net.load_report.expected
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in net.state_dict().items())


def test_non_tensor_pickle_is_refused(tmp_path):
    torch.save({"backbone.conv1.weight": Fraction(1, 3)}, tmp_path / "evil.pt")  # not on the weights_only list
    with pytest.raises(WeightLoadError, match="weights_only=True"):
        load_backbone_weights(SmallBackbone(), tmp_path / "evil.pt")
