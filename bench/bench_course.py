"""Time the course: every notebook top to bottom, one after another, in a fresh home, against issue 17's budget.

    python bench/bench_course.py                # runs copies in a fresh home; bench/results/course.json
    python bench/bench_course.py --save         # runs them in place and saves them (what `make notebooks` does)
    python bench/bench_course.py notebooks/07_compare_and_combine.ipynb   # some of them only

The budget (issue 17): the whole sequence in under 15 minutes on this 2-core machine, no notebook over 5. A
fresh home is what a learner has on Binder: nothing trained, no job to reuse, the weight cache built by set-up
(bench/_homes.py links it). The notebooks run in order in that one home, as a learner takes them: a later
notebook may reuse a job an earlier one trained (`fine_tune(..., reuse=True)`), as it would for a learner.

`--save` runs in the default home (`~/.cache/llmlab`, emptied first except its weight cache) so that saved
outputs show home-relative paths, and writes each notebook back with its outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _homes import fresh_home

from llmlab.paths import REPO_ROOT, atomic_write_text

BUDGET_TOTAL_S, BUDGET_EACH_S = 15 * 60, 5 * 60
DEFAULT_HOME = Path.home() / ".cache" / "llmlab"


def emptied_default_home() -> Path:
    """`~/.cache/llmlab` with everything but its weight cache removed (its server stopped first)."""
    subprocess.run([sys.executable, "-m", "llmlab", "stop"], env=_env(None), capture_output=True, check=False)
    DEFAULT_HOME.mkdir(parents=True, exist_ok=True)
    for entry in DEFAULT_HOME.iterdir():
        if entry.name != "weights":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return DEFAULT_HOME


def _env(home: Path | None) -> dict[str, str]:
    """A learner's environment: no key, no other server, offline models; `home` as LLMLAB_HOME (None: default)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "LLMLAB_HOME")
    }
    return env | {"HF_HUB_OFFLINE": "1"} | ({"LLMLAB_HOME": str(home)} if home else {})


def run_notebook(notebook: Path, home: Path | None, out_dir: Path | None) -> tuple[float, int]:
    """Execute `notebook` (in place when `out_dir` is None); (seconds, exit code)."""
    where = ["--inplace"] if out_dir is None else ["--output-dir", str(out_dir)]
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", *where]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--ExecutePreprocessor.timeout=3600", str(notebook)],
        env=_env(home),
        cwd=notebook.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook, in order")
    parser.add_argument("--save", action="store_true", help="run in place in the default home and save")
    args = parser.parse_args()
    notebooks = [p.resolve() for p in args.notebooks] or sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    home = emptied_default_home() if args.save else fresh_home()
    out_dir = None if args.save else Path(tempfile.mkdtemp(prefix="llmlab-course-"))
    seconds: dict[str, float] = {}
    failed: list[str] = []
    for notebook in notebooks:
        took, code = run_notebook(notebook, None if args.save else home, out_dir)
        seconds[notebook.stem] = round(took, 1)
        print(f"{notebook.stem:32s} {took:7.0f} s{'  FAILED' if code else ''}", flush=True)
        if code:
            failed.append(notebook.stem)
    subprocess.run([sys.executable, "-m", "llmlab", "stop"], env=_env(home), capture_output=True, check=False)
    every = [p.stem for p in sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))]
    path = REPO_ROOT / "bench" / "results" / "course.json"
    earlier = json.loads(path.read_text())["seconds"] if path.exists() and len(seconds) < len(every) else {}
    merged = {name: seconds.get(name, earlier.get(name)) for name in every}  # a partial run updates its rows
    if None in merged.values():
        print("not every notebook has a time yet: bench/results/course.json is left as it was")
        sys.exit(1 if failed else 0)
    total = sum(merged.values())
    over = [name for name, s in merged.items() if s > BUDGET_EACH_S]
    print(
        f"{'in all':32s} {total:7.0f} s (budget {BUDGET_TOTAL_S} s; over {BUDGET_EACH_S} s: {over or 'none'})"
    )
    result = {
        "seconds": merged,
        "total_s": round(total, 1),
        "budget_total_s": BUDGET_TOTAL_S,
        "budget_each_s": BUDGET_EACH_S,
        "over_budget_each": over,
        "within_budget": total <= BUDGET_TOTAL_S and not over,
        "failed": failed,
        "run_alone_later": []
        if not earlier
        else sorted(seconds),  # re-run after the rest, each in a fresh home
        "home": "default (emptied)" if args.save else "fresh",
        "cpus": os.cpu_count(),
        "load_at_end": os.getloadavg()[0],
    }
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
