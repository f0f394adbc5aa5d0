"""The `llmlab` command: `llmlab doctor`, `llmlab serve`, `llmlab validate FILE.jsonl`.

>>> main(["doctor"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _doctor(args: argparse.Namespace) -> int:
    from llmlab.doctor import run_checks

    report = run_checks()
    print(report)
    return 0 if report.ok else 1


def _serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("LLMLAB_API_KEY")
    if not _is_loopback(args.host):
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
    from llmlab.local.server import serve

    serve(host=args.host, port=args.port, api_key=api_key)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from llmlab.datasets import validate_file

    report = validate_file(args.file, model=args.model)
    print(report)
    return 0 if report else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmlab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="check models, libraries and the backend choice").set_defaults(
        run=_doctor
    )
    serve = commands.add_parser("serve", help="run the OpenAI-compatible local server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback host (needs an API key)"
    )
    serve.add_argument("--api-key", help="require this key on every request (or set LLMLAB_API_KEY)")
    serve.set_defaults(run=_serve)
    validate = commands.add_parser("validate", help="check a chat fine-tuning JSONL file")
    validate.add_argument("file")
    validate.add_argument("--model", default=None, help="the model to count tokens and context for")
    validate.set_defaults(run=_validate)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
