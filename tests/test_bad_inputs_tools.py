"""Bad inputs of the data tools (tools/make_supervoxels.py, tools/prepare_dataset.py): exit status
2 with a message naming the path or option, no traceback, and nothing half-written left behind."""
import shutil
from pathlib import Path

import pytest

from _cli import ROOT, clean_error, run, snapshot
from fsmis.data.phantom import make_phantom_dataset
from test_prepare import make_cmr_raw

MAKE_SV = ROOT / "tools" / "make_supervoxels.py"
PREPARE = ROOT / "tools" / "prepare_dataset.py"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("sv") / "D"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=False,
                         progress=False)
    return out


@pytest.fixture(scope="module")
def cmr_raw(tmp_path_factory):
    return make_cmr_raw(tmp_path_factory.mktemp("cmr") / "raw", patients=(1,), unlabelled=())


# -- make_supervoxels.py --------------------------------------------------------------------------
def _no_image(d):
    for p in d.glob("image_*"):
        p.unlink()
    for p in d.glob("label_*"):
        p.unlink()


def _text_image(d):
    (d / "image_2.nii.gz").write_text("this is not a NIfTI file\n")


def _output_is_a_file(d):
    (d / "supervoxels_5000").write_text("a file where the output folder goes\n")


SV_CASES = {
    # name: (change to the dataset copy, extra arguments, what the message must name ({d}: the copy))
    "missing folder": (None, [], ["{d}/missing", "not found"]),
    "no images": (_no_image, [], ["{d}", "no image_"]),
    "not NIfTI": (_text_image, [], ["{d}/image_2.nii.gz", "NIfTI"]),
    "output is a file": (_output_is_a_file, [], ["{d}/supervoxels_5000", "not a folder"]),
    "min-size 0": (None, ["--min-size", "0"], ["--min-size"]),
    "min-size negative": (None, ["--min-size", "-5"], ["--min-size"]),
    "workers 0": (None, ["--workers", "0"], ["--workers"]),
    "sigma negative": (None, ["--sigma", "-1"], ["--sigma"]),
    "scale negative": (None, ["--scale", "-2"], ["--scale"]),
    "body threshold negative": (None, ["--body-threshold", "-1"], ["--body-threshold"]),
    "min-size not a number": (None, ["--min-size", "big"], ["--min-size"]),
}


@pytest.mark.parametrize("case", SV_CASES)
def test_make_supervoxels_refuses_bad_input(phantom, tmp_path, case):
    change, extra, names = SV_CASES[case]
    d = tmp_path / "D"
    shutil.copytree(phantom, d)
    if change is not None:
        change(d)
    before = snapshot(tmp_path)
    data = d / "missing" if case == "missing folder" else d
    proc = run([MAKE_SV, "--data", data, "--no-progress", "--workers", "1", *extra])
    clean_error(proc, *(n.format(d=d) for n in names))
    assert snapshot(tmp_path) == before  # nothing written, no folder or temporary file left


