"""The saved notebooks look right to a learner who opens them: no machine's paths, no unexplained stderr, no
progress bar frozen at 0%, and a kernelspec (without one a notebook opens as modified).

Rules, per saved output of every notebook in notebooks/:
- no absolute path of the machine that ran it (/work/, /root/, /home/, /tmp/, /Users/, site-packages);
  llmlab shows its own folders home-relative (`~/.cache/llmlab`);
- a stderr stream is allowed only when the NEXT cell explains it: that cell's source must contain the
  marker words "stderr above" (e.g. a markdown cell "The stderr above is ... and is harmless because ...");
- no progress bar saved as text at 0% (the text/plain of a widget bar as first displayed, or the last frame
  of a text bar); llmlab's bars (`llmlab.progress.tqdm`) are re-displayed with their final state;
- metadata.kernelspec is python3, "Python 3 (ipykernel)".

The header (the first markdown cell) says how long the notebook takes here, "about N minutes here", and the
saved run backs it: from its first cell's start to its last cell's end (the cells' `execution` metadata that
Jupyter records) it took more than N-2 and at most N minutes (N is the run's minutes rounded up, or one more).

And per markdown cell: every number in the prose appears in the notebook's saved outputs, so that a claim a
re-run would change cannot stay typed in (format it from variables in a code cell, or show it in an output the
prose points to). Structure is not a claim: a heading's number ("## 4."), a list's ("1. "), a reference to a
notebook or section ("notebooks 03–05", "section 13"), a `code span` and a link's address are skipped, and so
are the few constants of `CONSTANTS` (each with its reason).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
MACHINE_PATH = re.compile(r"(?<![\w.~:/-])/(?:work|root|home|tmp|Users)/|site-packages")
ZERO_BAR = re.compile(r"(?<!\d)0%\|")
EXPLAINED = "stderr above"

RUN_TIME = re.compile(r"about (\d+) minutes? here")
# A number in prose: digits with thousands commas or a decimal part, not part of a name ("GPT-3", "L6", "v2").
PROSE_NUMBER = re.compile(r"(?<![\w.,/:-])\d+(?:[.,]\d+)*(?!\w|-\d|[.,]\d)")
OUTPUT_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
STRUCTURE = [
    re.compile(r"^\s*#{1,6}\s+(?:\d+(?:[.)]|\s·)\s)?", re.MULTILINE),  # "## 4. ...", the title "# 05 · ..."
    re.compile(r"^\s*\d+[.)]\s", re.MULTILINE),  # "1. " of a numbered list
    re.compile(r"`[^`]*`"),  # code spans
    re.compile(r"\]\([^)]*\)"),  # a link's address (its text stays)
    re.compile(r"<[^>]+>"),  # HTML tags
    RUN_TIME,  # the header's run time: checked against the saved run by its own test
    re.compile(r"\b(?:notebooks?|sections?|steps?)\s+\d+(?:\s*(?:[–,-]|and|to|or)\s*\d+)*", re.IGNORECASE),
]
# Constants of the models, the data and the outside world, as phrases (the number with its words): a re-run
# cannot change them. Everything else a notebook says in numbers must be in its outputs.
CONSTANTS = {
    "256 tokens": "all-MiniLM-L6-v2 reads at most 256 word pieces (its max_seq_length)",
    "rank 16": "the LoRA rank the local backend trains with",
    "175 billion": "GPT-3's published size",
    "about 200,000 of them": "the size of o200k_base, gpt-4o-mini's vocabulary",
    "65,536-token limit": "OpenAI's per-example limit when fine-tuning gpt-4o-mini",
}


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _last_frames(text: str) -> str:
    """What a terminal shows of `text`: each line's part after its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _outputs_of(nb: dict):
    """(cell index, output, its shown text) for every output of every code cell of the notebook `nb`."""
    for i, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                shown = _last_frames(_text(output["text"]))
            else:
                data = output.get("data", {})
                shown = "\n".join(_text(v) for k, v in data.items() if k.startswith("text/"))
                shown += _text(output.get("traceback", ""))
            yield i, output, shown


