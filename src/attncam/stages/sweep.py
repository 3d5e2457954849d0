"""Per-job status and the sweep's ``summary.csv``, written by a Hydra callback.

Every job of ``train.py`` / ``explain.py`` (single runs and multirun jobs) ends with
``status.json`` in its folder: ``COMPLETE``, ``SKIPPED`` (a sweep job with nothing to do, e.g. no
requested method applies to that model), ``FAILED`` with the error, or ``INTERRUPTED`` (SIGTERM).
In a multirun the sweep folder gets ``summary.csv``, one row per job (job, status, overrides,
folder, error, main metrics), rewritten after every job, so it is up to date even when a later
job kills the sweep. The callback is registered in ``conf/hydra/default.yaml``
(``hydra.callbacks.run_status``); it imports nothing heavy.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from attncam.stages.cli import Job, current_job, process_rank

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.csv"
#: Per-method explain metrics copied into a sweep's summary (``<method>/<metric>``).
EXPLAIN_SUMMARY_METRICS = (
    "average_drop",
    "increase_in_confidence",
    "pointing_game",
    "deletion",
    "insertion",
)
_FIXED_COLUMNS = ["job", "status", "overrides", "output_dir", "error"]


def main_metrics(result: Any) -> dict[str, float]:
    """The numbers of a stage's result that a sweep summary shows.

    Training: every ``val/...`` and ``test/...`` float of ``results.json``. Explaining: for each
    method, the value of each of :data:`EXPLAIN_SUMMARY_METRICS` (``gradcam/average_drop``).
    """
    if not isinstance(result, dict):
        return {}
    out = {
        k: float(v)
        for k, v in result.items()
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and k.startswith(("val/", "test/"))
    }
    for method, row in (result.get("results") or {}).items():
        for metric in EXPLAIN_SUMMARY_METRICS:
            value = (row.get(metric) or {}).get("value") if isinstance(row, dict) else None
            if value is not None:
                out[f"{method}/{metric}"] = float(value)
    return out


def write_status(
    folder: Path, job: Job, status: str, error: str | None = None, extra: dict | None = None
) -> Path:
    """Write ``status.json`` (status, error, job number, overrides, folder, seconds, metrics)."""
    from attncam.io import write_json_atomic

    record = {
        "status": status,
        "error": error,
        "job": job.num,
        "overrides": job.overrides,
        "output_dir": str(job.out) if job.out is not None else str(folder),
        "seconds": round(time.time() - job.started, 2) if job.started else None,
        "metrics": main_metrics(job.result),
        **(extra or {}),
    }
    return write_json_atomic(folder / STATUS_FILE, record)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def job_status(job: Job, job_return: JobReturn | None) -> tuple[str, str | None]:
    """``(status, error)`` of a finished job."""
    if job_return is not None and job_return.status == JobStatus.FAILED:
        # The dataclass field itself: the return_value property would print Hydra's "Error
        # executing job" line a second time before re-raising.
        err = getattr(job_return, "_return_value", None)
        return "FAILED", _error_text(err) if isinstance(err, BaseException) else None
    if job.skipped is not None:
        return "SKIPPED", job.skipped
    return "COMPLETE", None


def record_job_end(job: Job, status: str, error: str | None) -> list[Path]:
    """Write the job's ``status.json`` into its run folder (and Hydra's job folder if another)."""
    if job.refused or process_rank() != 0:  # a refused command writes nothing; rank 0 writes
        return []
    folders = [f for f in (job.out, job.hydra_dir) if f is not None and f.is_dir()]
    unique = list({f.resolve(): f for f in folders}.values())
    return [write_status(f, job, status, error) for f in unique]


def summary_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of ``sweep_dir`` that holds a ``status.json``, by job number."""
    rows = []
    for path in sweep_dir.glob(f"*/{STATUS_FILE}"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        row = {
            "job": rec.get("job"),
            "status": rec.get("status"),
            "overrides": " ".join(rec.get("overrides") or []),
            "output_dir": rec.get("output_dir"),
            "error": rec.get("error") or "",
        }
        row.update(rec.get("metrics") or {})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["job"] is None, r["job"] or 0))


def write_summary(sweep_dir: Path) -> Path | None:
    """Write ``summary.csv`` in ``sweep_dir`` from its jobs' ``status.json`` files."""
    from attncam.io import write_text_atomic

    rows = summary_rows(sweep_dir)
    if not rows:
        return None
    metrics = sorted({k for r in rows for k in r} - set(_FIXED_COLUMNS))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*_FIXED_COLUMNS, *metrics], restval="")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(sweep_dir / SUMMARY_FILE, buf.getvalue())


def _job_of(config: DictConfig) -> Job:
    """The current job if it is the one ``config`` describes, else one built from ``config``."""
    job = current_job()
    here = Path(str(config.hydra.runtime.output_dir))
    if job.hydra_dir is not None and job.hydra_dir.resolve() == here.resolve():
        return job
    from hydra.types import RunMode

    return Job(
        hydra_dir=here,
        out=here,
        multirun=config.hydra.mode == RunMode.MULTIRUN,
        overrides=[str(o) for o in config.hydra.overrides.task],
        num=int(config.hydra.job.get("num") or 0),
    )


class RunStatusCallback(Callback):
    """Hydra callback: ``status.json`` per job, ``summary.csv`` per sweep (see the module)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Record the job's status; in a multirun, rewrite the sweep's summary."""
        job = _job_of(config)
        status, error = job_status(job, job_return)
        record_job_end(job, status, error)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if job.multirun and sweep_dir.is_dir():
            write_summary(sweep_dir)
            level = {"FAILED": logging.ERROR, "SKIPPED": logging.WARNING}.get(status, logging.INFO)
            log.log(level, "job %d %s%s", job.num, status, f": {error}" if error else "")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Rewrite ``summary.csv`` and log how many jobs ended how."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        path = write_summary(sweep_dir) if sweep_dir.is_dir() else None
        rows = summary_rows(sweep_dir) if path else []
        counts: dict[str, int] = {}
        for r in rows:
            counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
        told = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        log.info("sweep of %d jobs: %s -> %s", len(rows), told or "no status", path)


__all__ = [
    "EXPLAIN_SUMMARY_METRICS",
    "STATUS_FILE",
    "SUMMARY_FILE",
    "RunStatusCallback",
    "job_status",
    "main_metrics",
    "record_job_end",
    "summary_rows",
    "write_status",
    "write_summary",
]
