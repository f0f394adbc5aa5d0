"""Fine-tuning job helpers over the `openai` client: upload, create, wait (with progress), loss, events, checkpoints.

>>> job = fine_tune(lab, "data/qa_train.jsonl", n_epochs=3, suffix="handbook")   # doctest: +SKIP
>>> job.status, job.fine_tuned_model                                           # doctest: +SKIP
('succeeded', 'ft:SmolLM2-135M-Instruct:llmlab:handbook:1a2b3c4d')
>>> loss_curve(lab, job.id).plot(x="step", y="train_loss")                      # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import itertools
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pandas as pd
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob
from tqdm.auto import tqdm

from llmlab.openai_facts import FINISHED_JOB_STATUSES

if TYPE_CHECKING:
    from llmlab.connect import Lab
    from llmlab.datasets import ChatDataset


def upload(
    lab: Lab, data: str | Path | ChatDataset, purpose: str = "fine-tune", filename: str | None = None
) -> FileObject:
    """Upload a JSONL file (a path, or a `ChatDataset` written to a temporary file) and return the file object.

    `filename` is the name the file gets on the server (default: the path's name; "training.jsonl" for a
    dataset).

    >>> upload(lab, "data/qa_train.jsonl").purpose                   # doctest: +SKIP
    'fine-tune'
    >>> upload(lab, validation_set, filename="validation.jsonl").filename   # doctest: +SKIP
    'validation.jsonl'
    """
    if hasattr(data, "to_jsonl"):
        with tempfile.TemporaryDirectory() as tmp:
            path = data.to_jsonl(Path(tmp) / (filename or "training.jsonl"))
            with open(path, "rb") as f:
                return lab.client.files.create(file=f, purpose=purpose)
    with open(data, "rb") as f:
        file = (filename, f) if filename else f
        return lab.client.files.create(file=file, purpose=purpose)


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
    """Create a supervised fine-tuning job (the `method=` form OpenAI recommends) on `lab.finetune_model`.

    >>> job = create_job(lab, file.id, n_epochs=8, seed=42, suffix="handbook")   # doctest: +SKIP
    >>> job.status                                                              # doctest: +SKIP
    'validating_files'
    """
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
    """Loss by step from the job's metrics events: step, epoch, train_loss and valid_loss (when measured).

    `valid_loss` is only there when the job has a validation file; it is NaN at the steps where it was
    not computed (locally, at each epoch's end).

    >>> curve = loss_curve(lab, job.id)                              # doctest: +SKIP
    >>> curve.plot(x="step", y="train_loss", logy=True)              # doctest: +SKIP
    """
    rows = _metrics_rows(lab, job_id)
    columns = ["step"] + [
        c for c in ("epoch", "train_loss", "valid_loss") if any(r.get(c) is not None for r in rows)
    ]
    if "train_loss" not in columns:
        columns.insert(1, "train_loss")
    return pd.DataFrame(rows, columns=columns).astype(
        {c: float for c in ("train_loss", "valid_loss") if c in columns}
    )


def results(lab: Lab, job_id: str) -> pd.DataFrame:
    """The finished job's result file (`step_metrics.csv`) as a table: one row per training step.

    OpenAI serves that file base64-encoded, and so does the local server: this decodes it the same way
    for both. Empty (no columns) while the job has no result file yet.

    >>> results(lab, job.id)[["step", "train_loss"]].tail(1)          # doctest: +SKIP
    """
    job = lab.client.fine_tuning.jobs.retrieve(job_id)
    if not job.result_files:
        return pd.DataFrame()
    encoded = lab.client.files.content(job.result_files[0]).content
    return pd.read_csv(io.BytesIO(base64.b64decode(encoded)))


def _show_progress(bar: tqdm, job: FineTuningJob, rows: list[dict]) -> None:
    """Move `bar` to the latest step (setting its total once known) and show the status and loss."""
    last = rows[-1] if rows else {}
    total = last.get("total_steps")
    if total and bar.total != total:
        bar.reset(total=total)  # a notebook bar only takes a new total through reset()
    step = last.get("step", 0)
    if job.status == "succeeded" and bar.total:
        step = bar.total
    if step > bar.n:
        bar.update(step - bar.n)
    postfix = {"status": job.status}
    if last.get("train_loss") is not None:
        postfix["loss"] = f"{last['train_loss']:.3f}"
    bar.set_postfix(postfix, refresh=False)
    bar.refresh()


def wait(
    lab: Lab, job_id: str, *, poll_seconds: float = 1.0, timeout: float | None = None, progress: bool = True
) -> FineTuningJob:
    """Poll the job until it succeeds, fails or is cancelled, with a progress bar of steps and the latest loss.

    Returns the final `FineTuningJob` (check its `status`: a failed job is returned, not raised).
    Raises `TimeoutError` after `timeout` seconds (the job goes on; call `wait` again or cancel it).

    >>> job = wait(lab, job.id, timeout=900)                         # doctest: +SKIP
    >>> job.status, job.fine_tuned_model                             # doctest: +SKIP
    ('succeeded', 'ft:SmolLM2-135M-Instruct:llmlab:handbook:1a2b3c4d')
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=None, desc=job_id, unit="step", disable=not progress)
    try:
        while True:
            job = lab.client.fine_tuning.jobs.retrieve(job_id)
            _show_progress(bar, job, _metrics_rows(lab, job_id))
            if job.status in FINISHED_JOB_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll_seconds)
    finally:
        bar.close()


