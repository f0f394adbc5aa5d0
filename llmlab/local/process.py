"""One local server per `LLMLAB_HOME`, shared by every kernel: find it, start it as a process of its own, stop it.

The running server records how to reach it in ``<home>/server.json`` (url, port, pid, a random key, the
llmlab version; readable by the user only, written atomically). ``<home>/server.lock`` (an `fcntl.flock`)
makes starts one at a time, so two kernels calling `connect()` at once end up with one server. A record whose
process is gone, whose port answers without knowing the key, or written by another llmlab version is stale
and gets replaced. A server started here stops by itself after `LLMLAB_IDLE_TIMEOUT` seconds (default 20
minutes) with no request and no active fine-tuning job.

>>> record, started = ensure_server()  # the home's running server, or a new one  # doctest: +SKIP
>>> record.url  # doctest: +SKIP
'http://127.0.0.1:40123/v1'
>>> stop_server()  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab.paths import atomic_write_text, llmlab_home

if TYPE_CHECKING:
    from llmlab.local.runtimes import Models

RECORD, LOCK, LOG = "server.json", "server.lock", "server.log"
DEFAULT_IDLE_TIMEOUT = 20 * 60.0  # seconds; Binder culls an idle session after 10 minutes anyway
START_TIMEOUT = 120.0  # seconds to wait for a new server's first answer (or for another kernel starting one)
PROBE_TIMEOUT = 5.0  # seconds a running server has to answer GET /v1/models
_log = logging.getLogger(__name__)
_children: dict[int, subprocess.Popen] = {}  # servers this process started: polled, so no zombie looks alive


@dataclass(frozen=True)
class ServerRecord:
    """How to reach a home's server (the contents of ``<home>/server.json``); the key never shows in a repr."""

    url: str
    port: int
    pid: int
    version: str
    home: str
    started_at: float
    idle_timeout: float | None
    key: str = field(repr=False)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _version() -> str:
    import llmlab

    return llmlab.__version__


