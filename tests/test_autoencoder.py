"""The autoencoder method (fsmis/methods/autoencoder.py): the CPU demo's small VAE, trained by the
one training engine (configs/demo_vae.yaml, train.py, tools/train_vae.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fsmis.config import ConfigError, load_config
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.method import method_class
from fsmis.engine.trainer import Trainer
from fsmis.methods import autoencoder as ae

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_vae.yaml"
# tiny: 32 px slices, 16 px crops (the demo: 128 / 64)
TINY = ["data.image_size=32", "data.crop=16", "train.max_steps=3", "train.batch_size=4", "train.ckpt_every=1",
        "train.warmup_steps=1", "train.log_every=1"]
EVAL_KEYS = ("dice", "dice_slice", "dice_pooled", "dice_per_case", "psnr_db", "mean_dice")
CLASSES = {"liver", "spleen", "left_kidney", "right_kidney"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: under ``pytest -n 2`` two workers with two OpenMP threads each on two
    cores spend most of their time waiting on each other (measured 3x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("vae") / "ct", "ct", n_cases=2, seed=0, shape=(8, 64, 64),
                                progress=False, supervoxels=False)


@pytest.fixture(scope="module")
def tiny_mr_dir(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("vae_mr") / "mr", "mr", n_cases=2, seed=1, shape=(8, 64, 64),
                                progress=False, supervoxels=False)


def _root(data) -> str:
    """data.root=... override for one folder or a list of them (JSON is YAML)."""
    if isinstance(data, (list, tuple)):
        return "data.root=" + json.dumps([str(d) for d in data])
    return "data.root=" + json.dumps(str(data))


def _cfg(data, *overrides):
    return load_config(CONFIG, [*TINY, _root(data), *overrides])


def _trainer(cfg, run):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the label-mask fallback warning (no supervoxels here)
        return Trainer(cfg, run, "cpu", progress=False).setup()


def _fit(cfg, run) -> tuple[Trainer, dict]:
    tr = _trainer(cfg, run)
    tr.resume()
    return tr, tr.fit()


def _report(folder) -> dict:
    return json.loads((Path(folder) / ae.REPORT_NAME).read_text())


def _last_weights(run) -> dict:
    return load_file(str(Path(run) / "checkpoints" / ck.read_index(run)["last"] / "model.safetensors"))


def _equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the shipped architecture ---------------------------------------------------------------------
def test_demo_config_is_factor_4_with_sd_scaling():
    cfg = load_config(CONFIG)
    assert cfg.method == "autoencoder"
    assert cfg.data.image_size == 128
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    method = method_class("autoencoder")(cfg, "cpu")
    method.build()
    assert torch.equal(torch.rand(3), expected)  # build draws from its own stream, not the global one
    vae = method.module
    assert ae.downsampling_factor(cfg.model.architecture) == 4
    assert vae.config.scaling_factor == pytest.approx(0.18215)  # replaced at export (1 / latent std)
    assert vae.config.latent_channels == 4
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 32, 32)
    n = sum(p.numel() for p in vae.parameters())
    assert 0.8e6 < n < 1.1e6
    assert method.parameter_counts()["total"] == n
    assert method.load_report is not None and "factor 4" in method.load_report.format()
    # build is deterministic for a seed
    again = method_class("autoencoder")(cfg, "cpu")
    again.build()
    assert _equal(vae.state_dict(), again.module.state_dict())


def test_bad_architecture_and_data_settings_are_config_errors(tiny_dir):
    with pytest.raises(ConfigError, match="unknown key"):
        _cfg(tiny_dir, "train.stepz=3")
    cfg = _cfg(tiny_dir, "model.architecture.no_such_argument=1")
    with pytest.raises(ConfigError, match="model.architecture"):
        method_class("autoencoder")(cfg, "cpu").build()
    with pytest.raises(ValueError, match="multiples"):
        method_class("autoencoder")(_cfg(tiny_dir, "data.crop=10"), "cpu").setup_data()
    with pytest.raises(ValueError, match="batch_size"):
        method_class("autoencoder")(_cfg(tiny_dir, "train.batch_size=1"), "cpu").setup_data()
    with pytest.raises(ValueError, match="data.masks"):
        method_class("autoencoder")(_cfg(tiny_dir, "data.masks=organs"), "cpu").setup_data()


# -- training, export, report ---------------------------------------------------------------------
def test_train_export_load_report(tiny_dir, tmp_path):
    from diffusers import AutoencoderKL

    from fsmis.data.datasets import open_dataset

    run = tmp_path / "run"
    cfg = _cfg(tiny_dir)
    with pytest.warns(UserWarning, match="label masks"):
        tr = Trainer(cfg, run, "cpu", progress=False).setup()
    assert tr.resume() == 0
    summary = tr.fit()
    out = run / ae.EXPORT_DIR
    assert summary["exported"] == [str(out)] and summary["steps"] == 3
    assert json.loads((run / "train_summary.json").read_text())["vae_report"]["scaling_factor"] == pytest.approx(
        summary["vae_report"]["scaling_factor"])
    rep = _report(out)
    assert rep["train"]["steps_done"] == 3 and rep["train"]["mask_source"] == "labels"
    assert rep["config_name"] == "demo_vae" and rep["version"] == ae.VERSION
    assert rep["downsampling_factor"] == 4 and rep["latent_grid"] == 8
    ev = rep["eval"]
    for key in EVAL_KEYS:
        assert key in ev
    assert set(ev["dice"]) == CLASSES
    assert all(0.0 <= v <= 1.0 for v in ev["dice"].values())
    assert np.isfinite(ev["psnr_db"])
    assert "eval_by_dataset" not in rep
    assert rep["data"]["sha256"] == ae.data_fingerprint(tiny_dir)["sha256"]
    # the exported folder: complete, loadable offline, the usual modes, no temporary leftovers
    assert ae.is_exported(out)
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".old-*"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    loaded = AutoencoderKL.from_pretrained(out, local_files_only=True)
    assert loaded.config.scaling_factor == pytest.approx(rep["scaling_factor"])
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == pytest.approx(rep["scaling_factor"])
    assert rep["scaling_factor"] == pytest.approx(1.0 / rep["latent_std"])
    # the exported weights are the trained ones, and those of the last checkpoint
    sd_live, sd_loaded = tr.method.module.state_dict(), loaded.state_dict()
    assert _equal(sd_live, sd_loaded)
    assert _equal(_last_weights(run), {k: v for k, v in sd_loaded.items()})
    # the saved scaling factor gives the training images' latents unit variance
    ds = open_dataset(tiny_dir)
    frames = np.concatenate([ae._prep_image(ds.load_case(c).image, 32)[::ae.LATENT_STD_STRIDE] for c in ds.case_ids])
    with torch.no_grad():
        z = loaded.encode(torch.from_numpy(frames)[:, None].expand(-1, 3, -1, -1)).latent_dist.mean
    assert float((z * loaded.config.scaling_factor).std()) == pytest.approx(1.0, rel=1e-3)
    # the checkpoints carry the method's random streams
    state = json.loads((run / "checkpoints" / ck.read_index(run)["last"] / "state.json").read_text())
    assert state["method"] == "autoencoder" and set(state["rng"]) == {"numpy", "torch"}
    # fitting a finished run again trains nothing and replaces the export atomically
    tr2, summary2 = _fit(cfg, run)
    assert tr2.step == 3 and summary2["exported"] == [str(out)]
    assert _equal(AutoencoderKL.from_pretrained(out, local_files_only=True).state_dict(), sd_loaded)
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".old-*"))


def test_deterministic_for_a_seed(tiny_dir, tmp_path):
    def weights(seed, name):
        tr = _trainer(_cfg(tiny_dir, f"train.seed={seed}"), tmp_path / name)
        for _ in range(3):
            tr.train_step()
        return {k: v.detach().clone() for k, v in tr.method.module.state_dict().items()}

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert _equal(a, b)
    assert not _equal(a, c)


def test_exact_resume(tiny_dir, tmp_path):
    """k steps, save, a fresh Trainer resumes and finishes: bit-identical to an uninterrupted run."""
    from diffusers import AutoencoderKL

    cfg = _cfg(tiny_dir, "train.max_steps=4")
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    _fit(cfg, run_a)

    tr = _trainer(cfg, run_b)
    for _ in range(2):
        tr.train_step()
    tr.save()
    del tr
    state = json.loads((run_b / "checkpoints" / "step_2" / "state.json").read_text())
    assert state["step"] == 2 and set(state["rng"]) == {"numpy", "torch"}
    tr_b = _trainer(cfg, run_b)
    assert tr_b.resume() == 2
    summary = tr_b.fit()
    assert summary["steps"] == 4
    assert ck.read_index(run_a)["last"] == ck.read_index(run_b)["last"] == "step_4"
    assert _equal(_last_weights(run_a), _last_weights(run_b))
    va = AutoencoderKL.from_pretrained(run_a / ae.EXPORT_DIR, local_files_only=True)
    vb = AutoencoderKL.from_pretrained(run_b / ae.EXPORT_DIR, local_files_only=True)
    assert _equal(va.state_dict(), vb.state_dict())
    assert va.config.scaling_factor == vb.config.scaling_factor
    assert _report(run_a / ae.EXPORT_DIR)["eval"]["dice"] == _report(run_b / ae.EXPORT_DIR)["eval"]["dice"]

    # control: the same resume without the saved random streams does not reproduce run A
    run_c = tmp_path / "c"
    shutil.copytree(run_b / "checkpoints", run_c / "checkpoints")
    idx = ck.read_index(run_c)
    shutil.rmtree(run_c / "checkpoints" / idx["last"])
    tr = _trainer(cfg, run_c)
    for _ in range(2):
        tr.train_step()
    tr.save()
    tr_c = _trainer(cfg, run_c)
    tr_c.method.load_rng_state = lambda state: None
    assert tr_c.resume() == 2
    while tr_c.step < 4:
        tr_c.train_step()
    assert not _equal(_last_weights(run_a), {k: v for k, v in tr_c.method.module.state_dict().items()})


# -- the cache ------------------------------------------------------------------------------------
def test_cache_reused_and_keyed(tiny_dir, tmp_path, monkeypatch):
    import fsmis.engine.trainer as trainer_mod

    cache = tmp_path / "cache"
    cfg = _cfg(tiny_dir, "train.max_steps=2")
    key = ae.cache_key(cfg)
    assert len(key) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first, reused = ae.ensure_autoencoder(cfg, cache, progress=False)
    assert not reused
    assert first == cache / key / ae.EXPORT_DIR and ae.is_exported(first)
    assert _report(first)["train"]["steps_done"] == 2
    weights = first / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns

    class NoTraining:
        def __init__(self, *a, **k):
            raise AssertionError("retrained although the cache was current")

    monkeypatch.setattr(trainer_mod, "Trainer", NoTraining)
    again, reused = ae.ensure_autoencoder(cfg, cache, progress=False)
    assert reused and again == first and weights.stat().st_mtime_ns == mtime
    # the key: not the name, not the location of the data; every other config key and the data
    assert ae.cache_key(_cfg(tiny_dir, "train.max_steps=2", "name=other")) == key
    # nor the genaug section (an autoencoder refuses synthetic episodes; caches from before it exist)
    assert ae.cache_key(_cfg(tiny_dir, "train.max_steps=2", "genaug.data=[elsewhere]", "genaug.pairing=synthetic")) == key
    # nor the train keys added later, at their defaults: the key is the one computed without them
    from fsmis.config import TrainConfig

    assert all(getattr(TrainConfig(), k) == v for k, v in ae.LATER_TRAIN_DEFAULTS.items())
    from unittest import mock

    full = type(cfg).to_dict
    with mock.patch.object(type(cfg), "to_dict", lambda self: {  # a config from before those keys
            **full(self), "train": {k: v for k, v in full(self)["train"].items() if k not in ae.LATER_TRAIN_DEFAULTS}}):
        assert ae.cache_key(cfg) == key
    for change in ("train.max_steps=3", "train.seed=1", "train.lr=2e-3", "data.crop=8", "data.image_size=64",
                   "train.batch_size=6", "data.masks=labels", "model.kl_weight=1e-5", "train.optimizer=sgd",
                   "train.schedule=step", "train.lr_gamma=0.5"):
        assert ae.cache_key(_cfg(tiny_dir, "train.max_steps=2", change)) != key, change
    # an incomplete entry (no report) is not reused
    (first / ae.REPORT_NAME).unlink()
    assert not ae.is_exported(first)
    with pytest.raises(AssertionError, match="retrained"):
        ae.ensure_autoencoder(cfg, cache, progress=False)
    monkeypatch.undo()
    # ... and, its training being finished, is exported again from the last checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folder, reused = ae.ensure_autoencoder(cfg, cache, progress=False)
    assert not reused and folder == first and ae.is_exported(first)
    assert _report(first)["train"]["steps_done"] == 2


def test_key_follows_the_data(tiny_dir, tiny_mr_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    key = ae.cache_key(_cfg(tiny_dir))
    assert ae.cache_key(_cfg(copy)) == key  # content, not location
    assert ae.cache_key(_cfg(tiny_mr_dir)) != key  # another dataset
    meta = json.loads((copy / "dataset.json").read_text())
    meta["test_labels"] = ["liver"]
    (copy / "dataset.json").write_text(json.dumps(meta))
    assert ae.cache_key(_cfg(copy)) != key


# -- masks ----------------------------------------------------------------------------------------
def test_supervoxel_masks_are_used_when_present(tmp_path):
    """With supervoxels, the training masks are the supervoxels (no organ labels, no warning)."""
    from fsmis.data.datasets import open_dataset

    data = make_phantom_dataset(tmp_path / "ct", "ct", n_cases=2, seed=0, shape=(8, 64, 64), progress=False,
                                supervoxels=True)
    ds = open_dataset(data)
    assert ds.supervoxel_dir is not None
    cfg = _cfg(data, "train.max_steps=1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no label-fallback warning
        method = method_class("autoencoder")(cfg, "cpu")
        method.setup_data()
    assert method.sources == ["supervoxels"]
    for cid, maps in zip(ds.case_ids, method.train_data.maps):  # the supervoxels, not the labels
        case = ds.load_case(cid, supervoxels=True)
        assert np.array_equal(maps, ae._resize_nearest(np.asarray(case.supervoxels), 32))
        assert not np.array_equal(maps, ae._resize_nearest(np.asarray(case.label), 32))
    assert "supervoxels" in dict(method.describe_data())["dataset phantom_ct"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr = Trainer(cfg, tmp_path / "run", "cpu", progress=False).setup()
        tr.fit()
    rep = _report(tmp_path / "run" / ae.EXPORT_DIR)
    assert rep["train"]["mask_source"] == "supervoxels"
    assert rep["data"]["sha256"] == ae.data_fingerprint(data)["sha256"]
    # masks=labels forces the labels (with the warning)
    with pytest.warns(UserWarning, match="label masks"):
        forced = method_class("autoencoder")(_cfg(data, "data.masks=labels"), "cpu")
        forced.setup_data()
    assert forced.sources == ["labels"]
    # the supervoxel files are part of the data fingerprint
    assert ae.cache_key(cfg) != ae.cache_key(_cfg(tmp_path / "ct", "train.max_steps=1", "data.masks=labels"))


def test_label_fallback_warns_and_supervoxels_required(tiny_dir):
    with pytest.warns(UserWarning, match="label masks"):
        method = method_class("autoencoder")(_cfg(tiny_dir), "cpu")
        method.setup_data()
    assert method.sources == ["labels"]
    ids = set(np.unique(np.concatenate([m.ravel() for m in method.train_data.maps])).tolist())
    assert ids <= {0} | set(int(v) for v in ae._open(tiny_dir).classes.values())
    from fsmis.data.nifti import DataError

    with pytest.raises(DataError, match="supervoxels"):  # masks=supervoxels on a dataset without them
        method_class("autoencoder")(_cfg(tiny_dir, "data.masks=supervoxels"), "cpu").setup_data()


def test_training_beats_a_random_vae(tiny_dir, tmp_path):
    """100 small steps already reconstruct the organ masks far better than random weights.

    Measured with the old hand-written loop: random 0.03 mean 3D Dice, trained 0.42 (liver 0.88) at 64 px.
    """
    cfg = load_config(CONFIG, [_root(tiny_dir), "data.image_size=64", "data.crop=32", "train.max_steps=100",
                               "train.batch_size=4", "train.lr=3e-3", "train.ckpt_every=100"])
    m = method_class("autoencoder")(cfg, "cpu")
    m.build()
    random_dice = ae.evaluate_vae(m.module, tiny_dir, image_size=64)["mean_dice"]
    _, summary = _fit(cfg, tmp_path / "run")
    ev = _report(summary["exported"][0])["eval"]
    print(f"random {random_dice:.3f}, trained {ev['mean_dice']:.3f} ({ev['dice']})")
    assert random_dice < 0.1, random_dice
    assert ev["mean_dice"] > random_dice + 0.25, (random_dice, ev["mean_dice"])
    assert ev["dice"]["liver"] > 0.7, ev["dice"]


# -- several datasets -----------------------------------------------------------------------------
def test_several_datasets(tiny_dir, tiny_mr_dir, tmp_path):
    """CT + MR together: one model, evaluated on each; the key covers every dataset, in order."""
    both = [tiny_dir, tiny_mr_dir]
    key = ae.cache_key(_cfg(both, "train.max_steps=1"))
    assert key != ae.cache_key(_cfg(tiny_dir, "train.max_steps=1"))
    assert ae.cache_key(_cfg([tiny_dir], "train.max_steps=1")) == ae.cache_key(_cfg(tiny_dir, "train.max_steps=1"))
    assert key != ae.cache_key(_cfg(both[::-1], "train.max_steps=1"))
    cfg = _cfg(both, "train.max_steps=1")
    assert cfg.data.root == [str(d) for d in both]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folder, reused = ae.ensure_autoencoder(cfg, tmp_path / "cache", progress=False)
    assert not reused and folder.parent.name == key
    rep = _report(folder)
    assert set(rep["eval_by_dataset"]) == {"phantom_ct", "phantom_mr"}
    assert json.dumps(rep["eval"], sort_keys=True) == json.dumps(rep["eval_by_dataset"]["phantom_ct"], sort_keys=True)
    for ev in rep["eval_by_dataset"].values():
        assert set(ev["dice"]) == CLASSES and all(k in ev for k in EVAL_KEYS)
    assert rep["train"]["mask_sources"] == {"phantom_ct": "labels", "phantom_mr": "labels"}
    assert rep["train"]["mask_source"] == "labels"
    assert len(rep["data"]["datasets"]) == 2
    assert rep["data"]["sha256"] == ae.data_fingerprint(both)["sha256"]


# -- command lines --------------------------------------------------------------------------------
def test_train_vae_cli(tiny_dir, tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "tools/train_vae.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "--data" in r.stdout and "--cache" in r.stdout and "overrides" in r.stdout
    cli = _load_script(REPO / "tools" / "train_vae.py", "_train_vae_cli")
    out = tmp_path / "cache"
    argv = ["--data", str(tiny_dir), "--out", str(out), "--cache", "--no-progress", *TINY, "train.max_steps=2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "3D Dice" in text and "liver" in text and "wrote" in text and "reusing" not in text
    assert len(list(out.iterdir())) == 1 and ae.is_exported(next(out.iterdir()) / ae.EXPORT_DIR)
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "reusing" in text and "3D Dice" in text
    # a bad data folder: exit 2, a one-line error
    bad = ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "bad"), "--no-progress", *TINY]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["--data", str(empty), "--out", str(tmp_path / "bad2"), "--no-progress", *TINY]) == 2
    assert "error:" in capsys.readouterr().err


def test_train_py_runs_and_dry_runs(tiny_dir, tmp_path, capsys):
    cli = _load_script(REPO / "train.py", "_train_py_cli")
    with pytest.warns(UserWarning, match="label masks"):  # the dry run opens the data as training would
        assert cli.main(["--config", str(CONFIG), "--dry-run", _root(tiny_dir)]) == 0
    text = capsys.readouterr().out
    assert "data" in text and "found" in text and "NOT FOUND" not in text
    assert "dataset phantom_ct" in text and "nothing trained" in text
    assert cli.main(["--config", str(CONFIG), "--dry-run", _root(tmp_path / "missing")]) == 0
    text = capsys.readouterr().out
    assert "NOT FOUND" in text and "nothing trained" in text
    # a tiny real run, then --resume of the finished run
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli.main(["--config", str(CONFIG), "--out", str(run), _root(tiny_dir), *TINY, "train.max_steps=2",
                         "--quiet", "--device", "cpu"]) == 0
        assert "exported" in capsys.readouterr().out and ae.is_exported(run / ae.EXPORT_DIR)
        assert cli.main(["--resume", str(run), "--quiet", "--device", "cpu"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert _report(run / ae.EXPORT_DIR)["train"]["steps_done"] == 2