def _jsonl_bytes(data: str | Path | ChatDataset) -> bytes:
    if hasattr(data, "to_jsonl"):
        with tempfile.TemporaryDirectory() as tmp:
            return data.to_jsonl(Path(tmp) / "training.jsonl").read_bytes()
    return Path(data).read_bytes()


def find_job(
    lab: Lab,
    data: str | Path | ChatDataset,
    *,
    model: str | None = None,
    n_epochs: int | str = "auto",
    batch_size: int | str = "auto",
    learning_rate_multiplier: float | str = "auto",
    seed: int | None = None,
    **_: Any,
) -> FineTuningJob | None:
    """The newest succeeded job that trained exactly `data` (byte for byte) on `model` with these settings.

    A hyperparameter given as a number must match; "auto" matches any value, and `seed=None` any seed.
    Other job options (suffix, validation file) are not compared. None when there is no such job.

    >>> find_job(lab, "data/qa_train.jsonl", n_epochs=3, seed=0)      # doctest: +SKIP
    """
    wanted = {
        "n_epochs": n_epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": learning_rate_multiplier,
    }
    content: bytes | None = None
    for job in lab.client.fine_tuning.jobs.list(limit=100):
        if job.status != "succeeded" or job.model != (model or lab.finetune_model):
            continue
        if seed is not None and job.seed != seed:
            continue
        got = job.hyperparameters.model_dump() if job.hyperparameters else {}
        if any(v != "auto" and got.get(k) != v for k, v in wanted.items()):
            continue
        content = _jsonl_bytes(data) if content is None else content
        try:
            if lab.client.files.content(job.training_file).read() == content:
                return job
        except openai.NotFoundError:  # the training file was deleted since
            continue
    return None


def fine_tune(
    lab: Lab,
    data: str | Path | ChatDataset,
    *,
    timeout: float | None = None,
    progress: bool = True,
    reuse: bool = False,
    **job_options: Any,
) -> FineTuningJob:
    """Upload `data`, create the job and wait for it: the seed's three steps in one call.

    With `reuse=True`, a job that already trained the same data with the same settings (`find_job`) is
    returned instead of training again: the same model, at no cost.

    >>> job = fine_tune(lab, "data/qa_train.jsonl", n_epochs=3, seed=0, reuse=True)   # doctest: +SKIP
    """
    if reuse:
        done = find_job(lab, data, **job_options)
        if done is not None:
            print(
                f"reusing {done.id} ({done.fine_tuned_model}): it trained the same data with the same settings"
            )
            return done
    file = upload(lab, data)
    job = create_job(lab, file.id, **job_options)
    return wait(lab, job.id, timeout=timeout, progress=progress)


def events(lab: Lab, job_id: str, limit: int = 100) -> pd.DataFrame:
    """The job's latest `limit` events, oldest first: time, level, type, message.

    >>> log = events(lab, job.id)                                    # doctest: +SKIP
    >>> log[log.type == "message"].message.iloc[-1]                  # doctest: +SKIP
    'The job has successfully completed'
    """
    page = lab.client.fine_tuning.jobs.list_events(job_id, limit=min(limit, 100))
    rows = [
        {
            "created_at": pd.Timestamp(e.created_at, unit="s"),
            "level": e.level,
            "type": e.type,
            "message": e.message,
        }
        for e in itertools.islice(page, limit)  # iterating a page fetches the next pages too
    ]
    return (
        pd.DataFrame(rows, columns=["created_at", "level", "type", "message"])
        .iloc[::-1]
        .reset_index(drop=True)
    )


def checkpoints(lab: Lab, job_id: str) -> pd.DataFrame:
    """The job's checkpoints: step, the checkpoint model name, and its metrics (train_loss, valid_loss, ...).

    >>> checkpoints(lab, job.id)[["step", "model", "valid_loss"]]   # doctest: +SKIP
    """
    rows = [
        {
            "step": c.step_number,  # an int (the metrics' own "step" is a float: left out)
            "model": c.fine_tuned_model_checkpoint,
            **{
                k: v
                for k, v in (c.metrics.model_dump(exclude_none=True) if c.metrics else {}).items()
                if k != "step"
            },
        }
        for c in lab.client.fine_tuning.jobs.checkpoints.list(job_id)
    ]
    return (
        pd.DataFrame(rows).sort_values("step").reset_index(drop=True)
        if rows
        else pd.DataFrame(columns=["step", "model"])
    )


def list_jobs(lab: Lab, limit: int = 20) -> pd.DataFrame:
    """Recent jobs, newest first: id, status, base model, fine-tuned model, trained tokens.

    >>> list_jobs(lab, limit=5)["status"].tolist()                   # doctest: +SKIP
    ['cancelled', 'failed', 'succeeded']
    """
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
    ).astype({"trained_tokens": "Int64"})  # None (not trained) stays <NA>, the rest stay integers
