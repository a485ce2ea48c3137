"""Bad inputs and faults: each gives exit status 2 with one message naming the file or key, no
traceback, and no lost or partial output."""
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fsmis.config import ConfigError, load_config
from fsmis.data.datasets import open_dataset
from fsmis.data.nifti import DataError
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.trainer import Trainer
from _cli import clean_error as _clean_error
from _cli import run as _run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "D"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    return out


def _predict(data, out, *extra):
    return _run([ROOT / "tools" / "predict.py", "--method", "support-copy", "--support-image", data / "image_0.nii.gz",
                 "--support-label", data / "label_0.nii.gz", "--label", "6", "--query-image", data / "image_1.nii.gz",
                 "--out", out, *extra])


@pytest.mark.parametrize("which", ["image_1.nii.gz", "label_0.nii.gz", "image_0.nii.gz"])
def test_predict_refuses_to_overwrite_an_input(data, which):
    before = (data / which).read_bytes()
    proc = _predict(data, data / which)
    _clean_error(proc, which)
    assert (data / which).read_bytes() == before


@pytest.mark.parametrize("name", ["pred", "pred.img", "pred.txt"])
def test_predict_output_name_is_checked_before_any_work(data, tmp_path, name):
    proc = _predict(data, tmp_path / name)
    _clean_error(proc, name)
    assert not list(tmp_path.iterdir())  # nothing written, no hidden temporary file


@pytest.mark.parametrize("extra, key", [(["--n-part", "0"], "--n-part"), (["--out-value", "70000"], "--out-value")])
def test_predict_range_checks(data, tmp_path, extra, key):
    proc = _predict(data, tmp_path / "p.nii.gz", *extra)
    _clean_error(proc, key)
    assert not (tmp_path / "p.nii.gz").exists()


@pytest.mark.parametrize("override, key", [
    ("train.ema=1", "train.ema"), ("train.ema=2", "train.ema"), ("train.batch_size=0", "train.batch_size"),
    ("train.max_steps=-5", "train.max_steps"), ("train.grad_accum=0", "train.grad_accum"),
    ("train.ckpt_every=0", "train.ckpt_every"), ("data.image_size=0", "data.image_size"),
    ("eval.chunk_batch=0", "eval.chunk_batch"), ("data.setting=3", "data.setting"),
    ("train.schedule=poly", "train.schedule"),
])
def test_config_values_out_of_range_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs" / "demo.yaml", [override])


def test_config_errors_reach_the_user_as_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    _clean_error(_run([ROOT / "train.py", "--config", bad, "--dry-run"]), "bad.yaml")
    _clean_error(_run([ROOT / "train.py", "--config", ROOT / "configs" / "demo.yaml", "--dry-run", "train.ema=2"]),
                 "train.ema")


