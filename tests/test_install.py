"""The install: the built wheel carries the data and works outside the repository, the Colab set-up cell
keeps a preinstalled torch and ipywidgets, the weight cache is built with one progress bar of ours, and the
CLI's errors are clear. (The set-up's torch is checked in test_foundation.py, with the Binder build.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import llmlab
from llmlab.cli import main
from llmlab.course.data import DATA_DIR
from llmlab.local.engine_onnx import engine_name
from llmlab.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


# ------------------------------------------------------------------------------------------ the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the source tree (the build leaves nothing in the repository)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for folder in ("llmlab", "data"):
        shutil.copytree(REPO_ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src],
        check=True,
        capture_output=True,
    )
    return next(out.glob("llmlab-*.whl"))


def test_the_wheel_holds_every_module_and_every_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "llmlab").rglob("*.py")}
    data = {f"llmlab/_data/{p.relative_to(DATA_DIR).as_posix()}" for p in DATA_DIR.rglob("*") if p.is_file()}
    assert modules <= names, f"missing modules: {sorted(modules - names)}"
    assert data <= names, f"missing data files: {sorted(data - names)}"


HELPERS_SCRIPT = """
import llmlab
from llmlab.course import claims, company, evaluation, questions
from llmlab.course.data import DATA_DIR
from llmlab.local.engine_onnx import engine_name

staff = company.employees()
name = staff.iloc[0]["name"]
balance = company.get_leave_balance(name)
print(json.dumps({
    "llmlab": llmlab.__file__,
    "data": str(DATA_DIR),
    "employees": len(staff),
    "balance": sorted(balance),
    "found": company.find_employee(name)["name"],
    "tools": [t["function"]["name"] for t in company.tool_definitions()],
    "tool_eval": len(questions.load_tool_eval()),
    "questions": len(questions.load_questions()),
    "trained": len(questions.trained_questions()),
    "training_set": len(questions.training_set(5)),
    "claims": list(claims.summary().columns),
    "harness": callable(evaluation.evaluate),
    "handbook": sorted(p.name for p in (DATA_DIR / "handbook").glob("*.md")),
}))
"""


def test_the_installed_wheel_runs_the_helpers_outside_the_repository(wheel, tmp_path):
    """A clean venv gets the wheel only; the libraries come from the set-up's venv through a plain path entry
    (its editable-llmlab .pth is not processed), and the helpers run from a folder outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", wheel], check=True, capture_output=True
    )
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"LLMLAB_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [python, "-c", "import json" + HELPERS_SCRIPT],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert Path(got["llmlab"]).is_relative_to(site), got["llmlab"]  # the installed copy, not the repo
    assert Path(got["data"]) == site / "llmlab" / "_data"
    assert got["employees"] > 0 and "employee_name" in got["balance"]
    assert got["tools"] and got["tool_eval"] > 0 and got["questions"] > 0 and got["trained"] > 0
    assert got["training_set"] == 5 and got["harness"]
    assert got["claims"] == ["Fine-tuning", "RAG", "Function calling"]
    assert got["handbook"] == sorted(p.name for p in (DATA_DIR / "handbook").glob("*.md"))


# ------------------------------------------------------------------------------------ Colab set-up cell


def _setup_cell(notebook: Path) -> str:
    return "".join(json.loads(notebook.read_text(encoding="utf-8"))["cells"][1]["source"])


def test_every_notebook_has_the_same_setup_cell():
    cells = {nb.name: _setup_cell(nb) for nb in NOTEBOOKS}
    assert len(cells) == 10 and len(set(cells.values())) == 1, cells.keys()
    assert next(iter(cells.values())).startswith("# Set-up for Colab")


def test_the_colab_setup_cell_keeps_a_preinstalled_torch_and_ipywidgets(tmp_path, monkeypatch):
    """Run the set-up cell as on Colab (llmlab missing, torch and ipywidgets importable), recording the
    commands it would run instead of running them: pip is constrained to the torch and ipywidgets already
    installed, and no command names torch itself."""
    real_find_spec = importlib.util.find_spec
    commands: list[list[str]] = []
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llmlab" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(subprocess, "run", lambda cmd, **_: commands.append([str(c) for c in cmd]))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the clone first on the path
    monkeypatch.chdir(tmp_path)
    exec(compile(_setup_cell(NOTEBOOKS[0]), "setup-cell", "exec"), {})

    kept = (tmp_path / "kept.txt").read_text().split()
    assert kept == [
        f"torch=={importlib.metadata.version('torch')}",
        f"ipywidgets=={importlib.metadata.version('ipywidgets')}",
    ]
    installs = [c for c in commands if c[1:4] == ["-m", "pip", "install"]]
    kit = next(c for c in installs if "llmlab[local]" in c)
    assert kit[kit.index("-c") + 1] == "kept.txt"
    assert not any(arg.split("=")[0] in ("torch", "ipywidgets") for c in installs for arg in c)
    assert commands[0][:2] == ["git", "clone"] and sys.path[0] == "llmlab"


# ------------------------------------------------------------------------------------------ weight cache


def test_the_weight_cache_is_built_with_one_bar_of_ours(tmp_path):
    """`llmlab doctor --build-cache` on a fresh home: the cache is built, our bar reaches its end, and none of
    transformers' bars ("Converting and de-quantizing GGUF tensors", "Loading weights", "Writing model
    shards") is drawn. Slow on purpose (~40 s): this is the set-up's own step."""
    env = {**os.environ, "LLMLAB_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "llmlab", "doctor", "--build-cache"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "home" / "weights" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    # and the default engine's int8 ONNX model, so that the first chat does not build it
    onnx = tmp_path / "home" / "weights" / "SmolLM2-135M-Instruct-onnx-uint8-lora-r0" / "genai_config.json"
    assert onnx.is_file() == (engine_name(env) == "onnx")
    assert "ok  weight cache: " in run.stdout and "not built yet" not in run.stdout
    bars = run.stderr.replace("\r", "\n")
    assert "Preparing the chat model (once)" in bars and "100%" in bars, bars[-2000:]
    for theirs in ("de-quantizing", "Loading weights", "Writing model shards"):
        assert theirs not in bars, bars[-2000:]


# ----------------------------------------------------------------------------------------------- CLI


def test_validate_a_missing_file_says_so_without_a_traceback(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "missing.jsonl" in err and "No such file" in err
    assert main(["validate", str(tmp_path)]) == 2  # a folder
    assert "Is a directory" in capsys.readouterr().err


def test_version_and_help_texts(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"llmlab {llmlab.__version__}"
    for command, options in (("serve", ("--host", "--port")), ("validate", ("file",))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for option in options:
            line = next(line for line in text.splitlines() if line.strip().startswith(option))
            assert len(line.split()) > 2, f"{command} {option} has no help text: {line!r}"


def test_python_dash_m_llmlab_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "llmlab", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"llmlab {llmlab.__version__}"


def test_serve_on_a_port_in_use_says_so_before_starting(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port {port}" in err and "already in use" in err and "--port" in err


def test_serve_prints_the_base_url_and_serves_there(tmp_path):
    import openai

    from llmlab.local.process import read_record

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LLMLAB_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmlab", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/v1"
        assert f"OPENAI_BASE_URL={url}" in first, first
        key = read_record(tmp_path / "home").key  # every request carries the server's key (issue 15)
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=20)
        assert any(m.id for m in client.models.list())
    finally:
        proc.terminate()
        proc.wait(30)