def problems(notebook: Path) -> list[str]:
    """Every rule broken by `notebook`'s saved outputs and metadata, as readable lines."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    cells, found = nb["cells"], []
    spec = nb.get("metadata", {}).get("kernelspec") or {}
    if spec.get("name") != "python3" or spec.get("display_name") != "Python 3 (ipykernel)":
        found.append(f"kernelspec is {spec or 'missing'}")
    for i, output, shown in _outputs_of(nb):
        if match := MACHINE_PATH.search(shown):
            start = max(0, match.start() - 40)
            found.append(f"cell {i}: a machine path: …{shown[start : match.end() + 40]!r}…")
        if ZERO_BAR.search(shown):
            found.append(f"cell {i}: a progress bar saved at 0%: {shown.strip()[:100]!r}")
        if output.get("name") == "stderr":
            following = _text(cells[i + 1]["source"]) if i + 1 < len(cells) else ""
            if EXPLAINED not in following.lower():
                found.append(f"cell {i}: stderr not explained in the next cell: {shown.strip()[:160]!r}")
    return found


def _plain_number(text: str) -> str:
    """A number as written, without thousands commas: "1,300" and "1300" are the same claim."""
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)


def prose_claims(markdown: str) -> list[tuple[str, str]]:
    """(number, the words around it) for every number the prose `markdown` states, structure and constants removed.

    >>> [number for number, _ in prose_claims("## 2. Results\\n1. Right on 11 of 30 (`k=3`, notebook 05), 1,300 times.")]
    ['11', '30', '1300']
    """
    for pattern in STRUCTURE:
        markdown = pattern.sub(" ", markdown)
    for phrase in CONSTANTS:
        markdown = re.sub(re.escape(phrase), " ", markdown, flags=re.IGNORECASE)
    return [
        (_plain_number(m.group()), markdown[max(0, m.start() - 20) : m.end() + 20].replace("\n", " "))
        for m in PROSE_NUMBER.finditer(markdown)
    ]


def unshown_numbers(nb: dict) -> list[str]:
    """The numbers in `nb`'s markdown that none of its saved outputs shows, as readable lines."""
    shown = {_plain_number(n) for _, _, text in _outputs_of(nb) for n in OUTPUT_NUMBER.findall(text)}
    return [
        f"cell {i}: {number!r} is in the prose but in no output: …{words.strip()}…"
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "markdown"
        for number, words in prose_claims(_text(cell["source"]))
        if number not in shown
    ]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_numbers_in_prose_are_in_the_outputs(notebook):
    found = unshown_numbers(json.loads(notebook.read_text(encoding="utf-8")))
    assert not found, "\n".join(found)


def test_the_prose_rule_checks_claims_not_structure():
    def notebook(markdown, output):
        stream = {"output_type": "stream", "name": "stdout", "text": output}
        return {
            "cells": [
                {"cell_type": "markdown", "source": markdown, "metadata": {}},
                {"cell_type": "code", "source": "x", "outputs": [stream], "metadata": {}},
            ]
        }

    claim = "RAG was right on 11 of 30 questions, some 1,300 times more."
    assert unshown_numbers(notebook(claim, "right: 11 of 30; ratio 1300\n")) == []
    missing = unshown_numbers(notebook(claim, "right: 12 of 30; ratio 1300\n"))
    assert len(missing) == 1 and "'11'" in missing[0] and "right on 11" in missing[0]
    structure = (
        "# 05 · RAG\n## 4. Steps 3 and 4: query\n1. first, see notebooks 03–05 and section 13\n"
        "`k=5`, [notebook 2](https://x.org/v2/3), the GPT-3 model, all-MiniLM-L6-v2, 256 tokens"
    )
    assert unshown_numbers(notebook(structure, "nothing\n")) == []
    assert unshown_numbers(notebook("It took about a minute, 101 s.", "took 100.7 s\n")) != []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_saved_notebook_is_clean(notebook):
    found = problems(notebook)
    assert not found, "\n".join(found)


def test_the_rules_catch_what_they_should(tmp_path):
    """Each rule on a small notebook: a clean one passes, each fault is named."""

    def notebook(outputs, next_source="", kernelspec=True):
        nb = {
            "cells": [
                {"cell_type": "code", "source": "x", "outputs": outputs, "metadata": {}},
                {"cell_type": "markdown", "source": next_source, "metadata": {}},
            ],
            "metadata": {
                "kernelspec": {
                    "name": "python3",
                    "display_name": "Python 3 (ipykernel)",
                    "language": "python",
                }
            }
            if kernelspec
            else {},
        }
        path = tmp_path / "nb.ipynb"
        path.write_text(json.dumps(nb))
        return problems(path)

    stream = {
        "output_type": "stream",
        "name": "stdout",
        "text": "home: ~/.cache/llmlab https://x.org/home/a\n",
    }
    assert notebook([stream]) == []
    assert notebook([stream], kernelspec=False) == ["kernelspec is missing"]
    leaked = {"output_type": "display_data", "data": {"text/html": "<td>/tmp/nbh2/weights</td>"}}
    assert "a machine path" in notebook([leaked])[0]
    venv = {"output_type": "stream", "name": "stdout", "text": "/opt/venv/lib/python3.11/site-packages/x"}
    assert "a machine path" in notebook([venv])[0]
    frozen = {"output_type": "display_data", "data": {"text/plain": "answering:   0%|          | 0/24"}}
    assert "saved at 0%" in notebook([frozen])[0]
    done = {"output_type": "stream", "name": "stdout", "text": "bar:   0%|  | 0/4\rbar: 100%|##| 4/4\n"}
    assert notebook([done]) == []
    warning = {"output_type": "stream", "name": "stderr", "text": "[transformers] Token indices ...\n"}
    assert "stderr not explained" in notebook([warning])[0]
    assert notebook([warning], next_source="The stderr above is harmless: ...") == []


