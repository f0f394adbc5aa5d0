"""`JobMonitor`: a fine-tuning job's status, progress, loss curve, event log and a cancel button, kept live.

It polls `lab.client.fine_tuning.jobs` (retrieve, list_events, checkpoints.list) in a background thread,
so the notebook stays usable, and stops when the job ends. The same SDK calls work on OpenAI.

>>> monitor = JobMonitor(lab, job.id)  # doctest: +SKIP
>>> monitor.wait(timeout=600).status  # doctest: +SKIP
'succeeded'
>>> print(monitor.summary())  # doctest: +SKIP
ftjob-…: succeeded → ft:SmolLM2-135M-Instruct:llmlab:handbook:1a2b3c4d · step 24/24 · epoch 8/8 · …

Where no widget can be drawn (a headless run, a notebook viewer without widget support), `summary()`
and the widget's text form (its repr) tell the same state in one line.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets as w
import openai

from llmlab.openai_facts import FINISHED_JOB_STATUSES
from llmlab.ui._base import TABLE_CSS, Panel, esc, styled
from llmlab.ui.svg import line_chart

STATUS_COLORS = {"succeeded": "#2e7d32", "failed": "#b00020", "cancelled": "#757575", "running": "#1565c0"}


def _n_epochs(job: Any) -> int | None:
    """The job's epoch count, from `method` (current API) or the deprecated top-level `hyperparameters`."""
    for holder in (getattr(getattr(job, "method", None), "supervised", None), job):
        hyper = getattr(holder, "hyperparameters", None)
        n = getattr(hyper, "n_epochs", None)
        if isinstance(n, int):
            return n
    return None


