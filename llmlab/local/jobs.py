"""Fine-tuning jobs for the local server: check the request, validate the file, train LoRA in the background.

One job trains at a time, in one worker thread; validation runs as soon as a job is created.
Status: validating_files -> queued -> running -> succeeded | failed | cancelled.

>>> runner = JobRunner(store, get_runtime)                                  # doctest: +SKIP
>>> job = runner.create(FineTuningJobRequest(model="gpt-4o-mini", training_file=file_id))  # doctest: +SKIP
>>> runner.store.get_job(job["id"])["status"]                                # doctest: +SKIP
'running'
"""

from __future__ import annotations

import base64
import csv
import io
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmlab.local.owner import Owner, owner_alive
from llmlab.local.requests import FineTuningJobRequest
from llmlab.local.store import Store, new_id, public
from llmlab.models import CHAT_MODEL_ID, resolve_alias
from llmlab.openai_facts import FINISHED_JOB_STATUSES

CANCEL_WAIT = 15.0  # seconds a cancel request waits for the running job to stop
ACTIVE = ("validating_files", "queued", "running")


class JobRequestError(ValueError):
    """A create request the server must refuse; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming scheme for the model a job produces.

    >>> fine_tuned_name("SmolLM2-135M-Instruct", "faq", "ftjob-abcdefgh12345678")
    'ft:SmolLM2-135M-Instruct:llmlab:faq:12345678'
    """
    return f"ft:{base}:llmlab:{suffix or ''}:{job_id[-8:]}"


