"""Fine-tuning job helpers over the `openai` client: upload, create, wait (with progress), loss, events, checkpoints.

>>> job = fine_tune(lab, "data/qa_train.jsonl", n_epochs=3, suffix="handbook")   # doctest: +SKIP
>>> job.status, job.fine_tuned_model                                           # doctest: +SKIP
('succeeded', 'ft:SmolLM2-135M-Instruct:llmlab:handbook:ftjob-…')
>>> loss_curve(lab, job.id).plot(x="step")                                      # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from llmlab.connect import Lab
    from llmlab.datasets import ChatDataset

FINISHED = ("succeeded", "failed", "cancelled")


def upload(lab: Lab, data: str | Path | ChatDataset, purpose: str = "fine-tune") -> FileObject:
    """Upload a JSONL file (a path, or a `ChatDataset` written to a temporary file) and return the file object."""
    if hasattr(data, "to_jsonl"):
        with tempfile.TemporaryDirectory() as tmp:
            path = data.to_jsonl(Path(tmp) / "training.jsonl")
            with open(path, "rb") as f:
                return lab.client.files.create(file=f, purpose=purpose)
    with open(data, "rb") as f:
        return lab.client.files.create(file=f, purpose=purpose)


def create_job(
    lab: Lab,
    training_file: str,
    *,
    model: str | None = None,
    n_epochs: int | str = "auto",
    batch_size: int | str = "auto",
    learning_rate_multiplier: float | str = "auto",
    suffix: str | None = None,
    seed: int | None = None,
    validation_file: str | None = None,
) -> FineTuningJob:
    """Create a supervised fine-tuning job (the `method=` form OpenAI recommends) on `lab.finetune_model`."""
    hyperparameters = {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": learning_rate_multiplier,
    }
    extra: dict[str, Any] = {
        k: v
        for k, v in {"suffix": suffix, "seed": seed, "validation_file": validation_file}.items()
        if v is not None
    }
    return lab.client.fine_tuning.jobs.create(
        model=model or lab.finetune_model,
        training_file=training_file,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        **extra,
    )


def _metrics_rows(lab: Lab, job_id: str) -> list[dict]:
    rows = []
    for event in lab.client.fine_tuning.jobs.list_events(job_id, limit=1000):
        if event.type == "metrics" and event.data:
            rows.append(dict(event.data))
    return sorted(rows, key=lambda r: r.get("step", 0))


def loss_curve(lab: Lab, job_id: str) -> pd.DataFrame:
    """Train (and validation) loss by step, from the job's metrics events."""
    rows = _metrics_rows(lab, job_id)
    columns = [c for c in ("step", "train_loss", "valid_loss") if any(c in r for r in rows)] or [
        "step",
        "train_loss",
    ]
    return pd.DataFrame(rows, columns=columns)


def wait(
    lab: Lab, job_id: str, *, poll_seconds: float = 1.0, timeout: float | None = None, progress: bool = True
) -> FineTuningJob:
    """Poll the job until it succeeds, fails or is cancelled, with a progress bar of steps and the latest loss.

    Raises `TimeoutError` after `timeout` seconds (the job goes on; call `wait` again or cancel it).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=None, desc=job_id, unit="step", disable=not progress)
    try:
        while True:
            job = lab.client.fine_tuning.jobs.retrieve(job_id)
            rows = _metrics_rows(lab, job_id)
            if rows:
                last = rows[-1]
                bar.total = last.get("total_steps", bar.total)
                bar.n = last.get("step", bar.n)
                bar.set_postfix(status=job.status, loss=f"{last.get('train_loss', float('nan')):.3f}")
            else:
                bar.set_postfix(status=job.status)
            bar.refresh()
            if job.status in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll_seconds)
    finally:
        bar.close()


def fine_tune(
    lab: Lab,
    data: str | Path | ChatDataset,
    *,
    timeout: float | None = None,
    progress: bool = True,
    **job_options: Any,
) -> FineTuningJob:
    """Upload `data`, create the job and wait for it: the seed's three steps in one call."""
    file = upload(lab, data)
    job = create_job(lab, file.id, **job_options)
    return wait(lab, job.id, timeout=timeout, progress=progress)


def events(lab: Lab, job_id: str, limit: int = 100) -> pd.DataFrame:
    """The job's event log, oldest first: time, level, type, message."""
    rows = [
        {
            "created_at": pd.Timestamp(e.created_at, unit="s"),
            "level": e.level,
            "type": e.type,
            "message": e.message,
        }
        for e in lab.client.fine_tuning.jobs.list_events(job_id, limit=limit)
    ]
    return (
        pd.DataFrame(rows, columns=["created_at", "level", "type", "message"])
        .iloc[::-1]
        .reset_index(drop=True)
    )


def checkpoints(lab: Lab, job_id: str) -> pd.DataFrame:
    """The job's checkpoints: step, the checkpoint model name, and its metrics."""
    rows = [
        {
            "step": c.step_number,
            "model": c.fine_tuned_model_checkpoint,
            **{k: v for k, v in (c.metrics.model_dump(exclude_none=True) if c.metrics else {}).items()},
        }
        for c in lab.client.fine_tuning.jobs.checkpoints.list(job_id)
    ]
    return (
        pd.DataFrame(rows).sort_values("step").reset_index(drop=True)
        if rows
        else pd.DataFrame(columns=["step", "model"])
    )


def list_jobs(lab: Lab, limit: int = 20) -> pd.DataFrame:
    """Recent jobs, newest first: id, status, base model, fine-tuned model, trained tokens."""
    rows = [
        {
            "id": j.id,
            "status": j.status,
            "model": j.model,
            "fine_tuned_model": j.fine_tuned_model,
            "trained_tokens": j.trained_tokens,
            "created_at": pd.Timestamp(j.created_at, unit="s"),
        }
        for j in lab.client.fine_tuning.jobs.list(limit=limit).data
    ]
    return pd.DataFrame(
        rows, columns=["id", "status", "model", "fine_tuned_model", "trained_tokens", "created_at"]
    )
