"""Synthetic episodes in training (fsmis/genaug/episodes.py, genaug.* config keys): the mixing ratio,
the leak refusal, both pairings, filtered slices, the counts in TensorBoard and train_summary.json,
and exact resume, on a tiny phantom with hand-made synthetic folders."""
from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fsmis.config import ConfigError, load_config
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.trainer import Trainer
from fsmis.genaug.episodes import GenaugError, episode_counts, is_synthetic, ratio_fraction

from _tiny_sd import TINY

SHAPE = (10, 48, 48)


def write_synthetic(out: Path, real: Path, sources: dict, noise: float = 0.3, excluded=None) -> Path:
    """A synthetic folder by hand: case <sid> = its source's image plus noise, same label and
    supervoxels (files as nibabel stores them)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    meta = json.loads((real / "dataset.json").read_text())
    sv = meta["supervoxels"]
    (out / sv).mkdir()
    rng = np.random.default_rng(0)
    for sid, src in sources.items():
        im = nib.load(real / f"image_{src}.nii.gz")
        img = np.asarray(im.dataobj, np.float32)
        img = img + noise * float(img.std()) * rng.normal(size=img.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(img, im.affine), out / f"image_{sid}.nii.gz")
        shutil.copy(real / f"label_{src}.nii.gz", out / f"label_{sid}.nii.gz")
        shutil.copy(real / sv / f"superpix-MIDDLE_{src}.nii.gz", out / sv / f"superpix-MIDDLE_{sid}.nii.gz")
    meta["synthetic"] = {"checkpoint": None, "sources": dict(sources)}
    if excluded is not None:
        meta["synthetic"]["excluded_slices"] = excluded
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("genaug")
    real = root / "ct"
    make_phantom_dataset(real, modality="ct", n_cases=5, seed=3, shape=SHAPE, supervoxels=True, progress=False)
    # canonical fold 0 of 5 cases: query 0, support 1, training 1-3, validation 4
    syn = write_synthetic(root / "syn", real, {"101": "1", "102": "2", "103": "3"})
    return {"root": root, "real": real, "syn": syn}


def _config(tmp_path, data, **sections):
    raw = {"name": "tiny",
           "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "n_val": 1, "augment": False},
           "model": {"unet": TINY["unet"], "vae": TINY["vae"], "vtct_encoder": "none", "vtct_hidden": 16,
                     "vtct_depth": 1, "vtct_feat_dim": 16},
           "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "ckpt_every": 2,
                     "val_every": 0, "image_every": 0, "log_every": 1, "seed": 5}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- allocation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0])
def test_mixing_ratio_holds_over_every_window(ratio):
    r = ratio_fraction(ratio)
    flags = np.array([is_synthetic(i, r) for i in range(3000)])
    assert flags.sum() == episode_counts(3000, r)["synthetic"]
    assert abs(flags.mean() - ratio) < 1e-3
    for n in (1, 4, 7, 100):  # every window of n consecutive episodes holds floor or ceil of n * ratio
        windows = np.convolve(flags, np.ones(n, int), mode="valid")
        assert windows.min() >= np.floor(n * ratio - 1e-9) and windows.max() <= np.ceil(n * ratio + 1e-9)
    assert ratio_fraction(0.25) == Fraction(1, 4)


def test_batches_of_a_training_mix_at_the_ratio(env, tmp_path):
    cfg = load_config(_config(tmp_path, env["real"], genaug={"data": [str(env["syn"])], "ratio": 0.25,
                                                             "pairing": "source"}))
    tr = Trainer(cfg, tmp_path / "run", "cpu", progress=False).setup()
    m = tr.method
    flags = [e.synthetic for step in range(50) for micro in range(2) for e in m.episodes(step, micro)[0]]
    assert len(flags) == 200 and sum(flags) == 50
    assert m.episode_counts(50) == {"real": 150, "synthetic": 50}
    syn = [e for step in range(10) for e in m.episodes(step, 0)[0] if e.synthetic]
    for e in syn:  # source pairing: one real slice (a training case) and the synthetic slice of the same index
        real_case = [c for c in e.cases if not c.startswith("syn0:")]
        assert len(real_case) == 1 and real_case[0] in {"1", "2", "3"}
        assert e.slices[0] == e.slices[1]
        assert e.support_masks.sum() >= 10 and e.query_masks.sum() >= 10
    # the same step gives the same episodes (counter-based)
    a, b = m.episodes(7, 1)[0], m.episodes(7, 1)[0]
    assert [x.describe() for x in a] == [x.describe() for x in b]


def test_ratio_zero_draws_the_episodes_of_a_run_without_genaug(env, tmp_path):
    plain = Trainer(load_config(_config(tmp_path, env["real"])), tmp_path / "a", "cpu", progress=False).setup()
    ctrl = Trainer(load_config(_config(tmp_path, env["real"], genaug={"data": [str(env["syn"])], "ratio": 0.0})),
                   tmp_path / "b", "cpu", progress=False).setup()
    for step in range(5):
        a, b = plain.method.episodes(step, 0)[0], ctrl.method.episodes(step, 0)[0]
        assert [x.describe() for x in a] == [x.describe() for x in b]
        assert all(np.array_equal(x.query_images, y.query_images) for x, y in zip(a, b))


def test_synthetic_pairing_stays_inside_one_synthetic_case(env, tmp_path):
    cfg = load_config(_config(tmp_path, env["real"], genaug={"data": [str(env["syn"])], "ratio": 1.0,
                                                              "pairing": "synthetic"}))
    m = Trainer(cfg, tmp_path / "run", "cpu", progress=False).setup().method
    eps = [e for step in range(5) for e in m.episodes(step, 0)[0]]
    assert all(e.synthetic and e.cases is None and e.case.startswith("syn0:") for e in eps)
    assert {e.case.split(":")[1] for e in eps} <= {"101", "102", "103"}
    assert all(abs(e.slices[0] - e.slices[1]) == 1 for e in eps)


def test_a_synthetic_case_of_a_test_or_validation_case_is_refused(env, tmp_path):
    for src, role in (("0", "test query of fold 0"), ("4", "validation case")):
        bad = write_synthetic(tmp_path / f"bad{src}", env["real"], {"101": "1", "200": src})
        cfg = load_config(_config(tmp_path, env["real"], genaug={"data": [str(bad)], "ratio": 0.5}))
        with pytest.raises(GenaugError, match=f"synthetic case 200 was made from case {src}, a {role}"):
            Trainer(cfg, tmp_path / "run", "cpu", progress=False).setup()
        assert not (tmp_path / "run").exists()


def test_bad_genaug_settings_are_refused(env, tmp_path):
    with pytest.raises(ConfigError, match="genaug.ratio"):
        load_config(_config(tmp_path, env["real"], genaug={"ratio": 1.5}))
    with pytest.raises(ConfigError, match="genaug.pairing"):
        load_config(_config(tmp_path, env["real"], genaug={"pairing": "both"}))
    cfg = load_config(_config(tmp_path, env["real"], genaug={"ratio": 0.5}))
    assert cfg.genaug.pairing == "synthetic"  # the default: it measured best (docs/measurements/genaug_utility.md)
    with pytest.raises(GenaugError, match="needs genaug.data"):
        Trainer(cfg, tmp_path / "run", "cpu", progress=False).setup()
    gen = load_config(Path(__file__).resolve().parents[1] / "configs" / "generator_demo.yaml", ["genaug.ratio=0.5"])
    with pytest.raises(ConfigError, match="does not train on episodes"):
        Trainer(gen, tmp_path / "gen", "cpu", progress=False).setup()


def test_excluded_slices_are_never_drawn(env, tmp_path):
    keep = {"101": [4], "102": [5], "103": [3, 6]}
    excluded = {sid: [z for z in range(SHAPE[0]) if z not in zs] for sid, zs in keep.items()}
    syn = write_synthetic(tmp_path / "filtered", env["real"], {"101": "1", "102": "2", "103": "3"}, excluded=excluded)
    # source pairing: a single kept slice of a synthetic case is enough for its episodes
    cfg = load_config(_config(tmp_path, env["real"], genaug={"data": [str(syn)], "ratio": 1.0, "pairing": "source"}))
    m = Trainer(cfg, tmp_path / "run", "cpu", progress=False).setup().method
    for step in range(20):
        for e in m.episodes(step, 0)[0]:
            sid = next(c for c in e.cases if c.startswith("syn0:")).split(":")[1]
            assert e.slices[0] in keep[sid]


def test_counts_in_summary_and_tensorboard_and_exact_resume(env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(_config(tmp_path, env["real"], genaug={"data": [str(env["syn"])], "ratio": 0.5},
                              train={"cache_latents": True}))
    a = Trainer(cfg, tmp_path / "a", "cpu", progress=False).setup()
    summary = a.fit()
    assert summary["episodes"] == {"real": 8, "synthetic": 8}  # 4 steps x 2 micro x 2 episodes
    saved = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert saved["episodes"] == {"real": 8, "synthetic": 8}
    assert saved["genaug"]["pairing"] == "synthetic" and saved["genaug"]["folders"][0]["cases"] == 3
    ev = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    ev.Reload()
    assert [s.value for s in ev.Scalars("episodes/synthetic")][-1] == 8
    assert [s.value for s in ev.Scalars("episodes/real")][-1] == 8
    data = json.loads((tmp_path / "a" / "data.json").read_text())
    assert data["synthetic"] == [str(env["syn"].resolve())]
    # interrupted after 2 steps, resumed in a fresh trainer: the same weights to the bit
    b = Trainer(cfg, tmp_path / "b", "cpu", progress=False).setup()
    b.train_step()
    b.train_step()
    b.save()
    c = Trainer(cfg, tmp_path / "b", "cpu", progress=False).setup()
    assert c.resume() == 2
    assert c.fit()["episodes"] == {"real": 8, "synthetic": 8}
    wa = load_file(str(ck.resolve_checkpoint(tmp_path / "a", "last") / "model.safetensors"))
    wb = load_file(str(ck.resolve_checkpoint(tmp_path / "b", "last") / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # and synthetic episodes changed the training: a run without them ends elsewhere
    plain = Trainer(load_config(_config(tmp_path, env["real"], train={"cache_latents": True})), tmp_path / "p", "cpu",
                    progress=False).setup()
    assert plain.fit()["episodes"] == {"real": 16, "synthetic": 0}
    wp = load_file(str(ck.resolve_checkpoint(tmp_path / "p", "last") / "model.safetensors"))
    assert any(not torch.equal(wa[k], wp[k]) for k in wa)


def test_a_run_is_not_resumed_or_reused_on_a_remade_synthetic_folder(env, tmp_path):
    """data.json records each synthetic folder's fingerprint; once the folder is filtered again (other
    excluded slices) or re-synthesized (other files), resuming the run and reusing it as finished are
    both refused, naming the folder; an untouched folder resumes and is reused."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import demo as D

    from fsmis.genaug.episodes import folder_fingerprint

    sources = {"101": "1", "102": "2", "103": "3"}
    syn = write_synthetic(tmp_path / "syn", env["real"], sources)
    fp = folder_fingerprint(syn)
    assert folder_fingerprint(env["syn"]) == fp  # the same content elsewhere: the same fingerprint
    cfg = load_config(_config(tmp_path, env["real"], genaug={"data": [str(syn)], "ratio": 0.5},
                              train={"max_steps": 2, "ckpt_every": 1}))
    run = tmp_path / "run"
    D.ensure_trained(cfg, run, progress=False)
    assert json.loads((run / "data.json").read_text())["synthetic_fingerprints"] == {str(syn.resolve()): fp}
    assert Trainer(cfg, run, "cpu", progress=False).setup().resume() == 2  # unchanged: resumes
    assert D.ensure_trained(cfg, run, progress=False)["steps"] == 2  # and is reused

    write_synthetic(syn, env["real"], sources, excluded={"101": [0]})  # filtered again
    assert folder_fingerprint(syn) != fp
    with pytest.raises(ck.CheckpointError, match="synthetic folder"):
        Trainer(cfg, run, "cpu", progress=False).setup().resume()
    with pytest.raises(ValueError, match=str(syn.resolve())):
        D.ensure_trained(cfg, run, progress=False)
    assert (run / "train_summary.json").is_file()  # nothing of the run was removed