def test_make_supervoxels_failing_mid_run_leaves_only_finished_files(phantom, tmp_path):
    d = tmp_path / "D"
    shutil.copytree(phantom, d)
    whole = (d / "image_3.nii.gz").read_bytes()
    (d / "image_3.nii.gz").write_bytes(whole[: len(whole) // 2])  # the header reads, the voxels do not
    proc = run([MAKE_SV, "--data", d, "--no-progress", "--workers", "1", "--min-size", "50"])
    clean_error(proc, "image_3.nii.gz")
    out = d / "supervoxels_50"
    assert sorted(p.name for p in out.iterdir()) == [f"superpix-MIDDLE_{i}.nii.gz" for i in range(3)]
    (d / "image_3.nii.gz").write_bytes(whole)  # a re-run computes the rest only
    again = run([MAKE_SV, "--data", d, "--no-progress", "--workers", "1", "--min-size", "50"])
    assert again.returncode == 0, again.stderr[-1500:]
    assert "2 case(s) to compute" in again.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"superpix-MIDDLE_{i}.nii.gz" for i in range(5)]


# -- prepare_dataset.py ---------------------------------------------------------------------------
def _raw_copy(raw, tmp_path):
    d = tmp_path / "raw"
    shutil.copytree(raw, d)
    return d


def _raw_text_image(d):
    (d / "c0t2lge" / "patient1_C0.nii.gz").write_text("this is not a NIfTI file\n")


def _raw_empty(d):
    shutil.rmtree(d)
    d.mkdir()


PREP_CASES = {
    # name: (change to the raw copy, arguments after --dataset cmr ({raw}, {t}: tmp folder), names)
    "raw missing": (None, ["--raw", "{t}/nothing", "--out", "{t}/CMR"], ["{t}/nothing", "not found"]),
    "raw without images": (_raw_empty, ["--raw", "{raw}", "--out", "{t}/CMR"], ["{raw}", "no MS-CMRSeg"]),
    "raw image not NIfTI": (_raw_text_image, ["--raw", "{raw}", "--out", "{t}/CMR"],
                            ["{raw}/c0t2lge/patient1_C0.nii.gz", "NIfTI"]),
    "out is a file": (None, ["--raw", "{raw}", "--out", "{t}/afile"], ["{t}/afile", "not a folder"]),
    "out is the raw folder": (None, ["--raw", "{raw}", "--out", "{raw}"], ["--out {raw}", "raw folder"]),
    "out inside the raw folder": (None, ["--raw", "{raw}", "--out", "{raw}/CMR"], ["--out {raw}/CMR"]),
    "workers 0": (None, ["--raw", "{raw}", "--out", "{t}/CMR", "--workers", "0"], ["--workers"]),
    "workers negative": (None, ["--raw", "{raw}", "--out", "{t}/CMR", "--workers", "-2"], ["--workers"]),
    "min-inside negative": (None, ["--raw", "{raw}", "--out", "{t}/CMR", "--min-inside", "-1"], ["--min-inside"]),
    "min-inside above 1": (None, ["--raw", "{raw}", "--out", "{t}/CMR", "--min-inside", "1.5"], ["--min-inside"]),
    "missing --out": (None, ["--raw", "{raw}"], ["--out"]),
}


@pytest.mark.parametrize("case", PREP_CASES)
def test_prepare_dataset_refuses_bad_input(cmr_raw, tmp_path, case):
    change, args, names = PREP_CASES[case]
    raw = _raw_copy(cmr_raw, tmp_path)
    if change is not None:
        change(raw)
    (tmp_path / "afile").write_text("keep me\n")
    before = snapshot(tmp_path)
    fill = {"raw": raw, "t": tmp_path}
    proc = run([PREPARE, "--dataset", "cmr", "--quiet", "--no-supervoxels",
                *(a.format(**fill) for a in args)])
    clean_error(proc, *(n.format(**fill) for n in names))
    assert snapshot(tmp_path) == before  # no output folder, nothing added to the raw folder


def test_prepare_dataset_refuses_an_unknown_dataset(cmr_raw, tmp_path):
    proc = run([PREPARE, "--dataset", "kidneys", "--raw", cmr_raw, "--out", tmp_path / "X", "--quiet"])
    clean_error(proc, "--dataset", "kidneys")
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("what", ["missing", "a file", "no checksums"])
def test_prepare_dataset_verify_needs_a_prepared_folder(tmp_path, what):
    target = tmp_path / "X"
    if what == "a file":
        target.write_text("x\n")
    elif what == "no checksums":
        target.mkdir()
    proc = run([PREPARE, "--verify", target])
    clean_error(proc, f"--verify {target}")


def test_prepare_dataset_failure_in_a_later_case_keeps_the_finished_ones(cmr_raw, tmp_path):
    raw = tmp_path / "raw"
    make_cmr_raw(raw, patients=(1, 2), unlabelled=())
    (raw / "c0t2lge" / "patient2_C0.nii.gz").write_text("this is not a NIfTI file\n")
    out = tmp_path / "CMR"
    proc = run([PREPARE, "--dataset", "cmr", "--raw", raw, "--out", out, "--quiet", "--no-supervoxels"])
    clean_error(proc, "patient2_C0.nii.gz")
    inner = out / "cmr_MR_normalized"
    names = sorted(p.name for p in inner.iterdir())
    assert names == ["dataset.json", "image_1.nii.gz", "label_1.nii.gz"], names  # case 1 whole, nothing of 2
    assert not [p for p in out.rglob(".tmp-*")]
