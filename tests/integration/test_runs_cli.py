"""Issue 15, items 3, 4 (unknown keys) and 8: the command line refuses bad input in one line.

A user error is one line ``error: ...`` on stderr and exit status 2, before torch is imported
where the config alone shows it, and leaves no run folder; a command that would write into a
folder holding results is refused and leaves that folder byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf, open_dict

from attncam.stages import cli
from attncam.stages import train as train_stage
from attncam.stages.cli import ConfigError, DeferredFileHandler, FolderTakenError
from tests.integration.helpers import SMALL_DATA, compose, run_cli

ONE_LINE = {"HYDRA_FULL_ERROR": "0"}  # conftest turns the full traceback on for other tests


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """A finished tiny training run, with the log and provenance files a CLI run has."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = compose(
        "train",
        ["model=tiny", "logger=csv", "trainer.max_epochs=1", "test=false",
         f"data.cache_dir={cache_dir}", *SMALL_DATA],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(out)
    train_stage.run(cfg)
    (out / "train.log").write_text("the first run's log\n")
    (out / ".hydra").mkdir()
    (out / ".hydra" / "overrides.yaml").write_text("- model=tiny\n")
    return out


def snapshot(folder: Path) -> dict[str, Any]:
    """Every file and folder under ``folder``: content hash, size, mtime; folders as such."""
    out: dict[str, Any] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_dir():
            out[rel] = "dir"
        else:
            st = p.stat()
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


# --------------------------------------------------------------------------- item 8


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("explain.py", ["limit=-1"], r"invalid limit=-1; choose a positive integer .* or null"),
        ("explain.py", ["limit=0"], r"invalid limit=0; choose a positive integer"),
        ("explain.py", ["limit=abc"], r"invalid limit='abc'; choose a positive integer"),
        ("explain.py", ["+target=281"],
         r"unknown key 'target' \(from \+target=281\).*valid top-level keys: .*ckpt.*limit"),
        ("explain.py", ["model=tiny", "images=photo.png"],
         r"model=tiny has no trained weights.*ckpt=PATH.*allow_random_weights=true"),
        ("explain.py", ["ckpt=missing.ckpt"], r"ckpt=missing.ckpt: .*does not exist"),
        ("train.py", ["+foo=1"], r"unknown key 'foo' \(from \+foo=1\).*valid top-level keys"),
        ("train.py", ["resume=missing.ckpt"], r"checkpoint 'missing.ckpt' does not exist"),
    ],
)  # fmt: skip
def test_a_user_error_is_one_line_exit_2_and_leaves_no_folder(
    script: str, args: list[str], expected: str, tmp_path: Path
) -> None:
    proc = run_cli(script, args, tmp_path, env_extra=ONE_LINE, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    import re

    assert re.search(expected, _one_error_line(proc.stderr)), proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder left behind


def test_an_error_found_inside_the_stage_is_one_line_too_and_the_folder_goes(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Found when the checkpoint is read, after the run folder was accepted and written to.
    corrupt = tmp_path_factory.mktemp("inputs") / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    proc = run_cli("explain.py", [f"ckpt={corrupt}"], tmp_path, env_extra=ONE_LINE, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is not a readable torch checkpoint" in _one_error_line(proc.stderr)
    assert list(tmp_path.iterdir()) == []


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    proc = run_cli("explain.py", ["limit=-1"], tmp_path, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: invalid limit=-1")


def test_check_limit_values() -> None:
    assert cli.check_limit(None) is None
    assert cli.check_limit(5) == 5 and cli.check_limit("7") == 7
    for bad in (0, -1, "abc", 1.5, True, "", "-3"):
        with pytest.raises(ConfigError, match="choose a positive integer .* or null"):
            cli.check_limit(bad)


def test_which_errors_are_the_users() -> None:
    from attncam.models.backbones import PretrainedWeightsUnavailable
    from attncam.models.checkpoint import CheckpointError
    from attncam.stages.inputs import ExplainInputError, NoApplicableMethodError

    users = [ValueError("x"), ConfigError("x"), ExplainInputError("x"), CheckpointError("x"),
             PretrainedWeightsUnavailable("x"), FolderTakenError("x"),
             NoApplicableMethodError("x")]  # fmt: skip
    assert all(cli.is_user_error(e) for e in users)
    bugs = [RuntimeError("x"), KeyError("x"), FloatingPointError("x"), TypeError("x")]
    assert not any(cli.is_user_error(e) for e in bugs)


def test_unknown_top_level_keys_but_not_groups_or_keys_below_a_group() -> None:
    cfg = OmegaConf.create({"ckpt": None, "limit": None, "target": 281, "trainer": {}})
    with pytest.raises(ConfigError, match=r"unknown key 'target'.*valid top-level keys: ckpt, "
                                          r"limit, trainer$"):  # fmt: skip
        cli.check_top_level_keys(cfg, ["+target=281"], groups=["trainer"])
    with pytest.raises(ConfigError, match="unknown key 'target' \\(from \\+\\+target=281\\)"):
        cli.check_top_level_keys(cfg, ["++target=281"], groups=[])
    cli.check_top_level_keys(cfg, ["+trainer.gradient_clip_val=1", "+experiment=demo",
                                   "limit=3"], groups=["trainer", "experiment"])  # fmt: skip


# --------------------------------------------------------------------------- item 3


def test_training_into_a_finished_folder_is_refused_and_writes_nothing(
    finished: Path, cache_dir: str
) -> None:
    before = snapshot(finished)
    cfg = compose("train", ["model=tiny", "logger=csv", f"data.cache_dir={cache_dir}", *SMALL_DATA])
    with open_dict(cfg):
        cfg.output_dir = str(finished)
    with pytest.raises(FolderTakenError, match="never overwritten.*resume=last hydra.run.dir="):
        train_stage.run(cfg)
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    ("script", "args"),
    [("train.py", ["model=tiny"]), ("explain.py", ["method=gradcam", "limit=2"])],
)
def test_a_refused_command_leaves_the_finished_folder_byte_identical(
    finished: Path, script: str, args: list[str], tmp_path: Path
) -> None:
    before = snapshot(finished)
    if script == "explain.py":
        args = [*args, f"ckpt={finished / 'checkpoints' / 'best.ckpt'}"]
    proc = run_cli(script, [*args, f"hydra.run.dir={finished}"], tmp_path, env_extra=ONE_LINE)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert f"{finished} already holds a run" in line and "never overwritten" in line
    assert ("resume=last" in line) == (script == "train.py")  # explain cannot resume
    assert snapshot(finished) == before  # not even .hydra/*.yaml or the log


# --------------------------------------------------------------------------- the job's log


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("x", logging.INFO, __file__, 1, msg, None, None)


def test_the_job_log_is_written_only_once_the_run_is_accepted(tmp_path: Path) -> None:
    held = DeferredFileHandler(str(tmp_path / "a" / "train.log"))
    held.emit(_record("before"))
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    held.start_writing(tmp_path / "b" / "train.log")  # a resumed run's own folder
    held.emit(_record("after"))
    held.close()
    assert (tmp_path / "b" / "train.log").read_text().splitlines() == ["before", "after"]

    refused = DeferredFileHandler(str(tmp_path / "c.log"))
    refused.emit(_record("never"))
    refused.discard()
    refused.emit(_record("never either"))
    refused.close()
    assert not (tmp_path / "c.log").exists()

    crashed = DeferredFileHandler(str(tmp_path / "d.log"))
    crashed.emit(_record("kept"))
    crashed.close()  # neither accepted nor discarded: a crash keeps its log
    assert (tmp_path / "d.log").read_text() == "kept\n"