def idle_timeout_from_env(environ: Mapping[str, str] = os.environ) -> float | None:
    """`LLMLAB_IDLE_TIMEOUT` in seconds (default 20 minutes); 0 or less means never.

    >>> idle_timeout_from_env({"LLMLAB_IDLE_TIMEOUT": "90"}), idle_timeout_from_env({"LLMLAB_IDLE_TIMEOUT": "0"})
    (90.0, None)
    """
    raw = environ.get("LLMLAB_IDLE_TIMEOUT", "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_IDLE_TIMEOUT
    except ValueError:
        raise ValueError(f"LLMLAB_IDLE_TIMEOUT must be a number of seconds, not {raw!r}") from None
    return seconds if seconds > 0 else None


# -- the record --------------------------------------------------------------------------------------------------
def read_record(home: Path) -> ServerRecord | None:
    """The home's record as written, or None when there is none (or it cannot be read)."""
    try:
        return ServerRecord(**json.loads((home / RECORD).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(home: Path, record: ServerRecord) -> None:
    path = atomic_write_text(home / RECORD, json.dumps(asdict(record)))  # mkstemp: mode 0600
    os.chmod(path, 0o600)


def _remove_record(home: Path, pid: int) -> None:
    """Remove the record if it still names `pid` (a newer server's record is left alone)."""
    record = read_record(home)
    if record is not None and record.pid == pid:
        (home / RECORD).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(home: Path, timeout: float = START_TIMEOUT) -> Iterator[None]:
    """Hold ``<home>/server.lock`` (one kernel at a time finds or starts the server)."""
    fd = os.open(home / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process held {home / LOCK} for {timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# -- finding a live server ---------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, but not ours
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): kill(pid, 0) is all we know
        return True


def answers(record: ServerRecord, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when the record's port answers GET /v1/models with the record's key (so it is that server)."""
    import httpx  # here, not at the top: the server process itself never needs it

    try:
        return httpx.get(f"{record.url}/models", headers=record.headers(), timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def find_server(home: Path | str | None = None) -> ServerRecord | None:
    """The home's running server (same llmlab version, answering with its key), or None.

    >>> find_server()           # doctest: +SKIP
    ServerRecord(url='http://127.0.0.1:40123/v1', port=40123, pid=4242, version='0.1.0', ...)
    """
    home = Path(home) if home else llmlab_home()
    record = read_record(home)
    if record is None or record.version != _version() or not _alive(record.pid):
        return None
    return record if answers(record) else None


# -- starting and stopping ---------------------------------------------------------------------------------------
def ensure_server(home: Path | str | None = None) -> tuple[ServerRecord, bool]:
    """The home's running server, or a new one started as a process of its own; (record, started).

    A stale record is replaced: a server of another llmlab version is stopped first; a foreign process
    that now holds a recorded port or pid is left alone.
    """
    home = Path(home) if home else llmlab_home()
    with _locked(home):
        found = find_server(home)
        if found is not None:
            return found, False
        old = read_record(home)
        if old is not None and old.version != _version() and _alive(old.pid) and answers(old):
            _terminate(old)  # ours (it knows the key), but another version: replace it
        (home / RECORD).unlink(missing_ok=True)
        return _spawn(home), True


def _spawn(home: Path) -> ServerRecord:
    """Start ``python -m llmlab.local.process`` for `home` in a session of its own; wait for its first answer."""
    import llmlab

    env = dict(os.environ)
    package_root = str(Path(llmlab.__file__).resolve().parent.parent)  # the child runs this very llmlab
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with open(home / LOG, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "llmlab.local.process", "--home", str(home)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives the kernel; a kernel interrupt does not reach it
        )
    _children[child.pid] = child
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        record = read_record(home)
        if record is not None and record.pid == child.pid and answers(record):
            return record
        if child.poll() is not None:
            tail = (home / LOG).read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(f"the llmlab server exited at start (code {child.returncode}):\n{tail}")
        time.sleep(0.1)
    child.kill()
    raise TimeoutError(f"the llmlab server did not answer within {START_TIMEOUT:.0f} s; see {home / LOG}")


def _terminate(record: ServerRecord, timeout: float = 15.0) -> None:
    """SIGTERM the server (it finishes open requests and removes its record), SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(record.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(record.pid):
            os.kill(record.pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while _alive(record.pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def stop_server(home: Path | str | None = None) -> ServerRecord | None:
    """Stop the home's running server; the record of the server stopped, or None if none was running.

    A fine-tuning job it was running is marked failed by the next server.
    """
    home = Path(home) if home else llmlab_home()
    with _locked(home):
        record = find_server(home)
        if record is not None:
            _terminate(record)
        if record is not None or read_record(home) is not None:
            (home / RECORD).unlink(missing_ok=True)
        return record


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def server_status(home: Path | str | None = None) -> dict[str, str]:
    """What `llmlab status` shows: the home, its server (url, pid, version, uptime, memory) and active jobs."""
    from llmlab.local.jobs import ACTIVE
    from llmlab.local.store import Store

    home = Path(home) if home else llmlab_home()
    status = {"home": str(home)}
    record = find_server(home)
    if record is None:
        stale = read_record(home)
        status["server"] = "not running" + (f" (stale record of pid {stale.pid})" if stale else "")
    else:
        rss = _rss_mb(record.pid)
        status.update(
            server="running",
            url=record.url,
            pid=f"{record.pid}" + (f" ({rss:.0f} MB resident)" if rss is not None else ""),
            version=record.version,
            up=f"{(time.time() - record.started_at) / 60:.1f} min",
            **{"idle timeout": f"{record.idle_timeout:.0f} s" if record.idle_timeout else "never"},
        )
    jobs = [j for j in Store(home).list_jobs() if j["status"] in ACTIVE]
    status["active jobs"] = ", ".join(f"{j['id']} ({j['status']})" for j in jobs) or "none"
    return status


# -- running one ------------------------------------------------------------------------------------------------
def run(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    idle_timeout: float | None = None,
    log_level: str = "warning",
    on_ready: Callable[[ServerRecord], None] | None = None,
) -> None:
    """Serve `home` in this process until stopped or idle, keeping its record while it runs.

    The port is bound and the record written before the app is built: `starting.StartingApp` answers
    GET /v1/models at once while FastAPI and the app are imported and made in a thread. Meanwhile another
    thread loads the chat model if it is built and served on ONNX (`ChatRuntime.load_if_built`): the first
    chat waits for the slower of the two, not for both in turn.
    Bound to a non-loopback `host`, it answers any `Host` name (the CLI then requires an API key).
    """
    import uvicorn

    from llmlab.local.loopback import bind, is_loopback
    from llmlab.local.runtimes import Models
    from llmlab.local.starting import StartingApp

    key = api_key or secrets.token_urlsafe(32)
    pid = os.getpid()
    sock = bind(host, port)
    allow_remote = not is_loopback(host)
    front = StartingApp(home, api_key=key, allow_remote=allow_remote)
    config = uvicorn.Config(
        front, log_level=log_level, lifespan="off", timeout_keep_alive=30, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    models = Models(home)
    threading.Thread(target=_load_chat_model, args=(models,), name="llmlab-loading", daemon=True).start()

    def build() -> Any:
        from llmlab.local.server import create_app, stop_when_idle

        app = create_app(home, api_key=key, allow_remote=allow_remote, models=models)
        if idle_timeout:
            threading.Thread(target=stop_when_idle, args=(app, server, idle_timeout), daemon=True).start()
        return app

    def stop() -> None:
        server.should_exit = True

    reach = "127.0.0.1" if host in ("0.0.0.0", "localhost") else host
    reach = f"[{reach}]" if ":" in reach else reach
    bound_port = sock.getsockname()[1]
    record = ServerRecord(
        url=f"http://{reach}:{bound_port}/v1",
        port=bound_port,
        pid=pid,
        version=_version(),
        home=str(home),
        started_at=time.time(),
        idle_timeout=idle_timeout,
        key=key,
    )
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: exit through `finally`, not by the signal
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        front.start(build, on_error=stop)
        _write_record(home, record)
        if on_ready is not None:
            on_ready(record)
        server.run(sockets=[sock])
    finally:
        _remove_record(home, pid)


def _load_chat_model(models: Models) -> None:
    """Load the chat model ahead of the first chat if it is built and served on ONNX; a failure is left for
    that chat to meet again and answer (as an error naming it)."""
    try:
        models.chat().load_if_built()
    except Exception:
        _log.warning("llmlab: loading the chat model ahead failed", exc_info=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve_foreground(
    home: Path | str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    idle_timeout: float | None = None,
    on_ready: Callable[[ServerRecord], None] | None = None,
) -> None:
    """What `llmlab serve` runs: the home's server in this process, with the same record `connect()` uses.

    Raises RuntimeError when a server already runs for the home (`llmlab stop` stops it).
    """
    home = Path(home) if home else llmlab_home()
    lock = contextlib.ExitStack()
    lock.enter_context(_locked(home))
    try:
        running = find_server(home)
        if running is not None:
            raise RuntimeError(
                f"a server already runs for {home} at {running.url} (pid {running.pid}): "
                "use it, or stop it with `llmlab stop`"
            )

        def ready(record: ServerRecord) -> None:
            lock.close()  # the record is written: other kernels may look now
            if on_ready is not None:
                on_ready(record)

        run(
            home,
            host=host,
            port=port,
            api_key=api_key,
            idle_timeout=idle_timeout,
            log_level="info",
            on_ready=ready,
        )
    finally:
        lock.close()


def main(argv: list[str] | None = None) -> None:
    """The spawned server's entry point (its parent holds the home's lock until the record appears)."""
    parser = argparse.ArgumentParser(prog="python -m llmlab.local.process")
    parser.add_argument("--home", required=True)
    args = parser.parse_args(argv)
    run(Path(args.home), idle_timeout=idle_timeout_from_env())


if __name__ == "__main__":
    main()
