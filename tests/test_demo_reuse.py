"""Reuse of trained runs by the demo tools (tools/demo.py ensure_trained): the logging keys it
ignores change no weights, a finished run is reused across them, and a run folder holding another
config is refused, named and left as it was (never deleted)."""
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fsmis.config import load_config
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.trainer import Trainer
from fsmis.models.presets import TINY_UNET, TINY_VAE
from _cli import snapshot
from _tiny_sd import TINY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import demo as D  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ct"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(8, 48, 48), supervoxels=True, progress=False)
    return out


def _config(tmp_path, data, method, name, **train):
    if method == "sdfsmis":
        raw = {"name": "tiny", "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "n_val": 1},
               "model": {"unet": TINY["unet"], "vae": TINY["vae"], "vtct_encoder": "none", "vtct_hidden": 16,
                         "vtct_depth": 1, "vtct_feat_dim": 16}}
    else:
        raw = {"name": "gen", "method": "generator",
               "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "fold": 0},
               "model": {"vae": dict(TINY_VAE), "unet": dict(TINY_UNET), "sample_steps": 4, "preview_steps": 2}}
    raw["train"] = {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "ckpt_every": 4, "val_every": 0,
                    "image_every": 0, "log_every": 4, "seed": 5, **train}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _weights(run):
    return load_file(str(ck.resolve_checkpoint(run, "last") / "model.safetensors"))


@pytest.mark.parametrize("method", ["sdfsmis", "generator"])
def test_weight_neutral_keys_change_no_weights(tmp_path, tiny_data, method):
    """Saving, logging and previewing at every step trains to the same weights, bit for bit, as
    doing none of it: the premise of WEIGHT_NEUTRAL_KEYS."""
    assert set(D.WEIGHT_NEUTRAL_KEYS) == {"train.ckpt_every", "train.image_every", "train.log_every"}
    quiet = _config(tmp_path, tiny_data, method, "quiet")
    busy = _config(tmp_path, tiny_data, method, "busy", ckpt_every=1, image_every=1, log_every=1)
    Trainer(quiet, tmp_path / "quiet", "cpu", progress=False).setup().fit()
    Trainer(busy, tmp_path / "busy", "cpu", progress=False).setup().fit()
    wa, wb = _weights(tmp_path / "quiet"), _weights(tmp_path / "busy")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    fresh = _config(tmp_path, tiny_data, method, "fresh", max_steps=1)
    Trainer(fresh, tmp_path / "fresh", "cpu", progress=False).setup().fit()
    one = _weights(tmp_path / "fresh")
    assert any(not torch.equal(one[k], wa[k]) for k in wa)  # the comparison can fail: steps move weights


def test_ensure_trained_reuses_across_neutral_keys_and_refuses_another_config(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    first = D.ensure_trained(_config(tmp_path, tiny_data, "sdfsmis", "a"), run, progress=False, name="demo model")
    assert first["steps"] == 4
    before = snapshot(run)

    again = D.ensure_trained(_config(tmp_path, tiny_data, "sdfsmis", "b", ckpt_every=2, image_every=2, log_every=1),
                             run, progress=False, name="demo model")
    assert "reusing the trained demo model" in capsys.readouterr().out
    assert again == first
    assert snapshot(run) == before

    with pytest.raises(ValueError) as err:
        D.ensure_trained(_config(tmp_path, tiny_data, "sdfsmis", "c", lr=5e-4), run, progress=False, name="demo model")
    msg = str(err.value)
    assert str(run) in msg and "train.lr: 0.001 -> 0.0005" in msg and "delete" in msg
    assert "ckpt_every" not in msg
    assert snapshot(run) == before  # the trained run is left as it was


def test_reuse_conflicts_name_training_keys_and_skip_the_neutral_ones(tmp_path, tiny_data):
    saved = _config(tmp_path, tiny_data, "sdfsmis", "saved")
    wanted = _config(tmp_path, tiny_data, "sdfsmis", "wanted", lr=2e-3, seed=5, ckpt_every=1, image_every=1,
                     log_every=1)
    wanted.model.threshold_ratio = 0.5  # post-processing: a trained run takes it unchanged
    wanted.model.vtct_depth = 2
    diff = D.reuse_conflicts(saved, wanted)
    assert diff == ["model.vtct_depth: 1 -> 2", "train.lr: 0.001 -> 0.002"]


def test_reuse_takes_a_path_spelt_otherwise_for_the_same_folder(tmp_path, tiny_data, monkeypatch):
    """A run trained with data.root relative to the working folder is the run wanted with the
    same folder spelt absolute (and back); another existing folder is a conflict."""
    monkeypatch.chdir(tiny_data.parent)
    saved = _config(tmp_path, tiny_data.name, "sdfsmis", "saved")
    assert D.reuse_conflicts(saved, _config(tmp_path, tiny_data.resolve(), "sdfsmis", "abs")) == []
    assert D.reuse_conflicts(_config(tmp_path, tiny_data.resolve(), "sdfsmis", "abs2"), saved) == []
    other = tmp_path / "other_data"
    other.mkdir()
    diff = D.reuse_conflicts(saved, _config(tmp_path, other, "sdfsmis", "other"))
    assert len(diff) == 1 and diff[0].startswith("data.root:")
