"""Bad input on the command line: a clear message naming the file or key and what was expected, a non-zero exit,
and the experiment directory unchanged; nnU-Net is never started. Also ``alseg status`` and ``alseg strategies``."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from alseg.cli import app
from alseg.loop.drivers import run_experiment
from alseg.strategies.registry import STRATEGIES
from conftest import (
    SYN_SHAPE,
    SYN_SPACING,
    RecordingFactory,
    lock_held_by_another_process,
    make_config,
    synthetic_label,
    write_config,
    write_volume,
)

runner = CliRunner()
NNUNET_STARTED = "nnU-Net was started although the input is invalid"


@pytest.fixture(autouse=True)
def _forbid_nnunet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to build the nnU-Net backend fails the test (every case must fail in validation)."""
    import alseg.backends.nnunet as nnunet_pkg

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(NNUNET_STARTED)

    monkeypatch.setattr(nnunet_pkg, "make_backend", refuse)


def _invoke(*args: str) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _check_failure(result: Any, expected: list[str]) -> str:
    out = result.output
    assert result.exit_code != 0, out
    assert isinstance(result.exception, SystemExit), f"not a clean failure: {result.exception!r}\n{out}"
    assert "Traceback" not in out and NNUNET_STARTED not in out
    assert "error:" in out
    flat = " ".join(out.split())  # messages may span lines
    for text in expected:
        assert " ".join(text.split()) in flat, f"{text!r} not in:\n{out}"
    return out


# --------------------------------------------------------------------------- dataset problems
def _label(ds: Path, case: str) -> Path:
    return (ds / "labelsTr" / f"{case}.nii.gz").resolve()


def _image(ds: Path, case: str) -> Path:
    return (ds / "imagesTr" / f"{case}.nii.gz").resolve()


def missing_label(ds: Path) -> list[str]:
    path = _label(ds, "syn_003")
    path.unlink()
    return [str(path), "does not exist", "expected a label"]


def spacing_mismatch(ds: Path) -> list[str]:
    path = _label(ds, "syn_002")
    write_volume(path, synthetic_label(2), spacing=(3.0, 1.0, 1.25))
    return [str(path), "does not match image", "spacing"]


def shape_mismatch(ds: Path) -> list[str]:
    path = _label(ds, "syn_005")
    write_volume(path, synthetic_label(5)[:, :, :-1])
    return [str(path), "does not match image", "shape (24, 28, 19) vs (24, 28, 20)"]


def undeclared_label(ds: Path) -> list[str]:
    path = _label(ds, "syn_001")
    lab = synthetic_label(1)
    lab[0, 0, 0] = 5
    write_volume(path, lab)
    return [str(path), "undeclared label values [5]", "expected values in the declared labels [0, 1, 2]"]


def truncated_image(ds: Path) -> list[str]:
    path = _image(ds, "syn_004")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [str(path), "truncated", "expected a complete gzip-compressed NIfTI file"]


def corrupt_gzip(ds: Path) -> list[str]:
    path = _label(ds, "syn_006")
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 8, len(data) - 4):  # the gzip CRC-32
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return [str(path), "expected a valid"]  # "corrupt gzip data" or "cannot be read" (small files: by ITK)


def text_named_nifti(ds: Path) -> list[str]:
    path = _label(ds, "syn_000")
    path.write_bytes(b"this is not an image\n" * 20)
    return [str(path), "cannot be read as a NIfTI file", "expected a valid image"]


def gzip_of_text_named_nifti(ds: Path) -> list[str]:
    path = _image(ds, "syn_007")
    path.write_bytes(gzip.compress(b"not a nifti header at all\n" * 40))
    return [str(path), "NIfTI", "expected"]


def empty_dataset(ds: Path) -> list[str]:
    meta = json.loads((ds / "dataset.json").read_text())
    meta["training"] = []
    meta["numTraining"] = 0
    (ds / "dataset.json").write_text(json.dumps(meta))
    return [str((ds / "dataset.json").resolve()), "has no cases", "expected at least one case"]


DATASET_PROBLEMS: list[Callable[[Path], list[str]]] = [
    missing_label,
    spacing_mismatch,
    shape_mismatch,
    undeclared_label,
    truncated_image,
    corrupt_gzip,
    text_named_nifti,
    gzip_of_text_named_nifti,
    empty_dataset,
]


@pytest.mark.parametrize("preexisting", [False, True], ids=["new-dir", "empty-dir"])
@pytest.mark.parametrize("problem", DATASET_PROBLEMS, ids=lambda f: f.__name__)
def test_bad_dataset(
    synthetic_dataset: Path, tmp_path: Path, problem: Callable[[Path], list[str]], preexisting: bool
) -> None:
    expected = problem(synthetic_dataset)
    cfg = write_config(tmp_path / "cfg" / "config.yaml", synthetic_dataset)
    exp = tmp_path / "exp"
    if preexisting:
        exp.mkdir()
    _check_failure(_invoke("run", cfg, "--out", exp), expected)
    _check_untouched(exp, preexisting)


