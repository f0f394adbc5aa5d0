"""The design's import rules (the `[tool.importlinter]` contracts in pyproject.toml) hold, and can fail.

`lint-imports` (import-linter) runs on the real tree, and once on a copy of the package into which imports
that break each rule have been planted: a helper importing the backend, a helper importing the ui, a helper
importing the course, the token counter importing an HTTP client, the validator importing pandas, the backend
importing the notebooks' dataset module, the prompt format importing the chat service above it, the routes
importing the runtime, the chat service importing the openai SDK. The notebooks are held to the same arrow:
they reach models through the API only (their Colab set-up cell alone builds the weight cache).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# module -> the import planted at its end, and the line lint-imports must report for it
PLANTED = {
    "tools.py": ("from llmlab.local import chat_format", "llmlab.tools -> llmlab.local.chat_format"),
    "rag.py": ("from llmlab.ui import svg", "llmlab.rag -> llmlab.ui.svg"),
    "tokens.py": ("import openai", "llmlab.tokens -> openai"),
    "embed.py": ("from llmlab.course import data", "llmlab.embed -> llmlab.course.data"),
    "validation.py": ("import pandas", "llmlab.validation -> pandas"),
    "local/store.py": ("from llmlab import datasets", "llmlab.local.store -> llmlab.datasets"),
    "local/chat_format.py": (
        "from llmlab.local import chat_service",
        "llmlab.local.chat_format -> llmlab.local.chat_service",
    ),
    "local/server.py": ("from llmlab.local import runtime", "llmlab.local.server -> llmlab.local.runtime"),
    "local/chat_service.py": ("import openai", "llmlab.local.chat_service -> openai"),
}


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    """`lint-imports` run in `project` (it analyses the `llmlab` package found there, with its pyproject)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_real_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " KEPT" in result.stdout and " BROKEN" not in result.stdout


def test_the_check_fails_on_helpers_that_break_the_rules(tmp_path):
    shutil.copytree(ROOT / "llmlab", tmp_path / "llmlab", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for module, (line, _) in PLANTED.items():
        with open(tmp_path / "llmlab" / module, "a", encoding="utf-8") as f:
            f.write(f"\n{line}  # planted by tests/test_design_rules.py\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"0 kept, {len(PLANTED)} broken" in result.stdout
    for _, reported in PLANTED.values():
        assert reported in result.stdout
    # an indirect import counts too: the ui reaches the backend through the planted import in tools
    assert "llmlab.ui is not allowed to import llmlab.local" in result.stdout


def _contract(contract_id: str) -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return next(c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == contract_id)


def test_every_module_but_the_course_is_bound_by_the_course_contract():
    """A module added to llmlab later is bound too: the contract lists every module and subpackage of llmlab
    but llmlab.course (and the package's own __init__ and __main__, which import only listed modules)."""
    package = ROOT / "llmlab"
    children = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if (p / "__init__.py").is_file()
    }
    expected = {f"llmlab.{name}" for name in children - {"__init__", "__main__", "course"}}
    assert set(_contract("helpers-not-course")["source_modules"]) == expected


BACKEND_IMPORT = re.compile(
    r"^[ \t]*(?:from\s+llmlab\.local\b|import\s+llmlab\.local\b|from\s+llmlab\s+import\s.*\blocal\b).*", re.M
)


def backend_imports(notebook: Path) -> list[str]:
    """`cell N: line` for every import of llmlab.local in `notebook`, but in its set-up cell (cell 1)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return [
        f"cell {i}: {m.group(0).strip()}"
        for i, cell in enumerate(cells)
        if cell["cell_type"] == "code" and i != 1
        for m in BACKEND_IMPORT.finditer("".join(cell["source"]))
    ]


def test_notebooks_reach_models_only_through_the_api():
    found = {nb.name: backend_imports(nb) for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))}
    assert len(found) == 10 and not any(found.values()), found


def test_the_notebook_rule_catches_a_backend_import(tmp_path):
    cells = [
        {"cell_type": "code", "source": [line]}
        for line in ("x = 1\n", "from llmlab.local.weights import build_weight_cache\n")
    ]
    cells += [{"cell_type": "code", "source": ["if True:\n", "    from llmlab.local import chat_format\n"]}]
    cells += [{"cell_type": "markdown", "source": ["from llmlab.local import chat_format"]}]
    (tmp_path / "nb.ipynb").write_text(json.dumps({"cells": cells}), encoding="utf-8")
    assert backend_imports(tmp_path / "nb.ipynb") == ["cell 2: from llmlab.local import chat_format"]


def test_the_readme_layout_names_every_module():
    """The README's Layout table stays true: it names every module and subpackage of llmlab, and no other."""
    layout = (ROOT / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set()
    for cell in re.findall(r"^\| ([^|]*`llmlab[^|]*) \|", layout, re.M):
        for name in re.findall(r"`(?:llmlab\.)?(\w+)`", cell):
            named.add(name)
    package = ROOT / "llmlab"
    modules = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if (p / "__init__.py").is_file()
    }
    assert named == modules - {"__init__", "__main__"}