def auto_batch_size(n_examples: int) -> int:
    """The "auto" batch size: about a tenth of the examples, between 1 and 8.

    >>> auto_batch_size(40), auto_batch_size(5), auto_batch_size(1000)
    (4, 1, 8)
    """
    return min(8, max(1, n_examples // 10))


class JobRunner:
    """Creates, validates, trains and cancels fine-tuning jobs stored in `store`.

    `get_runtime()` returns the server's ChatRuntime (loaded on first call).
    """

    def __init__(self, store: Store, get_runtime: Callable[[], Any]) -> None:
        self.store = store
        self.get_runtime = get_runtime
        self._queue: queue.Queue[str] = queue.Queue()
        self._cancelled: set[str] = set()
        self.owner = Owner(store.home)
        self._worker = threading.Thread(target=self._work, name="llmlab-finetune", daemon=True)
        self._worker.start()
        self.recover()

    # -- requests --------------------------------------------------------------------------------------
    def create(self, request: FineTuningJobRequest) -> dict:
        """Check what the request model cannot (the base model, the files), store the job
        (status validating_files) and start validating it."""
        model = request.model
        parent = self._adapter_of(model) if model.startswith("ft:") else None
        if parent is None and resolve_alias(model) != CHAT_MODEL_ID:
            status, code = (404, "model_not_found") if resolve_alias(model) is None else (400, None)
            raise JobRequestError(f"Model {model!r} is not available for fine-tuning.", "model", code, status)
        training_file = self._check_file(request.training_file, "training_file")
        validation_file = request.validation_file and self._check_file(
            request.validation_file, "validation_file"
        )
        hyper = request.requested_hyperparameters().resolved()
        now = time.time_ns()
        job = {
            "id": new_id("ftjob-"),
            "object": "fine_tuning.job",
            "created_at": now // 10**9,
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": hyper,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "model": model if parent else CHAT_MODEL_ID,
            "organization_id": "org-llmlab",
            "result_files": [],
            "seed": random.randrange(2**31) if request.seed is None else request.seed,
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": training_file,
            "validation_file": validation_file,
            "user_provided_suffix": request.suffix,
            "metadata": request.metadata,
            "_requested_model": model,
            "_created_ns": now,
            "_parent_adapter_dir": parent,
            "_owner": self.owner.id,
        }
        from openai.types.fine_tuning import FineTuningJob  # here: the server starts without the SDK

        FineTuningJob.model_validate(public(job))  # what is stored must render: checked before it is
        self.store.job_dir(job["id"]).mkdir(parents=True, exist_ok=True)
        self.store.save_job(job)
        self.store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        threading.Thread(target=self._validate, args=(job["id"],), daemon=True).start()
        return job

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a job: at once when it has not started, within a training step when it runs."""
        job = self.store.get_job(job_id)
        if job is None:
            return None
        if job["status"] in FINISHED_JOB_STATUSES:
            raise JobRequestError(
                f"Job {job_id} has already {job['status']} and cannot be cancelled.", "fine_tuning_job_id"
            )
        self._cancelled.add(job_id)
        if job["status"] != "running":
            return self._finish(job_id, "cancelled", "Fine-tuning job cancelled.")
        deadline = time.monotonic() + CANCEL_WAIT
        while job["status"] == "running" and time.monotonic() < deadline:  # training stops within a step
            time.sleep(0.1)
            job = self.store.get_job(job_id)
        return job

    def recover(self) -> None:
        """Mark the active jobs whose server is gone as failed (another live server's jobs are left alone)."""
        for job in self.store.list_jobs():
            if job["status"] in ACTIVE and not owner_alive(self.store.home, job.get("_owner")):
                message = "The server stopped while this job was running; create the job again."
                self._finish(
                    job["id"],
                    "failed",
                    message,
                    error={"code": "server_stopped", "message": message, "param": None},
                )

    def wait_idle(self, timeout: float = 600.0) -> None:
        """Block until no job is waiting or training (used by tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while any(j["status"] in ACTIVE for j in self.store.list_jobs()) and time.monotonic() < deadline:
            time.sleep(0.2)

    # -- the work --------------------------------------------------------------------------------------
    def _adapter_of(self, model: str) -> str | None:
        """The adapter folder (home-relative) of the succeeded job whose model is `model`, or None.

        A job on such a model continues training from that adapter, as OpenAI fine-tunes a fine-tuned model.
        """
        for job in self.store.list_jobs():
            if job["status"] == "succeeded" and job.get("fine_tuned_model") == model:
                return job["_adapter_dir"]
        return None

    def _check_file(self, file_id: str, param: str) -> str:
        record = self.store.get_file(file_id)
        if record is None:
            raise JobRequestError(f"Invalid file {file_id!r}: no such file.", param, f"invalid_{param}")
        if record["purpose"] != "fine-tune":
            raise JobRequestError(
                f"File {file_id} has purpose {record['purpose']!r}; upload it with purpose='fine-tune'.",
                param,
                f"invalid_{param}",
            )
        return file_id

    def _check_examples(self, job: dict, param: str) -> int | None:
        """The number of examples in the job's file, or None after failing the job with the first problem.

        The file is validated line by line (`llmlab.validation.validate_file`), never held whole.
        """
        from llmlab.validation import validate_file

        path = self.store.file_path(job[param])
        if path is None:
            self._fail(job["id"], f"The {param.replace('_', ' ')} {job[param]} was deleted.", param)
            return None
        report = validate_file(path) if param == "training_file" else validate_file(path, min_examples=1)
        problems = report.errors  # includes the lines that did not parse
        if problems:
            first = problems[0]
            where = f"line {first.line}: " if first.line is not None else ""
            more = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
            self._fail(
                job["id"],
                f"The {param.replace('_', ' ')} {job[param]} is invalid: {where}{first.message}{more}",
                param,
            )
            return None
        return report.n_examples

    def _validate(self, job_id: str) -> None:
        job = self.store.get_job(job_id)
        try:
            self.store.add_event(job_id, f"Validating training file: {job['training_file']}")
            n_examples = self._check_examples(job, "training_file")
            if n_examples is None or (
                job["validation_file"] and self._check_examples(job, "validation_file") is None
            ):
                return
            hyper = self._resolve(job["hyperparameters"], n_examples)
            method = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
            if not self.store.transition_job(
                job_id, "validating_files", status="queued", hyperparameters=hyper, method=method
            ):
                return  # cancelled meanwhile
            self.store.add_event(job_id, "Files validated, moving job to queued state")
            self._queue.put(job_id)
        except Exception as exc:  # a bug or an unreadable file must fail the job, never leave it hanging
            self._fail(job_id, f"Validating the files failed: {exc}", "training_file")

    @staticmethod
    def _resolve(hyper: dict, n_examples: int) -> dict:
        from llmlab.tokens import default_epochs

        auto = {
            "n_epochs": default_epochs(n_examples),
            "batch_size": auto_batch_size(n_examples),
            "learning_rate_multiplier": 1.0,
        }
        return {name: auto[name] if value == "auto" else value for name, value in hyper.items()}

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            try:
                if self.store.get_job(job_id)["status"] == "queued":
                    self._train(job_id)
            except Exception as exc:  # keep the worker alive for the next job
                self._fail(job_id, f"Training failed: {type(exc).__name__}: {exc}", None, code="server_error")
            finally:
                self._cancelled.discard(job_id)

    def _train(self, job_id: str) -> None:
        from llmlab.local.training import DEFAULT_LEARNING_RATE, JsonlExamples, train_lora

        job = self.store.update_job(job_id, status="running")
        self.store.add_event(job_id, "Fine-tuning job started")
        hyper = job["hyperparameters"]
        examples = JsonlExamples(self.store.file_path(job["training_file"]))  # read line by line when needed
        validation = None
        if job["validation_file"]:
            validation = JsonlExamples(self.store.file_path(job["validation_file"]))
        name = fine_tuned_name(CHAT_MODEL_ID, job["user_provided_suffix"], job_id)
        parent = job.get("_parent_adapter_dir")
        out_dir = self.store.adapters_dir / job_id
        steps: list[dict] = []

        def on_step(info: Any) -> None:
            row = {
                "step": info.step,
                "epoch": info.epoch,
                "train_loss": info.train_loss,
                "valid_loss": info.valid_loss,
                "trained_tokens": info.trained_tokens,
            }
            steps.append(row)
            valid = f", validation loss={info.valid_loss:.4f}" if info.valid_loss is not None else ""
            self.store.add_event(
                job_id,
                f"Step {info.step}/{info.total_steps}: training loss={info.train_loss:.4f}{valid}",
                type="metrics",
                data={**row, "total_steps": info.total_steps},
            )

        def on_epoch(info: Any) -> None:
            step = steps[-1]["step"] if steps else 0
            metrics = {
                "step": step,
                "train_loss": info.train_loss,
                "valid_loss": info.valid_loss,
                "full_valid_loss": info.valid_loss,
            }
            self.store.add_checkpoint(
                job_id,
                {
                    "id": new_id("ftckpt-"),
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": int(time.time()),
                    "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}",
                    "fine_tuning_job_id": job_id,
                    "metrics": {k: v for k, v in metrics.items() if v is not None},
                    "step_number": step,
                    "_adapter_dir": self._relative(info.checkpoint_dir),
                },
            )
            self.store.add_event(job_id, f"Checkpoint created at step {step} (epoch {info.epoch})")

        result = train_lora(
            self.get_runtime(),
            examples,
            n_epochs=hyper["n_epochs"],
            batch_size=hyper["batch_size"],
            learning_rate=DEFAULT_LEARNING_RATE * hyper["learning_rate_multiplier"],
            seed=job["seed"],
            validation_examples=validation,
            out_dir=out_dir,
            on_step=on_step,
            on_epoch=on_epoch,
            should_stop=lambda: job_id in self._cancelled,
            start_from=self.store.home / parent if parent else None,
        )
        # base64 text, as OpenAI serves a job's result file (clients call base64.b64decode on it)
        csv_b64 = base64.b64encode(_metrics_csv(steps))
        results_file = self.store.add_file(csv_b64, "step_metrics.csv", "fine-tune-results")
        changes = {"trained_tokens": result.trained_tokens, "result_files": [results_file["id"]]}
        if result.cancelled or job_id in self._cancelled:
            self.store.update_job(job_id, **changes)
            self._finish(job_id, "cancelled", "Fine-tuning job cancelled.")
            return
        self.get_runtime().load_adapter(name, out_dir)
        self.store.update_job(job_id, fine_tuned_model=name, _adapter_dir=self._relative(out_dir), **changes)
        self.store.add_event(job_id, f"New fine-tuned model created: {name}")
        self._finish(job_id, "succeeded", "The job has successfully completed")

    def _relative(self, path: Any) -> str:
        """`path` relative to the home, so that a moved or copied home still finds its adapters."""
        path = Path(path).resolve()
        home = self.store.home.resolve()
        return str(path.relative_to(home)) if path.is_relative_to(home) else str(path)

    def _fail(self, job_id: str, message: str, param: str | None, code: str | None = None) -> None:
        code = code or (f"invalid_{param}" if param else "server_error")
        self._finish(job_id, "failed", message, error={"code": code, "message": message, "param": param})

    def _finish(self, job_id: str, status: str, message: str, error: dict | None = None) -> dict:
        job = self.store.update_job(job_id, status=status, finished_at=int(time.time()), error=error)
        if job["status"] == status:  # a job that had already finished otherwise keeps its status and events
            self.store.add_event(job_id, message, level="error" if status == "failed" else "info")
        return job


def _metrics_csv(steps: list[dict]) -> bytes:
    """The step metrics as the CSV that OpenAI attaches to a job as its result file."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["step", "epoch", "train_loss", "valid_loss", "trained_tokens"])
    writer.writeheader()
    for row in steps:
        writer.writerow(
            {k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()}
        )
    return out.getvalue().encode("utf-8")