def _check_untouched(exp: Path, preexisting: bool) -> None:
    if preexisting:
        assert exp.is_dir() and list(exp.iterdir()) == []
    else:
        assert not exp.exists()
    assert not [p for p in exp.parent.iterdir() if ".creating-" in p.name]


def test_truncated_real_label(demo_cases: Callable[[int], Path], tmp_path: Path) -> None:
    ds = demo_cases(4)
    path = sorted((ds / "labelsTr").iterdir())[1].resolve()
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    cfg = write_config(tmp_path / "config.yaml", ds, region_size=[20, 20, 20], query_size=1, rounds=2)
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), [str(path), "truncated"])
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("folder", ["data[v2]", "old[/tmp]"])  # the second: a folder "tmp]" in "old["
def test_paths_with_brackets_are_printed_verbatim(synthetic_dataset: Path, tmp_path: Path, folder: str) -> None:
    """Messages are plain text, not Rich markup: a path like data[v2] is shown as is and cannot crash the CLI."""
    (tmp_path / folder).parent.mkdir(parents=True, exist_ok=True)
    ds = synthetic_dataset.rename(tmp_path / folder)
    expected = missing_label(ds)
    cfg = write_config(tmp_path / "config.yaml", ds)
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), expected)
    assert not (tmp_path / "exp").exists()


# --------------------------------------------------------------------------- config problems
def test_query_size_larger_than_the_candidates(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", synthetic_dataset, query_size=10000)
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), ["query_size 10000", "holds at most"])
    assert not (tmp_path / "exp").exists()


def test_query_size_fits_one_round_but_not_all(synthetic_dataset: Path, tmp_path: Path) -> None:
    # 6 pool cases x (3 x 3 x 2) tiles of 8^3 = 108; 3 rounds x 40 = 120 regions do not fit
    cfg = write_config(tmp_path / "config.yaml", synthetic_dataset, query_size=40)
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), ["need 120 regions", "at most 108"])
    assert not (tmp_path / "exp").exists()


def test_unknown_strategy_lists_the_valid_keys(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", synthetic_dataset, strategy="entropyy")
    out = _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), ["unknown strategy 'entropyy'", "valid keys"])
    for key in STRATEGIES:
        assert key in out
    assert not (tmp_path / "exp").exists()


def test_unknown_strategy_parameter(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", synthetic_dataset, strategy_params={"temperature": 2})
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), ["'random_fg33'", "temperature"])
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"rounds": 0}, ["'rounds'", "greater than or equal to 1", "got 0"]),
        ({"unit": "cube"}, ["'unit'", "'box', 'slice' or 'case'", "got 'cube'"]),
        ({"roundz": 3}, ["unknown key 'roundz'", "valid keys", "rounds"]),
        ({"region_size": [0, 1, 1]}, ["'region_size'", "positive integers"]),
        ({"region_size": [8, 8]}, ["'region_size'", "2 entries", "3 axes"]),
        ({"query_size": "many"}, ["'query_size'", "integer"]),
        ({"holdout_fraction": 1.5}, ["'holdout_fraction'", "less than 1"]),
        ({"slice_axis": 3, "unit": "slice"}, ["'slice_axis'", "3 axes"]),
        ({"uncertainty": {"source": "magic"}}, ["'uncertainty.source'", "'softmax'"]),
        (
            {"schedule": {"epochs": 2, "iterations_per_epoch": 5, "optimizer": "rmsprop"}},
            ["'schedule.optimizer'", "'sgd' or 'adam'", "got 'rmsprop'"],
        ),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_invalid_config_value(
    synthetic_dataset: Path, tmp_path: Path, overrides: dict[str, Any], expected: list[str]
) -> None:
    cfg = write_config(tmp_path / "config.yaml", synthetic_dataset, **overrides)
    out = _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), expected)
    assert not (tmp_path / "exp").exists()
    if "region_size" not in overrides and "slice_axis" not in overrides:
        assert str(cfg) in out  # names the config file


def test_missing_dataset_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("strategy: random\n")
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), [str(cfg), "missing required key 'dataset'"])
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("text", ["- dataset: x\n- strategy: random\n", "just a string\n", ""])
def test_config_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), [str(cfg), "expected a mapping"])
    assert not (tmp_path / "exp").exists()


def test_config_that_is_not_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("dataset: [unclosed\nstrategy: random\n")
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), [str(cfg), "not valid YAML"])
    assert not (tmp_path / "exp").exists()