def _tiny_cfg(tmp_path, data, **train):
    raw = {"name": "tiny", "method": "_tiny_method:TinySegmenter",
           "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "n_val": 1, "augment": False},
           "model": {"width": 4},
           "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "ckpt_every": 1, "val_every": 0,
                     "image_every": 0, "seed": 5, **train}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_an_existing_run_with_another_config_is_refused(data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    cfg = _tiny_cfg(tmp_path, data)
    first = _run([ROOT / "train.py", "--config", cfg, "--out", tmp_path / "run", "--quiet", "--device", "cpu"], env=env)
    assert first.returncode == 0, first.stderr[-1500:]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    proc = _run([ROOT / "train.py", "--config", cfg, "--out", tmp_path / "run", "--quiet", "--device", "cpu",
                 "train.lr=0.05"], env=env)
    _clean_error(proc, "train.lr", "--resume")
    assert (tmp_path / "run" / "config.yaml").read_text() == saved


def test_resume_falls_back_to_the_newest_complete_checkpoint(data, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    cfg = load_config(_tiny_cfg(tmp_path, data, keep_last=3, max_steps=4))
    tr = Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup()
    for _ in range(2):
        tr.train_step()
        tr.save()
    # the state a crash mid-save could leave: the index names a step folder that is gone
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step_2")
    again = Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup()
    assert again.resume() == 1


def test_the_new_checkpoint_is_indexed_before_old_ones_are_pruned(data, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    cfg = load_config(_tiny_cfg(tmp_path, data, keep_last=1))
    tr = Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup()
    tr.train_step()
    tr.save()

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed while pruning

    monkeypatch.setattr(ck, "_prune", crash)
    tr.train_step()
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    assert ck.read_index(tmp_path / "r")["last"] == "step_2"
    assert Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup().resume() == 2


def test_a_broken_index_names_its_file(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "index.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="index.json"):
        ck.read_index(tmp_path)


def test_checkpoint_folders_follow_the_umask(data, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    old = os.umask(0o022)
    try:
        cfg = load_config(_tiny_cfg(tmp_path, data))
        tr = Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup()
        tr.train_step()
        step = tr.save()
    finally:
        os.umask(old)
    assert stat.S_IMODE(step.stat().st_mode) == 0o755
    assert stat.S_IMODE((step / "model.safetensors").stat().st_mode) == 0o644


def _dataset(tmp_path, data, labels, tests=None, extra_label=False):
    d = tmp_path / "ds"
    d.mkdir()
    for n in ("image_0.nii.gz", "label_0.nii.gz"):
        shutil.copy(data / n, d / n)
    if extra_label:
        shutil.copy(data / "label_1.nii.gz", d / "label_1.nii.gz")
    info = {"name": "x", "labels": labels, **({"test_labels": tests} if tests is not None else {})}
    (d / "dataset.json").write_text(json.dumps(info))
    return d


@pytest.mark.parametrize("labels, tests, match", [
    ({"background": 0, "liver": 6, "spleen": 6}, None, "share the label id 6"),
    ({"background": 0, "liver": -6}, None, "negative"),
    (["liver", "spleen"], None, "must map class names"),
    ({"background": 0, "liver": "six"}, None, "must be an integer"),
    ({"background": 0, "liver": 6}, ["lung"], "'lung' is not among the labels"),
])
def test_bad_dataset_json_is_refused_by_name(data, tmp_path, labels, tests, match):
    d = _dataset(tmp_path, data, labels, tests)
    with pytest.raises(DataError, match=match) as err:
        open_dataset(d)
    assert "dataset.json" in str(err.value)


def test_a_label_file_without_its_image_is_reported(data, tmp_path):
    d = _dataset(tmp_path, data, {"background": 0, "liver": 6}, extra_label=True)
    with pytest.raises(DataError, match="label_1.nii.gz"):
        open_dataset(d)


def _test_py(data, out, *extra):
    return _run([ROOT / "test.py", "--method", "support-copy", "--data", data, "--out", out, "--quiet", "--no-surface",
                 *extra])


def test_test_py_output_is_replaced_as_a_whole(data, tmp_path):
    out = tmp_path / "res"
    first = _test_py(data, out)
    assert first.returncode == 0, first.stderr[-1500:]
    stale = out / "predictions" / "fold9" / "pred_x.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    again = _test_py(data, out, "--folds", "0", "--no-figures")
    assert again.returncode == 0, again.stderr[-1500:]
    assert not stale.exists() and not (out / "figures").exists()  # nothing of the earlier run is left
    assert json.loads((out / "results.json").read_text())["protocol"]["folds_evaluated"] == [0]
    assert not list(tmp_path.glob(".*"))  # no temporary folder or lock file left beside it


def test_test_py_refuses_an_unsuitable_out_before_the_work(data, tmp_path):
    (tmp_path / "file").write_text("x")
    _clean_error(_test_py(data, tmp_path / "file"), "is a file")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    _clean_error(_test_py(data, other), "not a test.py output folder")
    assert (other / "notes.txt").read_text() == "keep me"


def test_two_trainings_into_one_run_folder_are_refused(data, tmp_path):
    from fsmis.atomic import BusyError, exclusive_lock

    run = tmp_path / "run"
    with exclusive_lock(run, "run folder"):  # a training holding the folder
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
        proc = _run([ROOT / "train.py", "--config", _tiny_cfg(tmp_path, data), "--out", run, "--quiet", "--device",
                     "cpu"], env=env)
        _clean_error(proc, "in use by process")
        with pytest.raises(BusyError):
            with exclusive_lock(run, "run folder"):
                pass
    assert not (run / "checkpoints").exists()


def test_a_non_nifti_image_in_a_dataset_names_its_file(data, tmp_path):
    d = _dataset(tmp_path, data, {"background": 0, "liver": 6})
    for n in ("image_1.nii.gz", "label_1.nii.gz"):
        shutil.copy(data / n, d / n)
    (d / "image_0.nii.gz").write_bytes(b"this is not a NIfTI file")
    proc = _test_py(d, tmp_path / "o")
    _clean_error(proc, "image_0.nii.gz")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--n-folds", "0"], ["--n-part", "0"]])
def test_test_py_counts_must_be_positive(data, tmp_path, extra):
    _clean_error(_test_py(data, tmp_path / "o", *extra), extra[0])


def test_predict_refuses_a_query_spacing_far_off_the_supports(data, tmp_path):
    import nibabel as nib

    img = nib.load(str(data / "image_1.nii.gz"))
    aff = img.affine.copy()
    aff[:3, :2] *= 50.0  # in-plane voxel size 50x off (a header error)
    q = tmp_path / "q.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(q))
    proc = _run([ROOT / "tools" / "predict.py", "--method", "support-copy", "--support-image", data / "image_0.nii.gz",
                 "--support-label", data / "label_0.nii.gz", "--label", "6", "--query-image", q,
                 "--out", tmp_path / "p.nii.gz"])
    _clean_error(proc, "q.nii.gz", "spacing")
    assert not (tmp_path / "p.nii.gz").exists()


# -- label values --------------------------------------------------------------------------------
def _copy_data(data, dest):
    shutil.copytree(data, dest)
    return dest


def _rewrite(path, change):
    """Replace the voxels of a NIfTI file by ``change(array)`` (same affine)."""
    import nibabel as nib

    img = nib.load(str(path))
    arr = change(np.asarray(img.dataobj))
    nib.save(nib.Nifti1Image(arr, img.affine), str(path))


def _set_voxel(value, dtype):
    def change(a):
        a = a.astype(dtype)
        a.flat[0] = value
        return a
    return change


BAD_LABEL_VALUES = {"negative": (_set_voxel(-1, np.int16), "negative"),
                    "negative-float": (_set_voxel(-3.0, np.float32), "negative"),
                    "non-integer": (_set_voxel(2.5, np.float32), "non-integer")}


@pytest.mark.parametrize("kind", BAD_LABEL_VALUES)
def test_a_bad_label_value_is_refused_by_the_dataset(data, tmp_path, kind):
    change, match = BAD_LABEL_VALUES[kind]
    d = _copy_data(data, tmp_path / "ds")
    _rewrite(d / "label_2.nii.gz", change)
    ds = open_dataset(d)
    ds.load_case("1")  # the other cases are fine
    with pytest.raises(DataError, match=match) as err:
        ds.load_case("2")
    assert "label_2.nii.gz" in str(err.value)


@pytest.mark.parametrize("kind", BAD_LABEL_VALUES)
def test_a_bad_label_value_stops_test_py_naming_the_file(data, tmp_path, kind):
    change, match = BAD_LABEL_VALUES[kind]
    d = _copy_data(data, tmp_path / "ds")
    _rewrite(d / "label_2.nii.gz", change)
    _clean_error(_test_py(d, tmp_path / "o"), "label_2.nii.gz", match)
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".*"))  # no temporary folder or lock file left


@pytest.mark.parametrize("kind", BAD_LABEL_VALUES)
def test_a_bad_support_label_value_stops_predict_naming_the_file(data, tmp_path, kind):
    change, match = BAD_LABEL_VALUES[kind]
    bad = tmp_path / "sup_label.nii.gz"
    shutil.copy(data / "label_0.nii.gz", bad)
    _rewrite(bad, change)
    proc = _run([ROOT / "tools" / "predict.py", "--method", "support-copy", "--support-image", data / "image_0.nii.gz",
                 "--support-label", bad, "--label", "6", "--query-image", data / "image_1.nii.gz",
                 "--out", tmp_path / "out" / "p.nii.gz"])
    _clean_error(proc, "sup_label.nii.gz", match)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# -- classic bad inputs, for each tool they apply to ----------------------------------------------
def _truncate(path):
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # the header reads, the voxels do not


def _set_first(value):
    def change(a):
        a = a.astype(np.float32)
        a.flat[5] = value
        return a
    return change


def _shifted(path):
    import nibabel as nib

    img = nib.load(str(path))
    aff = img.affine.copy()
    aff[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(path))


def _edit_json(drop):
    def change(d):
        info = json.loads((d / "dataset.json").read_text())
        del info[drop]
        (d / "dataset.json").write_text(json.dumps(info))
    return change


def _set_json(key, value):
    def change(d):
        info = json.loads((d / "dataset.json").read_text())
        info[key] = value
        (d / "dataset.json").write_text(json.dumps(info))
    return change


def _empty(d):
    shutil.rmtree(d)
    d.mkdir()


def _both(change):
    def both(d):
        _rewrite(d / "image_2.nii.gz", change)
        _rewrite(d / "label_2.nii.gz", change)
    return both


DATASET_FAULTS = {
    # name: (change to a copy d of the dataset, the file the message names, words it contains)
    "missing image": (lambda d: (d / "image_2.nii.gz").unlink(), "label_2.nii.gz", "no image_2.nii.gz"),
    "missing label": (lambda d: (d / "label_2.nii.gz").unlink(), "label_2.nii.gz", "not found"),
    "truncated image": (lambda d: _truncate(d / "image_2.nii.gz"), "image_2.nii.gz", "NIfTI"),
    "truncated label": (lambda d: _truncate(d / "label_2.nii.gz"), "label_2.nii.gz", "NIfTI"),
    "text file as image": (lambda d: (d / "image_2.nii.gz").write_text("not NIfTI\n"), "image_2.nii.gz", "NIfTI"),
    "shape mismatch": (lambda d: _rewrite(d / "label_2.nii.gz", lambda a: a[:, :, :-1]), "label_2.nii.gz", "shape"),
    "affine mismatch": (lambda d: _shifted(d / "label_2.nii.gz"), "label_2.nii.gz", "geometry differs"),
    "NaN in image": (lambda d: _rewrite(d / "image_2.nii.gz", _set_first(np.nan)), "image_2.nii.gz", "NaN"),
    "inf in image": (lambda d: _rewrite(d / "image_2.nii.gz", _set_first(np.inf)), "image_2.nii.gz", "infinite"),
    "2D image": (_both(lambda a: a[:, :, 0]), "image_2.nii.gz", "3D volume"),
    "4D image": (_both(lambda a: np.stack([a, a], -1)), "image_2.nii.gz", "3D volume"),
    "test label id not listed": (_set_json("test_labels", [6, 42]), "dataset.json", "test label id 42"),
    "empty folder": (_empty, "", "not a dataset root"),
    "dataset.json not JSON": (lambda d: (d / "dataset.json").write_text("{not json"), "dataset.json", "invalid JSON"),
    "dataset.json without labels": (_edit_json("labels"), "dataset.json", "'labels'"),
    "dataset.json without name": (_edit_json("name"), "dataset.json", "'name'"),
}


@pytest.mark.parametrize("tool", ["test.py", "train.py"])
@pytest.mark.parametrize("fault", DATASET_FAULTS)
def test_a_bad_dataset_stops_the_tool_naming_the_file(data, tmp_path, fault, tool):
    change, name, words = DATASET_FAULTS[fault]
    d = _copy_data(data, tmp_path / "ds")
    change(d)
    if tool == "test.py":
        proc, out = _test_py(d, tmp_path / "o"), tmp_path / "o"
    else:
        out = tmp_path / "run"
        proc = _run([ROOT / "train.py", "--config", _tiny_cfg(tmp_path, d), "--out", out, "--quiet", "--device",
                     "cpu"])
    _clean_error(proc, d / name, words)
    assert not out.exists()  # no run folder, no output folder
    assert not list(tmp_path.glob(".*"))  # no temporary folder or lock file beside it


def _pair(data, tmp_path, which, change):
    """Copies of case 2's image and label (support) and case 1's image (query), one of them changed."""
    files = {"support-image": data / "image_2.nii.gz", "support-label": data / "label_2.nii.gz",
             "query-image": data / "image_1.nii.gz"}
    if which is not None:
        bad = tmp_path / f"bad_{which}.nii.gz"
        shutil.copy(files[which], bad)
        change(bad)
        files[which] = bad
    return files


PREDICT_FAULTS = {
    # name: (which file is changed, how, words in the message besides its name)
    "missing query": ("query-image", lambda p: p.unlink(), "not found"),
    "missing support label": ("support-label", lambda p: p.unlink(), "not found"),
    "truncated query": ("query-image", _truncate, "NIfTI"),
    "truncated support image": ("support-image", _truncate, "NIfTI"),
    "text file as query": ("query-image", lambda p: p.write_text("not NIfTI\n"), "NIfTI"),
    "NaN in query": ("query-image", lambda p: _rewrite(p, _set_first(np.nan)), "NaN"),
    "inf in support image": ("support-image", lambda p: _rewrite(p, _set_first(np.inf)), "infinite"),
    "2D query": ("query-image", lambda p: _rewrite(p, lambda a: a[:, :, 0]), "3D volume"),
    "4D query": ("query-image", lambda p: _rewrite(p, lambda a: np.stack([a, a], -1)), "3D volume"),
    "support shape mismatch": ("support-label", lambda p: _rewrite(p, lambda a: a[:, :, :-1]), "shape"),
    "support affine mismatch": ("support-label", _shifted, "geometry differs"),
}


@pytest.mark.parametrize("fault", PREDICT_FAULTS)
def test_a_bad_file_stops_predict_naming_it(data, tmp_path, fault):
    which, change, words = PREDICT_FAULTS[fault]
    files = _pair(data, tmp_path, which, change)
    out = tmp_path / "out" / "p.nii.gz"
    proc = _run([ROOT / "tools" / "predict.py", "--method", "support-copy", "--label", "6", "--out", out,
                 *[a for k, v in files.items() for a in (f"--{k}", v)]])
    _clean_error(proc, files[which], words)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_predict_refuses_a_label_id_absent_from_the_support(data, tmp_path):
    files = _pair(data, tmp_path, None, None)
    proc = _run([ROOT / "tools" / "predict.py", "--method", "support-copy", "--label", "42", "--out",
                 tmp_path / "p.nii.gz", *[a for k, v in files.items() for a in (f"--{k}", v)]])
    _clean_error(proc, "label_2.nii.gz", "42")
    assert not (tmp_path / "p.nii.gz").exists()


@pytest.mark.parametrize("extra, names", [
    (["--folds", "7"], ["--folds 7", "0..4"]), (["--folds", "0", "-1"], ["--folds -1"]),
    (["--support-case", "99", "--query-cases", "1"], ["'99'"]),
    (["--support-case", "1", "--query-cases", "2", "98"], ["'98'"]),
    (["--classes", "lung"], ["'lung'"]),
])
def test_test_py_refuses_unknown_folds_cases_and_classes(data, tmp_path, extra, names):
    _clean_error(_test_py(data, tmp_path / "o", *extra), *names)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("override, names", [
    ("data.fold=7", ["data.fold=7", "0..4"]), ("data.fold=-1", ["data.fold"]),
    ("data.root={tmp}/nothing", ["nothing", "not found"]),
])
def test_train_py_refuses_an_unknown_fold_or_dataset(data, tmp_path, override, names):
    proc = _run([ROOT / "train.py", "--config", _tiny_cfg(tmp_path, data), "--out", tmp_path / "run", "--quiet",
                 "--device", "cpu", override.format(tmp=tmp_path)])
    _clean_error(proc, *names)
    assert not (tmp_path / "run").exists()