def test_counting_long_texts_for_embedding_writes_no_tokenizer_warning(capfd):
    """The "longer than the specified maximum sequence length" warning of notebook 05 came from counting the
    tokens of a chunk longer than MiniLM's 256 (which is the point of counting): it is silenced at its source."""
    from llmlab.local.embedding_runtime import EmbeddingRuntime

    runtime = EmbeddingRuntime()
    assert runtime.count_tokens("word " * 400) > runtime.max_tokens
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_llmlab_bars_are_saved_with_their_final_state(tmp_path):
    """In a real kernel, a bar of `llmlab.progress.tqdm` is saved at 100% (tqdm.auto's stays at its 0% frame)."""
    import nbformat
    from nbclient import NotebookClient

    code = "import llmlab.progress, sys\nfor _ in llmlab.progress.tqdm(range(5), desc='demo'):\n    pass\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    shown = [text for _, _, text in _outputs_of(nb)]
    assert any("demo: 100%" in text for text in shown), shown
    assert not any(ZERO_BAR.search(text) for text in shown), shown


def run_seconds(nb: dict) -> float | None:
    """How long the saved run of `nb` took: its first cell's start to its last cell's end (the `execution`
    timings Jupyter records in each code cell's metadata); None when no cell has them.

    >>> cell = {"metadata": {"execution": {"iopub.execute_input": "2026-12-02T07:00:00.5Z",
    ...                                    "shell.execute_reply": "2026-12-02T07:02:00.5Z"}}}
    >>> run_seconds({"cells": [cell]})
    120.0
    """
    times = [c.get("metadata", {}).get("execution", {}) for c in nb["cells"]]
    starts = [datetime.fromisoformat(t["iopub.execute_input"]) for t in times if "iopub.execute_input" in t]
    ends = [datetime.fromisoformat(t["shell.execute_reply"]) for t in times if "shell.execute_reply" in t]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def run_time_problem(nb: dict) -> str | None:
    """What is wrong with the header's "about N minutes here" against the saved run, or None."""
    header = next((_text(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"), "")
    said, seconds = RUN_TIME.search(header), run_seconds(nb)
    if seconds is None:
        return "the saved run has no cell timings (execute it with Jupyter/nbconvert)"
    minutes = max(1, math.ceil(seconds / 60))
    if said is None:
        return f"the header does not say 'about N minutes here' (the saved run took {seconds:.0f} s: N={minutes})"
    if int(said.group(1)) not in (minutes, minutes + 1):
        return f"the header says {said.group()!r} but the saved run took {seconds:.0f} s: N={minutes}"
    return None


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_header_says_how_long_the_saved_run_took(notebook):
    problem = run_time_problem(json.loads(notebook.read_text(encoding="utf-8")))
    assert problem is None, problem


def test_the_run_time_rule_reads_the_saved_timings():
    def notebook(header, seconds):
        timing = {
            "iopub.execute_input": "2026-12-02T07:00:00Z",
            "shell.execute_reply": "2026-12-02T07:00:00Z",
        }
        last = {**timing, "shell.execute_reply": f"2026-12-02T07:{seconds // 60:02d}:{seconds % 60:02d}Z"}
        return {
            "cells": [
                {"cell_type": "markdown", "source": header, "metadata": {}},
                {"cell_type": "code", "source": "x", "outputs": [], "metadata": {"execution": timing}},
                {"cell_type": "code", "source": "y", "outputs": [], "metadata": {"execution": last}},
            ]
        }

    assert run_time_problem(notebook("It takes about 3 minutes here.", 134)) is None
    assert run_time_problem(notebook("It takes about 4 minutes here.", 134)) is None
    assert "took 134 s" in run_time_problem(notebook("It takes about 5 minutes here.", 134))
    assert "took 134 s" in run_time_problem(notebook("It takes about 2 minutes here.", 134))
    assert run_time_problem(notebook("It takes about 1 minute here.", 13)) is None
    assert "does not say" in run_time_problem(notebook("It is quick.", 13))
    assert unshown_numbers(notebook("It takes about 3 minutes here.", 134)) == []