def test_config_file_that_does_not_exist(tmp_path: Path) -> None:
    cfg = tmp_path / "nope.yaml"
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), [str(cfg), "does not exist"])
    assert not (tmp_path / "exp").exists()


def test_dataset_folder_that_does_not_exist(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", tmp_path / "no_such_dataset")
    _check_failure(_invoke("run", cfg, "--out", tmp_path / "exp"), [str(tmp_path / "no_such_dataset"), "expected"])
    assert not (tmp_path / "exp").exists()


def test_out_dir_that_is_not_an_experiment(synthetic_dataset: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", synthetic_dataset)
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "notes.txt").write_text("mine")
    _check_failure(_invoke("run", cfg, "--out", exp), [str(exp), "is not an alseg experiment"])
    assert sorted(p.name for p in exp.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- existing experiments
@pytest.fixture
def fake_experiment(synthetic_dataset: Path, tmp_path: Path, fake_backend_factory: RecordingFactory) -> Path:
    cfg = make_config(synthetic_dataset, rounds=2, query_size=3)
    return run_experiment(cfg, tmp_path / "fake_exp", backend_factory=fake_backend_factory)


def test_status_json_on_a_fake_run(fake_experiment: Path) -> None:
    result = _invoke("status", fake_experiment, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["complete"] is True and data["strategy"] == "random_fg33"
    rows = data["rounds"]
    assert [row["round"] for row in rows] == [0, 1]
    for r, row in enumerate(rows):
        assert {"round", "n_regions", "annotated_voxels", "annotated_fg_voxels", "dice_mean", "dice_per_class"} <= set(
            row
        )
        assert row["n_regions"] == 3 * (r + 1)
        assert row["annotated_voxels"] == 3 * (r + 1) * 8**3
        assert isinstance(row["annotated_fg_voxels"], int)
        assert isinstance(row["dice_mean"], float)
        assert set(row["dice_per_class"]) == {"1", "2"}


def test_status_table_on_a_fake_run(fake_experiment: Path) -> None:
    result = _invoke("status", fake_experiment)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "random_fg33" in out and "Dice" in out and "1.000" in out
    assert "1536" in out  # round 1: 6 regions of 8^3 voxels


def test_run_on_an_experiment_with_another_config_names_the_key(
    fake_experiment: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "other.yaml", synthetic_dataset, rounds=2, query_size=5)
    _check_failure(_invoke("run", cfg, "--out", fake_experiment), [str(fake_experiment), "query_size"])


def test_run_refused_while_another_process_holds_the_experiment(
    fake_experiment: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "same.yaml", synthetic_dataset, rounds=2, query_size=3)
    with lock_held_by_another_process(fake_experiment) as holder:
        _check_failure(
            _invoke("run", cfg, "--out", fake_experiment), [str(fake_experiment), f"in use by process {holder.pid}"]
        )


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_status_on_a_non_experiment(tmp_path: Path, make: str) -> None:
    target = tmp_path / "target"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    for extra in ([], ["--json"]):
        result = _invoke("status", target, *extra)
        _check_failure(result, [str(target), "is not an alseg experiment"])
    if make == "missing":
        assert not target.exists()
    elif make == "empty":
        assert list(target.iterdir()) == []


def test_strategies_json_lists_the_registered_keys() -> None:
    result = _invoke("strategies", "--json")
    assert result.exit_code == 0, result.output
    items = json.loads(result.stdout)
    keys = [s["key"] for s in items]
    assert keys == sorted(STRATEGIES) and len(keys) == 15
    assert {"random", "random_fg33", "random_fg66", "entropy", "bald", "mean_std"} <= set(keys)
    by_key = {s["key"]: s for s in items}
    assert by_key["clasp_pe"]["params"]["beta_max"] == 100.0
    assert by_key["bald"]["needs"]["min_samples"] == 2
    assert by_key["random_fg33"]["needs"]["ground_truth"] is True
    assert by_key["usim_f"]["needs"]["gradients"] is True


def test_strategies_table() -> None:
    result = _invoke("strategies")
    assert result.exit_code == 0
    assert "random_fg33" in result.output and "entropy" in result.output


def test_helpers_write_what_they_claim(synthetic_dataset: Path) -> None:
    """Guard for the fixtures above: the synthetic dataset is valid and has the documented geometry."""
    from alseg.data.dataset import load_dataset, validate_dataset

    ds = load_dataset(synthetic_dataset)
    validate_dataset(ds)
    assert len(ds) == 8 and ds.labels == {0: "background", 1: "anterior", 2: "posterior"}
    geo = ds.geometry("syn_000")
    assert geo.shape == SYN_SHAPE and geo.spacing == SYN_SPACING
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(synthetic_dataset / "labelsTr" / "syn_000.nii.gz")))
    assert set(np.unique(lab)) == {0, 1, 2}
