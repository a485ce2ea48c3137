"""Strict, reported weight loading (fsmis.models.weights) and tools/make_random_sd.py.

Everything runs on randomly initialised models written to tmp folders (no download): a tiny
diffusers folder for the round trip and each failure (missing / unexpected / shape-mismatched key,
truncated file), the VAE override, random initialisation, single LDM checkpoint files (made here with
an inverse of diffusers' LDM -> diffusers key conversion), DINOv2 through transformers, and one build
of the full SD-1.5 architecture from a random fp16 folder (1.7 GB; about 45 s on 2 CPU cores).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fsmis.config import ConfigError, ModelConfig
from fsmis.models import weights as B
from fsmis.models.presets import SD15_UNET, SD21_UNET, TINY_UNET, TINY_VAE, preset
from fsmis.models.sd_fsmis import build_model, parameter_counts
from fsmis.models.weights import RANDOM_INIT, LoadReport, WeightLoadError, load_unet, load_vae
from fsmis.models.sqi import count_sqi_layers

REPO = Path(__file__).resolve().parents[1]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
NONE_ENC = {"vtct_encoder": "none", "vtct_hidden": 64}


def _tool():
    spec = importlib.util.spec_from_file_location("make_random_sd", REPO / "tools" / "make_random_sd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd") / "tiny"
    _tool().write_random_sd("tiny", out, "fp32", seed=0)
    return out


@pytest.fixture
def tiny_copy(tiny_folder, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_folder, tmp_path / "sd"))


def _header_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _rewrite(path: Path, edit) -> None:
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------
# diffusers folders
# ------------------------------------------------------------------------------------------------


def test_tiny_folder_round_trip_counts_every_tensor(tiny_folder):
    model, report = build_model(ModelConfig(sd_path=str(tiny_folder), **NONE_ENC))
    assert isinstance(report, LoadReport) and report.ok, report.format()
    for row, rel in ((report.unet, UNET_FILE), (report.vae, VAE_FILE)):
        n_file = len(_header_keys(tiny_folder / rel))
        assert row.pretrained and row.source == str(tiny_folder / rel)
        assert row.loaded == row.expected == n_file
        assert not (row.missing or row.unexpected or row.mismatched)
    assert report.vtct_encoder.source.startswith(RANDOM_INIT)
    # the values are the file's: UNet (its conv_in lives on as the two 8-channel convs) and VAE
    u_file, v_file = load_file(str(tiny_folder / UNET_FILE)), load_file(str(tiny_folder / VAE_FILE))
    u_model = model.unet.state_dict()
    assert set(u_model) == set(u_file) - {"conv_in.weight", "conv_in.bias"}
    assert all(torch.equal(u_model[k], u_file[k]) for k in u_model)
    w = u_file["conv_in.weight"]
    for conv in (model.conv_in_support, model.conv_in_query):
        assert conv.in_channels == 8
        torch.testing.assert_close(conv.weight, torch.cat([w, w], 1) / 2, rtol=0, atol=0)
        assert torch.equal(conv.bias, u_file["conv_in.bias"])
    assert all(torch.equal(v, v_file[k]) for k, v in model.vae.state_dict().items())
    assert report.summary["sqi_layers"] == count_sqi_layers(model.unet) == 4
    assert report.summary["cross_attention_dim"] == 32
    text = report.format()
    assert "208/208" in text and "124/124" in text and "status: OK" in text


def test_full_value_check_and_keys_only(tiny_folder):
    _, row = load_unet(ModelConfig(sd_path=str(tiny_folder)), verify="full")
    assert row.ok and row.loaded == row.expected == 208
    _, row = load_vae(ModelConfig(sd_path=str(tiny_folder)), verify="keys")
    assert row.ok and row.loaded == row.expected == 124
    with pytest.raises(ValueError, match="verify"):
        load_vae(ModelConfig(sd_path=str(tiny_folder)), verify="bogus")


@pytest.mark.parametrize("fault", ["random", "meta"])
def test_own_count_catches_a_silent_partial_load(tiny_folder, monkeypatch, fault):
    """If from_pretrained ever returned a tensor that is not the file's (randomly initialised, or left on
    the meta device) while reporting nothing, the count against the file still fails."""
    from diffusers import UNet2DConditionModel

    real = UNet2DConditionModel.from_pretrained.__func__
    largest = max(load_file(str(tiny_folder / UNET_FILE)).items(), key=lambda kv: kv[1].numel())[0]
    assert torch.Size(load_file(str(tiny_folder / UNET_FILE))[largest].shape).numel() > B.SAMPLE_FULL_NUMEL

    def silently_wrong(cls, *args, **kwargs):
        model, _ = real(cls, *args, **kwargs)
        mod_name, attr = largest.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        if fault == "random":
            with torch.no_grad():
                getattr(mod, attr).normal_()
        else:
            setattr(mod, attr, torch.nn.Parameter(torch.empty(getattr(mod, attr).shape, device="meta")))
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(silently_wrong))
    with pytest.raises(WeightLoadError, match=r"207/208 tensors\): 1 missing key\(s\): " + largest.replace(".", r"\.")):
        load_unet(ModelConfig(sd_path=str(tiny_folder)))


def test_missing_tensor_is_an_error_naming_key_and_file(tiny_copy):
    key = "down_blocks.0.attentions.0.proj_in.weight"
    _rewrite(tiny_copy / UNET_FILE, lambda sd: sd.pop(key))
    with pytest.raises(WeightLoadError) as exc:
        build_model(ModelConfig(sd_path=str(tiny_copy), **NONE_ENC))
    msg = str(exc.value)
    assert key in msg and "1 missing" in msg and str(tiny_copy / UNET_FILE) in msg and "207/208" in msg
    assert exc.value.component.missing == [key]


def test_many_missing_keys_are_listed_first_ten_and_counted(tiny_copy):
    dropped = sorted(k for k in _header_keys(tiny_copy / VAE_FILE) if k.startswith("decoder."))
    _rewrite(tiny_copy / VAE_FILE, lambda sd: [sd.pop(k) for k in dropped])
    with pytest.raises(WeightLoadError) as exc:
        load_vae(ModelConfig(sd_path=str(tiny_copy)))
    msg = str(exc.value)
    assert f"{len(dropped)} missing" in msg and f"{len(dropped)} in all" in msg
    assert sum(k in msg for k in dropped) == 10


def test_unexpected_tensor_is_an_error(tiny_copy):
    _rewrite(tiny_copy / UNET_FILE, lambda sd: sd.update({"down_blocks.0.extra_proj.weight": torch.zeros(3)}))
    with pytest.raises(WeightLoadError, match=r"1 unexpected key\(s\): down_blocks\.0\.extra_proj\.weight"):
        build_model(ModelConfig(sd_path=str(tiny_copy), **NONE_ENC))


def test_shape_mismatch_is_an_error(tiny_copy):
    # weights saved with cross_attention_dim 32, config claiming 16
    cfg_path = tiny_copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError) as exc:
        build_model(ModelConfig(sd_path=str(tiny_copy), **NONE_ENC))
    msg = str(exc.value)
    assert "shape-mismatched" in msg and str(tiny_copy / UNET_FILE) in msg
    assert "attn2.to_k.weight: file (32, 32) vs model (32, 16)" in msg
    assert len(exc.value.component.mismatched) == 8  # to_k and to_v of the 4 cross-attention layers


@pytest.mark.parametrize("rel", [UNET_FILE, VAE_FILE])
def test_truncated_file_is_an_error_naming_the_file(tiny_copy, rel):
    path = tiny_copy / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="truncated") as exc:
        build_model(ModelConfig(sd_path=str(tiny_copy), **NONE_ENC))
    assert str(path) in str(exc.value)


def test_diffusers_error_on_a_truncated_file_is_wrapped(tiny_copy, monkeypatch):
    """Past our own header check, diffusers' error (an OSError naming the file) is wrapped too."""
    path = tiny_copy / UNET_FILE
    good = B._file_index([path])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(B, "_file_index", lambda files: good)
    with pytest.raises(WeightLoadError, match="diffusers could not load") as exc:
        load_unet(ModelConfig(sd_path=str(tiny_copy)))
    assert str(path) in str(exc.value)


