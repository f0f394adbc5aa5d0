"""The `llmlab` command: `llmlab doctor`, `llmlab serve`, `llmlab status`, `llmlab stop`, `llmlab validate FILE.jsonl`.

Also `python -m llmlab ...` (the same command where `.venv/bin` is not on the PATH).

>>> main(["doctor"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

import llmlab
from llmlab.local.loopback import is_loopback


def _port_taken(host: str, port: int) -> bool:
    """Whether something already listens on `host`:`port` (a bind as uvicorn's own, before it starts)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _doctor(args: argparse.Namespace) -> int:
    from llmlab.doctor import run_checks

    if args.build_cache:
        from llmlab.local.engine_onnx import build_onnx_model, engine_name
        from llmlab.local.weights import build_weight_cache

        build_weight_cache()
        if engine_name() == "onnx":
            build_onnx_model()
    report = run_checks()
    print(report)
    return 0 if report.ok else 1


def _serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("LLMLAB_API_KEY")
    if not is_loopback(args.host):
        if not args.allow_remote:
            print(
                f"llmlab serve: refusing to listen on {args.host}: only loopback addresses are allowed "
                "unless you pass --allow-remote",
                file=sys.stderr,
            )
            return 2
        if not api_key:
            print(
                "llmlab serve: --allow-remote needs an API key (--api-key or LLMLAB_API_KEY)", file=sys.stderr
            )
            return 2
    if _port_taken(args.host, args.port):
        print(
            f"llmlab serve: port {args.port} on {args.host} is already in use (another `llmlab serve`?): "
            "stop that server or choose another port with --port",
            file=sys.stderr,
        )
        return 1
    from llmlab.local.process import serve_foreground

    def ready(record) -> None:
        key = "the --api-key" if api_key else f'"key" in {Path(record.home) / "server.json"}'
        print(
            f"llmlab serve: clients connect with OPENAI_BASE_URL={record.url} and OPENAI_API_KEY set to {key} "
            f"(pid {record.pid}; `llmlab stop` stops it)",
            flush=True,
        )

    try:
        serve_foreground(
            host=args.host, port=args.port, api_key=api_key, idle_timeout=args.idle_timeout, on_ready=ready
        )
    except RuntimeError as error:
        print(f"llmlab serve: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"llmlab serve: cannot listen on {args.host}:{args.port}: {error.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down and raises it again
        pass
    return 0


def _status(args: argparse.Namespace) -> int:
    from llmlab.local.process import server_status

    status = server_status()
    for name, value in status.items():
        print(f"{name:<14}{value}")
    return 0 if status["server"] == "running" else 1


def _stop(args: argparse.Namespace) -> int:
    from llmlab.local.process import stop_server
    from llmlab.paths import llmlab_home

    record = stop_server()
    if record is None:
        print(f"llmlab stop: no server was running for {llmlab_home()}")
    else:
        print(f"llmlab stop: stopped the server at {record.url} (pid {record.pid})")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from llmlab.validation import validate_file

    try:
        report = validate_file(args.file, model=args.model)
    except OSError as error:  # missing, a folder, unreadable
        print(f"llmlab validate: cannot read {args.file}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"llmlab {llmlab.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check models, libraries and the backend choice")
    doctor.add_argument(
        "--build-cache",
        action="store_true",
        help="first build the chat model's float-weight cache and its int8 ONNX model (once, ~40 s + ~30 s), so "
        "the first chat answers at once",
    )
    doctor.set_defaults(run=_doctor)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible local server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback host (needs an API key)"
    )
    serve.add_argument("--api-key", help="require this key on every request (or set LLMLAB_API_KEY)")
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long with no request and no active job (default: never)",
    )
    serve.set_defaults(run=_serve)
    commands.add_parser("status", help="show the local server of LLMLAB_HOME").set_defaults(run=_status)
    commands.add_parser("stop", help="stop the local server of LLMLAB_HOME").set_defaults(run=_stop)
    validate = commands.add_parser("validate", help="check a chat fine-tuning JSONL file")
    validate.add_argument("file", help="the JSONL file to check, one training example per line")
    validate.add_argument("--model", default=None, help="the model to count tokens and context for")
    validate.set_defaults(run=_validate)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
