"""Reliability of the stages (issue 7): resume, interruption, sweeps, bad files, seeds, DDP.

See docs/RELIABILITY.md for the table of guarantees and the tests that prove them. Long tests
(real subprocess trainings killed with signals, DDP training) are marked ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, open_dict

from attncam.models.lit_module import CheckpointError, load_classifier
from attncam.stages import explain as explain_stage
from attncam.stages import train as train_stage
from tests.integration.helpers import FAST_METRICS, ROOT, SMALL_DATA, compose
from tests.unit.test_reliability_checkpoints import Note
from tests.unit.test_reliability_images import BAD, GOOD, write_bad_images


def _train_cfg(out: Path, cache_dir: str, extra: list[str]) -> DictConfig:
    cfg = compose(
        "train",
        ["model=tiny", "attention=cbam", "logger=none", "threads=1",
         f"data.cache_dir={cache_dir}", *SMALL_DATA, *extra],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def _run_train(cfg: DictConfig) -> dict[str, Any]:
    threads = torch.get_num_threads()
    try:
        return train_stage.run(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> dict[str, Any]:
    """One epoch of tiny CBAM on the small synthetic set (no test split)."""
    out = tmp_path_factory.mktemp("trained")
    return _run_train(_train_cfg(out, cache_dir, ["trainer.max_epochs=1", "test=false"]))


def _floats(results: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in results.items() if isinstance(v, float) and k != "fit_seconds"}


# --------------------------------------------------------------------------- checkpoints


def test_resume_is_weights_only_checks_the_network_and_trust_is_explicit(
    trained: dict[str, Any], tmp_path: Path, cache_dir: str
) -> None:
    last = Path(trained["last_checkpoint"])
    ckpt = torch.load(last, weights_only=True)
    noted = tmp_path / "noted.ckpt"
    torch.save({**ckpt, "note": Note("pickled object")}, noted)

    def resume(path: Path, extra: list[str]) -> dict[str, Any]:
        cfg = _train_cfg(
            tmp_path / f"run{len(list(tmp_path.iterdir()))}",
            cache_dir,
            ["trainer.max_epochs=2", "test=false", f"resume={path}", *extra],
        )
        return _run_train(cfg)

    with pytest.raises(
        CheckpointError, match="refused by the weights-only loader.*trust_checkpoint"
    ):
        resume(noted, [])
    with pytest.raises(CheckpointError, match="attention: checkpoint 'cbam', config 'se'"):
        resume(last, ["attention=se"])
    with pytest.raises(CheckpointError, match="does not exist"):
        resume(tmp_path / "missing.ckpt", [])
    assert resume(noted, ["trust_checkpoint=true"])["epochs"] == 2


def test_sigterm_exits_nonzero_and_resume_last_replays_the_run_exactly(
    tmp_path: Path, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from lightning.pytorch.callbacks import Callback

    class SigtermAfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops at the next batch

    extra = ["trainer.max_epochs=3", "test=false"]
    reference = _run_train(_train_cfg(tmp_path / "reference", cache_dir, extra))
    build = train_stage.build_callbacks
    monkeypatch.setattr(
        train_stage, "build_callbacks", lambda *a: [*build(*a), SigtermAfterFirstEpoch()]
    )
    cfg = _train_cfg(tmp_path / "interrupted", cache_dir, extra)
    with pytest.raises(SystemExit) as stopped:
        _run_train(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM  # not 0: a scheduler sees a killed job
    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert not (tmp_path / "interrupted" / "results.json").exists()
    monkeypatch.setattr(train_stage, "build_callbacks", build)
    with open_dict(cfg):
        cfg.resume = "last"
    resumed = _run_train(cfg)
    assert resumed["epochs"] == 3 and _floats(resumed) == _floats(reference)
    a = torch.load(reference["last_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(resumed["last_checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- bad input


def test_explain_images_path_decodes_odd_modes_and_skips_broken_files(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    write_bad_images(tmp_path / "photos")
    cfg = compose(
        "explain",
        ["logger=none", *FAST_METRICS, f"ckpt={trained['best_checkpoint']}", "method=[gradcam]",
         f"images={tmp_path / 'photos'}", "image_size=32"],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "explain")
    res = explain_stage.run(cfg)
    assert res["n_images"] == len(GOOD)
    assert sorted(Path(p).name for p, _ in res["skipped_files"]) == sorted(BAD)
    manifest = json.loads((tmp_path / "explain" / "manifest.json").read_text())
    assert len(manifest["skipped_files"]) == len(BAD)
    assert (tmp_path / "explain" / "COMPLETE").is_file()


# --------------------------------------------------------------------------- interruption


class _Stop(BaseException):
    """Stands in for a KeyboardInterrupt or a scheduler's signal at an awkward moment."""