def test_missing_weight_file_and_config(tiny_copy):
    (tiny_copy / VAE_FILE).unlink()
    with pytest.raises(WeightLoadError, match="no weight file"):
        load_vae(ModelConfig(sd_path=str(tiny_copy)))
    (tiny_copy / "unet" / "config.json").unlink()
    with pytest.raises(WeightLoadError, match="config.json not found"):
        load_unet(ModelConfig(sd_path=str(tiny_copy)))
    with pytest.raises(ConfigError, match="no such file"):
        load_unet(ModelConfig(sd_path=str(tiny_copy / "absent")))


def test_fp16_variant_folder(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).half().save_pretrained(tmp_path / "unet", variant="fp16")
    AutoencoderKL(**TINY_VAE).half().save_pretrained(tmp_path / "vae", variant="fp16")
    model, report = build_model(ModelConfig(sd_path=str(tmp_path), **NONE_ENC))
    assert report.ok and report.unet.loaded == 208 and report.unet.file_dtype == "float16"
    assert report.unet.source.endswith("diffusion_pytorch_model.fp16.safetensors")
    assert next(model.unet.parameters()).dtype == torch.float32  # loaded as fp32 (the reference precision)


# ------------------------------------------------------------------------------------------------
# VAE override, random initialisation, configuration errors
# ------------------------------------------------------------------------------------------------