def test_same_episodes_tells_a_copy_from_a_filtered_folder(env, tmp_path):
    """tools/same_episodes.py: a copy of the synthetic folder gives the run every episode unchanged; the
    folder with slices excluded changes some; a run without synthetic episodes is refused."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from same_episodes import main, same_episodes

    sources = {"101": "1", "102": "2", "103": "3"}
    copy = write_synthetic(tmp_path / "copy", env["real"], sources)
    filtered = write_synthetic(tmp_path / "filtered", env["real"], sources,
                               excluded={sid: [3, 4, 5] for sid in sources})
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(_config(tmp_path, env["real"], genaug={"data": [str(env["syn"])], "ratio": 0.5}), run / "config.yaml")
    r = same_episodes(run, env["syn"], copy)
    assert r["episodes"] == 4 * 2 * 2 and r["synthetic_in_a"] == 8 and r["identical"] == 16
    assert r["first_difference"] is None
    r = same_episodes(run, env["syn"], filtered)
    assert r["identical"] < 16 and r["first_difference"]["a"]["synthetic"]
    assert sorted(run.iterdir()) == [run / "config.yaml"]  # nothing written
    shutil.copy(_config(tmp_path, env["real"]), run / "config.yaml")
    with pytest.raises(ValueError, match="genaug.ratio is 0"):
        main(["--run", str(run), "--a", str(env["syn"]), "--b", str(copy), "--quiet"])