class JobMonitor(Panel):
    """A live view of one fine-tuning job; `.refresh()` polls once, `.wait(timeout)` blocks until it ends.

    With `start=True` the constructor polls once (so the widget shows the job's state at once), then a
    background thread polls every `poll_seconds` until the job ends.

    State readable from Python: `.job` (the last `FineTuningJob`), `.events` (oldest first), `.metrics`
    (one dict per step: step, train_loss, valid_loss, ...), `.checkpoints`, and the widgets' values.
    """

    def __init__(self, lab: Any, job_id: str, poll_seconds: float = 2.0, start: bool = True):
        self.lab, self.job_id, self.poll_seconds = lab, job_id, poll_seconds
        self.job: Any = None
        self.events: list[Any] = []
        self.metrics: list[dict] = []
        self.checkpoints: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

        self.title = styled(w.HTML(f"<b>Fine-tuning job</b> <code>{esc(job_id)}</code>"), "job-title")
        self.status = styled(w.HTML(""), "job-status")
        self.progress = styled(w.IntProgress(value=0, min=0, max=1, description="steps"), "job-progress")
        self.progress_label = styled(w.Label(""), "job-progress-label")
        self.loss_plot = styled(w.HTML(line_chart({}, title="loss")), "job-loss")
        self.event_log = styled(
            w.HTML("", layout=w.Layout(max_height="220px", overflow="auto")), "job-events"
        )
        self.cancel_button = styled(w.Button(description="Cancel job", button_style="warning"), "job-cancel")
        self.cancel_button.on_click(self.guard(lambda _: self.cancel()))
        super().__init__(
            "job-monitor",
            [
                self.title,
                w.HBox([self.status, self.cancel_button]),
                w.HBox([self.progress, self.progress_label]),
                self.loss_plot,
                self.event_log,
            ],
        )
        if start:
            self.guard(self.refresh)()  # show the job's state from the start, then keep it live
            self.start()

    # ---- polling ------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """True once the job has succeeded, failed or been cancelled."""
        return self._done.is_set()

    @property
    def polling(self) -> bool:
        """True while the background thread polls."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Poll in a background thread every `poll_seconds` until the job ends (no-op if already polling)."""
        if self.polling or self.finished:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"JobMonitor-{self.job_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (the job itself goes on)."""
        self._stop.set()

    def _loop(self) -> None:
        safe_refresh = self.guard(self.refresh)
        while not self._stop.is_set():
            safe_refresh()
            if self.finished or isinstance(self.last_error, openai.NotFoundError):
                return
            self._stop.wait(self.poll_seconds)

    def refresh(self) -> Any:
        """Poll the job once (status, new events, checkpoints) and redraw; returns the job."""
        with self._lock:
            jobs = self.lab.client.fine_tuning.jobs
            job = jobs.retrieve(self.job_id)
            new = self._new_events(jobs)
            if new or (job.status in FINISHED_JOB_STATUSES and not self.finished):
                self.checkpoints = sorted(jobs.checkpoints.list(self.job_id), key=lambda c: c.step_number)
            self.job = job
            self._render()
            if job.status in FINISHED_JOB_STATUSES:
                self._done.set()
            return job

    def _new_events(self, jobs: Any) -> list[Any]:
        """Events not seen yet (the API lists newest first); appended to `.events` oldest first."""
        known = {e.id for e in self.events}
        new = []
        for event in jobs.list_events(self.job_id, limit=100):
            if event.id in known:
                break
            new.append(event)
        new.reverse()
        self.events.extend(new)
        for event in new:
            if event.type == "metrics" and event.data:
                self.metrics.append(dict(event.data))
        self.metrics.sort(key=lambda row: row.get("step", 0))
        return new

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the job ends (polling here if no thread does); returns the job. TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {self.job_id} is still {self.status_text} after {timeout} s")
            if self.polling:
                self._done.wait(min(remaining or self.poll_seconds, self.poll_seconds))
            else:
                self.refresh()
                if not self.finished:
                    time.sleep(min(remaining or self.poll_seconds, self.poll_seconds))
        return self.job

    def cancel(self) -> Any:
        """Ask the server to cancel the job, then poll once; returns the job."""
        self.lab.client.fine_tuning.jobs.cancel(self.job_id)
        return self.refresh()

    # ---- rendering ----------------------------------------------------------------------------------
    @property
    def status_text(self) -> str:
        """The job's status ("" before the first poll)."""
        return self.job.status if self.job is not None else ""

    def loss_series(self) -> dict[str, list[tuple[float, float]]]:
        """Train and validation loss by step: from metrics events, else validation from checkpoints."""
        train = [(m["step"], m["train_loss"]) for m in self.metrics if m.get("train_loss") is not None]
        valid = [(m["step"], m["valid_loss"]) for m in self.metrics if m.get("valid_loss") is not None]
        if not valid:
            for c in self.checkpoints:
                metrics = c.metrics.model_dump(exclude_none=True) if c.metrics else {}
                value = metrics.get("full_valid_loss", metrics.get("valid_loss"))
                if value is not None:
                    valid.append((c.step_number, value))
        return {"train": train, "validation": valid} if valid else {"train": train}

    def _progress_parts(self) -> list[str]:
        """The progress line's pieces: step, epoch, latest train loss, trained tokens."""
        job, last = self.job, (self.metrics[-1] if self.metrics else {})
        total = last.get("total_steps") or self.progress.max
        parts = [f"step {int(last.get('step', 0))}/{total}" if last else "waiting for the first step"]
        epochs, epoch = _n_epochs(job), last.get("epoch")
        if epoch is not None:
            parts.append(f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}")
        if last.get("train_loss") is not None:
            parts.append(f"train loss {last['train_loss']:.4f}")
        if job.trained_tokens:
            parts.append(f"{job.trained_tokens:,} trained tokens")
        return parts

    def summary(self) -> str:
        """The monitor's state as one line of text: job, status, model, progress, loss, error.

        >>> JobMonitor(lab, "ftjob-abc", start=False).summary()   # doctest: +SKIP
        'ftjob-abc: not polled yet'
        """
        job, last_error = getattr(self, "job", None), getattr(self, "last_error", None)
        if job is None:
            error = f" ({type(last_error).__name__}: {last_error})" if last_error else ""
            return f"{self.job_id}: not polled yet{error}"
        model = f" → {job.fine_tuned_model}" if job.fine_tuned_model else ""
        text = f"{self.job_id}: {job.status}{model} · " + " · ".join(self._progress_parts())
        return text + (f" · error: {job.error.message}" if job.error else "")

    def __repr__(self) -> str:
        return f"JobMonitor({self.summary()})"

    def _render(self) -> None:
        job = self.job
        color = STATUS_COLORS.get(job.status, "#ef6c00")
        model = f" → <code>{esc(job.fine_tuned_model)}</code>" if job.fine_tuned_model else ""
        error = f"<br><span style='color:#b00020'>{esc(job.error.message)}</span>" if job.error else ""
        self.status.value = (
            f"<span style='color:{color};font-weight:bold'>{esc(job.status)}</span> "
            f"<code>{esc(job.model)}</code>{model}{error}"
        )
        last = self.metrics[-1] if self.metrics else {}
        total = last.get("total_steps") or self.progress.max
        self.progress.max = max(int(total), 1)
        step = int(last.get("step", 0))
        self.progress.value = self.progress.max if job.status == "succeeded" else min(step, self.progress.max)
        self.progress_label.value = " · ".join(self._progress_parts())
        self.loss_plot.value = line_chart(self.loss_series(), title="loss", xlabel="step")
        self.event_log.value = self._events_html()
        self.cancel_button.disabled = job.status in FINISHED_JOB_STATUSES

    def _events_html(self) -> str:
        rows = "".join(
            f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(e.created_at))}</td>"
            f"<td>{esc(e.level)}</td><td>{esc(e.message)}</td></tr>"
            for e in reversed(self.events[-200:])
        )
        return (
            TABLE_CSS
            + f'<table class="llmlab-events-table llmlab-table" style="font-size:90%">{rows}</table>'
        )