def test_vae_path_overrides_every_vae_source(tiny_folder, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(123)
    demo = AutoencoderKL(**TINY_VAE)
    demo.save_pretrained(tmp_path / "demo_vae")
    sd = demo.state_dict()
    for cfg in (ModelConfig(sd_path=str(tiny_folder), vae_path=str(tmp_path / "demo_vae"), **NONE_ENC),
                ModelConfig(unet="tiny", vae="tiny", vae_path=str(tmp_path / "demo_vae"), **NONE_ENC)):
        model, report = build_model(cfg)
        assert report.ok and report.vae.pretrained and report.vae.loaded == 124
        assert report.vae.source == str(tmp_path / "demo_vae" / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(v, sd[k]) for k, v in model.vae.state_dict().items())
    # a folder holding vae/ works too (another SD folder's VAE)
    _, row = load_vae(ModelConfig(unet="tiny", vae_path=str(tiny_folder)))
    assert row.ok and row.source == str(tiny_folder / VAE_FILE)
    with pytest.raises(ConfigError, match="vae_path"):
        load_vae(ModelConfig(vae_path=str(tmp_path)))


def test_scaling_factor_difference_is_warned(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(**{**TINY_VAE, "scaling_factor": 0.5}).save_pretrained(tmp_path / "vae")
    # model.scaling_factor unset: the VAE config's factor, no warning
    model, report = build_model(ModelConfig(unet="tiny", vae_path=str(tmp_path / "vae"), **NONE_ENC))
    assert report.ok and model.scaling_factor == 0.5 and report.summary["scaling_factor"] == 0.5
    assert report.warnings == []
    # set explicitly to another value: used, and the difference is reported
    model, report = build_model(ModelConfig(unet="tiny", vae_path=str(tmp_path / "vae"), scaling_factor=0.18215,
                                            **NONE_ENC))
    assert report.ok and model.scaling_factor == 0.18215
    assert any("scaling_factor=0.5" in w for w in report.warnings)
    assert "WARNING" in report.format()
    _, report = build_model(ModelConfig(unet="tiny", vae="tiny", **NONE_ENC))
    assert report.warnings == []


def test_random_init_from_config(tiny_folder):
    torch.manual_seed(0)
    model, report = build_model(ModelConfig(unet=dict(TINY_UNET), vae=dict(TINY_VAE), **NONE_ENC))
    assert report.ok
    for row in report.rows():
        assert not row.pretrained and row.source.startswith(RANDOM_INIT) and row.loaded == 0
    assert report.unet.expected == 208 and report.vae.expected == 124
    assert "random initialisation" in report.format()
    assert count_sqi_layers(model.unet) == 4
    # preset names work as well, and "_"-keys of a copied config.json are ignored
    cfg = json.loads((tiny_folder / "unet" / "config.json").read_text())
    _, row = load_unet(ModelConfig(unet=cfg))
    assert row.expected == 208 and "_class_name" in cfg
    _, row = load_vae(ModelConfig(vae="tiny"))
    assert row.expected == 124


def test_configuration_errors():
    with pytest.raises(ConfigError, match="sd_path.*model.unet"):
        build_model(ModelConfig(**NONE_ENC))
    with pytest.raises(ValueError, match="no VAE source"):  # ConfigError is a ValueError
        build_model(ModelConfig(unet="tiny", **NONE_ENC))
    with pytest.raises(ConfigError, match="cross_attention_dmi"):
        load_unet(ModelConfig(unet={**TINY_UNET, "cross_attention_dmi": 8}))
    with pytest.raises(ConfigError, match="unknown architecture preset"):
        load_unet(ModelConfig(unet="sd3"))
    with pytest.raises(ConfigError, match="latent channels"):
        build_model(ModelConfig(unet="tiny", vae={**TINY_VAE, "latent_channels": 8}, **NONE_ENC))
    with pytest.raises(ValueError, match="vtct_encoder_path"):
        build_model(ModelConfig(unet="tiny", vae="tiny", vtct_encoder="dinov2"))


def test_parameter_counts_add_up():
    model, report = build_model(ModelConfig(unet="tiny", vae="tiny", **NONE_ENC))
    c = parameter_counts(model)
    parts = ("unet", "conv_in_support", "conv_in_query", "vtct_mlp", "vtct_encoder", "vae")
    assert c["total"] == sum(c[p] for p in parts) == sum(p.numel() for p in model.parameters())
    assert c["trainable"] == c["total"] - c["vae"]  # the "none" encoder trains
    assert c["conv_in_support"] == c["conv_in_query"] == 8 * 32 * 9 + 32
    assert c["unet"] + 4 * 32 * 9 + 32 == report.unet.params  # the 4-channel conv_in left the UNet
    assert report.summary["params_total"] == c["total"]


def test_presets_match_the_published_architectures():
    from diffusers import UNet2DConditionModel

    for cfg, cross, params in ((SD15_UNET, 768, 859_520_964), (SD21_UNET, 1024, 865_910_724)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
        assert sum(n.endswith("attn1.processor") for n in unet.attn_processors) == 16
        assert unet.config.cross_attention_dim == cross
        assert sum(p.numel() for p in unet.parameters()) == params
    assert preset("sd15", "vae")["block_out_channels"] == [128, 256, 512, 512]
    p = preset("tiny")
    p["block_out_channels"].append(1)
    assert TINY_UNET["block_out_channels"] == [32, 64]  # presets hand out copies


# ------------------------------------------------------------------------------------------------
# single LDM / CompVis checkpoint files
# ------------------------------------------------------------------------------------------------

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def _sub(key, pairs):
    for a, b in pairs:
        key = key.replace(a, b)
    return key


def unet_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel keys -> LDM ``model.diffusion_model.*`` keys: the inverse of diffusers'
    convert_ldm_unet_checkpoint for SD-style UNets (diffusers ships no reverse conversion)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top, n = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], config["layers_per_block"] + 1
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k in top:
            new = top[k]
        elif p[0] == "down_blocks":
            i = int(p[1])
            if p[2] == "resnets":
                new = f"input_blocks.{i * n + int(p[3]) + 1}.0." + _sub(".".join(p[4:]), _RESNET)
            elif p[2] == "attentions":
                new = f"input_blocks.{i * n + int(p[3]) + 1}.1." + ".".join(p[4:])
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{(i + 1) * n}.0.op." + ".".join(p[5:])
        elif p[0] == "up_blocks":
            i = int(p[1])
            if p[2] == "resnets":
                new = f"output_blocks.{i * n + int(p[3])}.0." + _sub(".".join(p[4:]), _RESNET)
            elif p[2] == "attentions":
                new = f"output_blocks.{i * n + int(p[3])}.1." + ".".join(p[4:])
            else:  # upsamplers.0.conv.*
                has_attn = any(x.startswith(f"up_blocks.{i}.attentions.") for x in sd)
                new = f"output_blocks.{i * n + n - 1}.{2 if has_attn else 1}.conv." + ".".join(p[5:])
        elif p[0] == "mid_block":
            new = (f"middle_block.{2 * int(p[2])}." + _sub(".".join(p[3:]), _RESNET) if p[1] == "resnets"
                   else "middle_block.1." + ".".join(p[3:]))
        else:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(sd: dict, config: dict) -> dict:
    """diffusers AutoencoderKL keys -> LDM ``first_stage_model.*`` keys (inverse of convert_ldm_vae_checkpoint)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top, n_up = DIFFUSERS_TO_LDM_MAPPING["vae"], len(config["up_block_types"])
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k in top:
            new = top[k]
        elif p[1] in ("down_blocks", "up_blocks"):
            down = p[1] == "down_blocks"
            i = int(p[2]) if down else n_up - 1 - int(p[2])
            blk = "down" if down else "up"
            if p[3] == "resnets":
                new = f"{p[0]}.{blk}.{i}.block.{p[4]}." + ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
            else:
                new = f"{p[0]}.{blk}.{i}.{'downsample' if down else 'upsample'}.conv." + ".".join(p[6:])
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}." + ".".join(p[4:]).replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block":
            new = f"{p[0]}.mid.attn_1." + _sub(".".join(p[4:]), _VAE_ATTN)
            if v.ndim == 2:
                v = v[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        else:
            raise KeyError(k)
        out["first_stage_model." + new] = v
    return out


def _ldm_checkpoint(folder: Path) -> dict:
    u = load_file(str(folder / UNET_FILE))
    v = load_file(str(folder / VAE_FILE))
    ucfg = json.loads((folder / "unet" / "config.json").read_text())
    vcfg = json.loads((folder / "vae" / "config.json").read_text())
    ckpt = {**unet_to_ldm(u, ucfg), **vae_to_ldm(v, vcfg)}
    # what else a full SD checkpoint holds: text encoder, schedule buffers
    ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(4)[None]
    ckpt["alphas_cumprod"] = torch.linspace(1, 0, 10)
    return {k: t.contiguous() for k, t in ckpt.items()}


def _assert_same_weights(model, folder: Path):
    u_file, v_file = load_file(str(folder / UNET_FILE)), load_file(str(folder / VAE_FILE))
    assert all(torch.equal(t, u_file[k]) for k, t in model.unet.state_dict().items())
    assert all(torch.equal(t, v_file[k]) for k, t in model.vae.state_dict().items())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_ldm_file(tiny_folder, tmp_path, suffix):
    ckpt = _ldm_checkpoint(tiny_folder)
    path = tmp_path / f"sd{suffix}"
    if suffix == ".safetensors":
        save_file(ckpt, str(path))
    else:
        torch.save({"state_dict": ckpt, "global_step": 3}, path)
    model, report = build_model(ModelConfig(sd_path=str(path), sd_config=str(tiny_folder), **NONE_ENC))
    assert report.ok, report.format()
    assert report.unet.loaded == report.unet.expected == 208
    assert report.vae.loaded == report.vae.expected == 124
    assert "convert_ldm_unet_checkpoint" in " ".join(report.unet.notes)
    _assert_same_weights(model, tiny_folder)
    # the architecture may also come from model.unet / model.vae
    _, row = load_unet(ModelConfig(sd_path=str(path), unet="tiny"))
    assert row.ok and row.loaded == 208


def test_single_ldm_file_missing_and_unexpected_keys(tiny_folder, tmp_path):
    ckpt = _ldm_checkpoint(tiny_folder)
    cfg = dict(sd_config=str(tiny_folder), **NONE_ENC)
    bad = dict(ckpt)
    bad.pop("model.diffusion_model.input_blocks.1.1.proj_in.weight")
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightLoadError, match=r"1 missing key\(s\): down_blocks\.0\.attentions\.0\.proj_in\.weight"):
        build_model(ModelConfig(sd_path=str(tmp_path / "missing.safetensors"), **cfg))
    bad = dict(ckpt)
    bad["model.diffusion_model.time_embed.1.weight"] = torch.zeros(2)  # under the prefix, not converted
    save_file(bad, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightLoadError, match=r"time_embed\.1\.weight \(LDM key not converted\)"):
        build_model(ModelConfig(sd_path=str(tmp_path / "extra.safetensors"), **cfg))
    bad = {k: v for k, v in ckpt.items() if not k.startswith("first_stage_model.")}
    save_file(bad, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(WeightLoadError, match="vae_path"):
        build_model(ModelConfig(sd_path=str(tmp_path / "unet_only.safetensors"), **cfg))
    # ... which model.vae_path then fixes
    _, report = build_model(ModelConfig(sd_path=str(tmp_path / "unet_only.safetensors"),
                                        vae_path=str(tiny_folder), **cfg))
    assert report.ok


class _Opaque:  # pickled into a .ckpt: torch.load(weights_only=True) refuses it
    pass


def test_single_ldm_file_errors(tiny_folder, tmp_path):
    ckpt = _ldm_checkpoint(tiny_folder)
    path = tmp_path / "sd.safetensors"
    save_file(ckpt, str(path))
    with pytest.raises(ConfigError, match="sd_config"):
        load_unet(ModelConfig(sd_path=str(path)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="truncated") as exc:
        load_unet(ModelConfig(sd_path=str(path), sd_config=str(tiny_folder)))
    assert str(path) in str(exc.value)
    torch.save({"state_dict": ckpt, "callback": _Opaque()}, tmp_path / "sd.ckpt")
    with pytest.raises(WeightLoadError, match="weights_only") as exc:
        load_unet(ModelConfig(sd_path=str(tmp_path / "sd.ckpt"), sd_config=str(tiny_folder)))
    assert str(tmp_path / "sd.ckpt") in str(exc.value)
    (tmp_path / "sd.onnx").write_bytes(b"x")
    with pytest.raises(ConfigError, match="unsupported checkpoint type"):
        load_unet(ModelConfig(sd_path=str(tmp_path / "sd.onnx")))


# ------------------------------------------------------------------------------------------------
# DINOv2 (VTCT encoder) through transformers
# ------------------------------------------------------------------------------------------------


def test_dinov2_encoder_loads_strictly(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(tmp_path / "dino")
    cfg = ModelConfig(unet="tiny", vae="tiny", vtct_encoder="dinov2", vtct_encoder_path=str(tmp_path / "dino"),
                      vtct_hidden=64)
    model, report = build_model(cfg)
    row = report.vtct_encoder
    assert report.ok and row.pretrained and row.loaded == row.expected == 43
    assert model.vtct.mlp.net[0].in_features == 32
    weights = tmp_path / "dino" / "model.safetensors"
    key = next(k for k in _header_keys(weights) if k.endswith("attention.attention.key.weight"))
    _rewrite(weights, lambda sd: sd.pop(key))
    with pytest.raises(WeightLoadError, match=r"1 missing key\(s\): encoder\.layer\.0\.attention\.k_proj\.weight"):
        build_model(cfg)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="could not load DINOv2") as exc:
        build_model(cfg)
    assert str(weights) in str(exc.value)


# ------------------------------------------------------------------------------------------------
# tools/make_random_sd.py
# ------------------------------------------------------------------------------------------------


def test_make_random_sd_cli(tmp_path, capsys):
    # as a script from the repo root (it puts the repo on sys.path itself): --help
    res = subprocess.run([sys.executable, "tools/make_random_sd.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--arch {sd15,sd21,tiny}" in res.stdout, res.stderr
    tool = _tool()
    out = tmp_path / "tiny"
    assert tool.main(["--arch", "tiny", "--out", str(out), "--dtype", "fp16", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / UNET_FILE}" in printed and "RANDOM weights" in printed
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["_fsmis_random_weights"]["seed"] == 3
    _, report = build_model(ModelConfig(sd_path=str(out), **NONE_ENC))
    assert report.ok and report.unet.file_dtype == "float16"
    with pytest.raises(SystemExit, match="--force"):  # refuses to overwrite
        tool.main(["--arch", "tiny", "--out", str(out)])
    assert tool.main(["--arch", "tiny", "--out", str(out), "--force"]) == 0


# ------------------------------------------------------------------------------------------------
# the real SD-1.5 architecture (random fp16 weights, 1.7 GB)
# ------------------------------------------------------------------------------------------------


def test_sd15_architecture_from_a_random_fp16_folder(tmp_path):
    t0 = time.perf_counter()
    _tool().write_random_sd("sd15", tmp_path / "sd15", "fp16", seed=0)
    assert (tmp_path / "sd15" / UNET_FILE).stat().st_size > 1.7e9
    model, report = build_model(ModelConfig(sd_path=str(tmp_path / "sd15"), **NONE_ENC))
    assert report.ok, report.format()
    assert report.unet.loaded == report.unet.expected == 686 and report.vae.loaded == report.vae.expected == 248
    assert report.unet.file_dtype == "float16" and next(model.unet.parameters()).dtype == torch.float32
    assert count_sqi_layers(model.unet) == report.summary["sqi_layers"] == 16
    assert model.unet.config.cross_attention_dim == 768 and model.vtct.mlp.net[-1].out_features == 768
    assert abs(report.unet.params / 1e6 - 859.5) < 0.05  # 859,520,964 with its 4-channel conv_in
    for conv in (model.conv_in_support, model.conv_in_query):
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (8, 320, (3, 3))
    c = parameter_counts(model)
    assert c["unet"] + c["conv_in_support"] - (8 - 4) * 320 * 9 == report.unet.params
    print(f"\nSD-1.5 random folder written and built in {time.perf_counter() - t0:.1f} s")
    # the dry run of train.py on the same folder: load report, parameter counts, nothing trained
    del model
    cfg = tmp_path / "sd15.yaml"
    cfg.write_text("name: sd15_dry\nmodel:\n  vtct_encoder: none\n  vtct_feat_dim: 768\n")
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "--config", str(cfg),
                          "--dry-run", f"model.sd_path={tmp_path / 'sd15'}"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "686/686" in res.stdout and "248/248" in res.stdout and "sqi_layers=16" in res.stdout
    assert "dry run: nothing trained" in res.stdout
    assert not list(tmp_path.glob("checkpoints*"))