@pytest.mark.parametrize("where", ["test_step", "sigterm", "write_figures"])
def test_interrupted_explain_leaves_no_file_claiming_completion(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    calls = {"n": 0}
    if where in ("test_step", "sigterm"):
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        real = explain_stage.ExplainModule.test_step

        def step(self: Any, batch: Any, batch_idx: int) -> None:
            calls["n"] += 1
            if batch_idx == 1:  # Lightning raises SIGTERMException after a SIGTERM
                raise SIGTERMException() if where == "sigterm" else _Stop("interrupted")
            real(self, batch, batch_idx)

        monkeypatch.setattr(explain_stage.ExplainModule, "test_step", step)
    else:

        def figures(*_a: Any, **_k: Any) -> list[Path]:
            raise _Stop("interrupted while drawing")

        monkeypatch.setattr(explain_stage, "write_figures", figures)
    out = tmp_path / "explain"
    cfg = compose(
        "explain",
        ["logger=none", *FAST_METRICS, f"ckpt={trained['best_checkpoint']}", "method=[gradcam]",
         "limit=8", "batch_size=4"],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(out)
    with pytest.raises((_Stop, SystemExit)) as stopped:
        explain_stage.run(cfg)
    if where == "sigterm":
        assert stopped.value.code == 143  # not 0: the run did not finish
    assert not (out / "COMPLETE").exists() and not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp*"))
    if where != "write_figures":
        assert calls["n"] == 2 and not (out / "metrics.json").exists()


def test_multirun_with_a_failing_job_keeps_the_other_jobs_results(
    tmp_path: Path, cache_dir: str
) -> None:
    args = ["-m", "model=tiny", "model.attention=none,cbm,se", "trainer.fast_dev_run=true",
            "logger=none", f"data.cache_dir={cache_dir}", *SMALL_DATA]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    # Hydra's basic launcher runs every job of the sweep, then reports the first failure.
    assert proc.returncode != 0
    assert "unknown attention 'cbm'" in proc.stderr
    jobs = {p.parent.name: p for p in tmp_path.glob("multirun/train/*/*/*/results.json")}
    assert sorted(jobs) == ["0", "2"], proc.stderr[-3000:]
    assert {json.loads(p.read_text())["attention"] for p in jobs.values()} == {"none", "se"}
    # Issue 15, item 7: each job's status in its folder, the failure in its own log, a summary.
    (sweep_dir,) = tmp_path.glob("multirun/train/*/*")
    status = {d.name: json.loads((d / "status.json").read_text()) for d in sweep_dir.glob("[0-9]")}
    assert {k: v["status"] for k, v in status.items()} == {
        "0": "COMPLETE", "1": "FAILED", "2": "COMPLETE"}  # fmt: skip
    assert status["1"]["error"].startswith("ValueError: unknown attention 'cbm'; choose one of")
    assert "model.attention=cbm" in status["1"]["overrides"]
    failed_log = (sweep_dir / "1" / "train.log").read_text()
    assert "unknown attention 'cbm'" in failed_log and "Traceback" in failed_log
    import csv

    with open(sweep_dir / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "COMPLETE"), ("1", "FAILED"), ("2", "COMPLETE")]  # fmt: skip
    assert "unknown attention 'cbm'" in rows[1]["error"]
    assert "job 1 FAILED: ValueError: unknown attention 'cbm'" in proc.stdout  # when it happens


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_data_same_training_bit_for_bit(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from attncam.data.datamodule import SyntheticDataModule

    splits = []
    for i in range(2):  # two fresh caches: the data are generated twice
        dm = SyntheticDataModule(image_size=32, num_train=48, num_val=16, num_test=16,
                                 cache_dir=tmp_path / f"cache{i}", seed=3)  # fmt: skip
        splits.append(dm.split_data("train"))
    assert torch.equal(splits[0].images, splits[1].images)
    assert torch.equal(splits[0].labels, splits[1].labels)
    assert torch.equal(splits[0].masks, splits[1].masks)

    cache = str(tmp_path_factory.mktemp("det_cache"))
    runs = [
        _run_train(_train_cfg(tmp_path / f"run{i}", cache, ["trainer.max_epochs=2"]))
        for i in range(2)
    ]
    assert _floats(runs[0]) == _floats(runs[1])
    a, b = (torch.load(r["last_checkpoint"], weights_only=True)["state_dict"] for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- slow


def _kill_and_resume(signal_name: str, out: Path, cache_dir: str) -> dict[str, Any]:
    overrides = ["model=tiny", "attention=cbam", "logger=none", "threads=1",
                 f"data.cache_dir={cache_dir}", "data.image_size=32", "data.num_train=256",
                 "data.num_val=32", "data.num_test=32", "data.batch_size=16",
                 "trainer.max_epochs=3"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "_kill_during_training.py"),
         "--signal", signal_name, "--out", str(out), "--", *overrides],
        capture_output=True, text=True, timeout=1500,
        env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["TERM", "KILL"])
def test_killed_training_resumes_to_the_same_final_metrics(
    signal_name: str, tmp_path: Path, cache_dir: str
) -> None:
    res = _kill_and_resume(signal_name, tmp_path, cache_dir)
    kill = res["kill"]
    assert kill["killed_while_running"], kill["log_tail"]
    assert kill["returncode"] != 0
    assert res["reference_rc"] == 0 and res["resumed_rc"] == 0, res["resumed_log_tail"]
    ref, resumed = res["reference"], res["resumed"]
    assert resumed["epochs"] == ref["epochs"] == 3
    assert _floats(resumed) == _floats(ref)
    a = torch.load(ref["last_checkpoint"], weights_only=True)["state_dict"]
    b = torch.load(resumed["last_checkpoint"], weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "interrupted" / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_ddp_two_processes_train_and_evaluate_like_one(tmp_path: Path, cache_dir: str) -> None:
    common = ["model=tiny", "attention=cbam", "logger=none", "threads=1",
              f"data.cache_dir={cache_dir}", "data.image_size=32", "data.num_train=64",
              "data.num_val=32", "data.num_test=32", "data.augment=false",
              "trainer.max_epochs=2", "callbacks.monitor=step", "callbacks.mode=max"]  # fmt: skip
    # monitor=step improves every epoch, so best.ckpt (like last.ckpt) holds the final weights.
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}

    def cli(extra: list[str], name: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *common, *extra,
             f"hydra.run.dir={tmp_path / name}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "results.json").read_text())

    # Same global batch (16 = 1 x 16 = 2 x 8) and the same global order: the single process's
    # sampler draws the permutation DistributedSampler draws (seed + epoch).
    one = cli(["data.batch_size=16"], "one")
    two = cli(["data.batch_size=8", "trainer=ddp", "trainer.devices=2",
               "trainer.accelerator=cpu", "trainer.max_epochs=2"], "two")  # fmt: skip

    # Evaluation is exact: the DDP-logged test metrics equal one process evaluating the same
    # checkpoint (DistributedSampler shards, torchmetrics sync).
    import lightning as L

    from attncam.data.datamodule import SyntheticDataModule

    module = load_classifier(two["best_checkpoint"])
    dm = SyntheticDataModule(image_size=32, num_train=64, num_val=32, num_test=32,
                             batch_size=16, cache_dir=cache_dir, augment=False)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert single["test/acc"] == two["test/acc"]
    assert single["test/top5_acc"] == two["test/top5_acc"]
    assert single["test/loss"] == pytest.approx(two["test/loss"], abs=1e-5)

    # Training is the same up to floating-point reduction order. The global batches are the
    # same, BatchNorm normalises with the global batch's statistics in both runs (trainer=ddp
    # sets trainer.sync_batchnorm=true: attncam's DistributedBatchNorm, which runs on CPU/gloo),
    # DDP's averaged gradient of the per-process mean losses is the gradient of the global mean
    # loss, and there is no dropout or augmentation (data.augment=false) to draw differently.
    # What remains is summation order (gradient all-reduce, statistics over two shards), a few
    # float32 ulps per step. train/loss is logged without sync_dist (each process's own shard);
    # results.json holds its mean over the processes, the loss of the global batches.
    assert two["epochs"] == one["epochs"] == 2
    for run in (one, two):
        assert torch.load(run["last_checkpoint"], weights_only=True)["global_step"] == 4 * 2
    for key in ("train/loss", "train/loss_step", "val/loss", "test/loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    for key in ("train/acc", "val/acc", "test/acc", "val/top5_acc", "test/top5_acc"):
        assert two[key] == one[key], key
    # The final weights too, and the checkpoint of the synchronised run is a plain one.
    w1 = load_classifier(one["last_checkpoint"]).state_dict()
    w2 = load_classifier(two["last_checkpoint"]).state_dict()
    assert list(w1) == list(w2)
    for key, a in w1.items():
        b = w2[key]
        if not a.is_floating_point():
            assert torch.equal(a, b), key  # num_batches_tracked
            continue
        error = float((a - b).norm() / a.norm().clamp_min(1e-12))
        assert error <= 1e-4, f"{key}: relative difference {error:.3g}"
    shutil.rmtree(tmp_path / "two" / "checkpoints", ignore_errors=True)


def test_sigterm_stops_explain_within_a_chunk_and_keeps_finished_images(
    trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SIGTERM mid-batch: the next perturbation forward stops the run (not the batch end),
    and the per-image results of the batches already finished are kept, marked incomplete."""
    from attncam.metrics.perturb import Perturber

    real = Perturber._forward
    calls = {"n": 0, "after_signal": 0, "signalled": False}

    def forward(self: Any, x: Any, precision: Any = None) -> Any:
        calls["n"] += 1
        if calls["signalled"]:
            calls["after_signal"] += 1
        out = real(self, x, precision)
        first_batch_done = calls["n"] > 3 and bool(getattr(self, "_seen_second", False))
        if not calls["signalled"] and first_batch_done:
            calls["signalled"] = True
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only sets a flag
        return out

    def base_scores(self: Any, images: Any, labels: Any = None) -> Any:
        self._seen_second = getattr(self, "_batches", 0) >= 1
        self._batches = getattr(self, "_batches", 0) + 1
        return real_base(self, images, labels=labels)

    real_base = Perturber.base_scores
    monkeypatch.setattr(Perturber, "_forward", forward)
    monkeypatch.setattr(Perturber, "base_scores", base_scores)
    out = tmp_path / "explain"
    cfg = compose(
        "explain",
        ["logger=none", *FAST_METRICS, f"ckpt={trained['best_checkpoint']}", "method=[gradcam]",
         "limit=8", "batch_size=4", "metrics.chunk_size=2"],
    )  # fmt: skip
    with open_dict(cfg):
        cfg.output_dir = str(out)
    with pytest.raises(SystemExit) as stopped:
        explain_stage.run(cfg)
    assert stopped.value.code == 143
    assert calls["after_signal"] <= 1  # the very next forward raised; the batch did not finish
    assert (out / "INCOMPLETE").is_file() and not (out / "COMPLETE").exists()
    partial = json.loads((out / "per_image.partial.json").read_text())
    assert len(partial["image_ids"]) == 4  # the first batch, finished before the signal
    ad = partial["methods"]["gradcam"]["average_drop"]
    assert set(ad) <= {str(i) for i in partial["image_ids"]} and len(ad) >= 1
