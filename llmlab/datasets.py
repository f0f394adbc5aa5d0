"""The JSONL chat dataset for fine-tuning: build it, check it line by line, count its tokens, price it.

The checks are `llmlab.validation`'s (shared with the server); this module adds what a notebook wants on
top: DataFrames and CSV, token statistics and their plot, cost estimates, split and dedupe.

One example per line, OpenAI's supervised chat format: ``{"messages": [...], "tools"?: [...]}``.

>>> ds = ChatDataset.from_pairs([("What is our leave policy?", "25 days a year.")] * 2, system="You are HR.")
>>> len(ds), ds[0]["messages"][-1]
(2, {'role': 'assistant', 'content': '25 days a year.'})
>>> report = ds.validate()
>>> bool(report), [p.code for p in report.errors + report.warnings]
(False, ['too_few_examples', 'duplicate_example'])

Only supervised chat examples are validated: a DPO line (``input``/``preferred_output``) or a legacy
``prompt``/``completion`` line is reported as an error that names its format.
"""

from __future__ import annotations

import csv
import html
import io
import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab import tokens, validation
from llmlab.openai_facts import FINETUNE_MODEL
from llmlab.paths import atomic_write_text, remove_orphans, temp_names
from llmlab.tokens import default_epochs
from llmlab.validation import (
    MIN_EXAMPLES,
    Problem,
    Validator,
    cached_tokens,
    example_tokens,
    fingerprint,
    read_examples,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "MIN_EXAMPLES",
    "ChatDataset",
    "CostEstimate",
    "Problem",
    "TokenStats",
    "ValidationReport",
    "default_epochs",
    "validate_file",
]


# ------------------------------------------------------------------------------------------ validation


class ValidationReport(validation.ValidationReport):
    """A validation report (`llmlab.validation.ValidationReport`) with a table view for notebooks."""

    @classmethod
    def of(cls, report: validation.ValidationReport) -> ValidationReport:
        """The same report, with the table view."""
        return cls(report.errors, report.warnings, report.n_examples, report.model)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per problem: severity, line, example, code, message."""
        import pandas as pd

        rows = [
            {"severity": s, **asdict(p)}
            for s, ps in (("error", self.errors), ("warning", self.warnings))
            for p in ps
        ]
        columns = ["severity", "line", "example", "code", "message"]
        return pd.DataFrame(rows, columns=columns).astype({"line": "Int64", "example": "Int64"})

    def _repr_html_(self) -> str:
        table = self.to_dataframe().to_html(index=False, na_rep="") if self.errors or self.warnings else ""
        return f"<p><b>{html.escape(self.summary())}</b></p>{table}"


def validate_file(
    path: str | Path, model: str | None = None, min_examples: int = MIN_EXAMPLES
) -> ValidationReport:
    """`llmlab.validation.validate_file` (line by line, never holding the file whole), with the table view.

    >>> print(validate_file("missing.jsonl"))  # doctest: +SKIP
    """
    return ValidationReport.of(validation.validate_file(path, model, min_examples))


# ------------------------------------------------------------------------------------------ statistics


def _describe(values: list[int]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values, dtype=float)
    if not len(a):
        return dict.fromkeys(("min", "max", "mean", "median", "p5", "p95"), float("nan"))
    p5, p95 = np.percentile(a, [5, 95])
    return {
        "min": a.min(),
        "max": a.max(),
        "mean": a.mean(),
        "median": float(np.median(a)),
        "p5": p5,
        "p95": p95,
    }


@dataclass
class TokenStats:
    """Per-example token counts and their distributions; `plot()` draws a histogram."""

    model: str
    per_example: pd.DataFrame  # total_tokens, assistant_tokens, n_messages

    @property
    def summary(self) -> pd.DataFrame:
        """min/max/mean/median/p5/p95 (true 5th and 95th percentiles) of each per-example column."""
        import pandas as pd

        return pd.DataFrame({c: _describe(self.per_example[c].tolist()) for c in self.per_example.columns}).T

    def plot(self, ax=None, column: str = "total_tokens", bins: int = 30):
        """A histogram of `column` on `ax` (a new figure when None); returns the Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3))
        ax.hist(self.per_example[column], bins=bins, color="#4c72b0")
        ax.set(
            xlabel=column.replace("_", " "), ylabel="examples", title=f"{column} per example ({self.model})"
        )
        return ax

    def _repr_html_(self) -> str:
        return (
            f"<p>{len(self.per_example)} examples, tokens for {self.model}</p>"
            + self.summary.round(1).to_html()
        )


@dataclass(frozen=True)
class CostEstimate:
    """What a fine-tune would cost: billed tokens = tokens per epoch (each example capped) × epochs."""

    model: str
    n_examples: int
    n_epochs: int
    tokens_per_epoch: int
    billed_tokens: int
    usd_per_1m: float
    cost_usd: float
    prices_date: str

    def __str__(self) -> str:
        return (
            f"{self.model}: {self.n_examples} examples × {self.n_epochs} epochs = {self.billed_tokens:,} billed "
            f"tokens × ${self.usd_per_1m:.2f}/1M = ${self.cost_usd:.4f} (prices of {self.prices_date})"
        )

    def _repr_html_(self) -> str:
        return f"<p>{self}</p>"


# -------------------------------------------------------------------------------------------- dataset


def _share_strings(example: dict, pool: dict[str, str]) -> dict:
    """Make repeated keys, roles and system prompts one shared string each (about 20% less memory per example)."""
    messages = example.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else ()):
        if type(m) is dict:
            shared = m.get("role") == "system"
            messages[i] = {
                pool.setdefault(k, k): pool.setdefault(v, v)
                if type(v) is str and (k == "role" or shared)
                else v
                for k, v in m.items()
            }
    return example


def _json_cell(value: Any) -> Any:
    """A DataFrame/CSV cell that may hold JSON text (CSV) or the object itself (DataFrame)."""
    return (
        json.loads(value)
        if isinstance(value, str) and value
        else value
        if not isinstance(value, str)
        else None
    )


def _write(path: str | Path, text: str) -> Path:
    """`atomic_write_text`, first deleting temp files that killed earlier writes to `path` left behind."""
    path = Path(path)
    remove_orphans(path.parent, temp_names(path.name))
    return atomic_write_text(path, text)


class ChatDataset:
    """A list of chat examples ``{"messages": [...], "tools"?: [...]}`` with the file's line of each one.

    >>> ds = ChatDataset()
    >>> ds.add_pair("Hi?", "Hello!", system="Be brief.")
    >>> ds.examples[0]["messages"][0]
    {'role': 'system', 'content': 'Be brief.'}
    """

    def __init__(self, examples: Iterable[Mapping] = (), *, lines: Iterable[int | None] | None = None):
        self.examples: list[dict] = [dict(e) for e in examples]
        self.lines: list[int | None] = list(lines) if lines is not None else [None] * len(self.examples)
        self.load_problems: list[Problem] = []
        # token counts by encoding, then by example content (so edits in place can never give stale counts)
        self._token_cache: dict[str, dict[bytes, tuple[int, int]]] = {}

    # --- building
    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], system: str | None = None) -> ChatDataset:
        """From (question, answer) pairs, each becoming [system?, user, assistant]."""
        ds = cls()
        for question, answer in pairs:
            ds.add_pair(question, answer, system=system)
        return ds

    @classmethod
    def from_dataframe(
        cls, df: pd.DataFrame, question: str = "question", answer: str = "answer", system: str | None = None
    ) -> ChatDataset:
        """From a DataFrame: a ``messages`` column (as `to_dataframe` writes), or `question`/`answer` columns."""
        if "messages" in df.columns:
            tools_column = df["tools"] if "tools" in df.columns else [None] * len(df)
            examples = []
            for messages, tools_value in zip(df["messages"], tools_column, strict=True):
                example = {"messages": _json_cell(messages)}
                if isinstance(_json_cell(tools_value), list):
                    example["tools"] = _json_cell(tools_value)
                examples.append(example)
            return cls(examples)
        missing = [c for c in (question, answer) if c not in df.columns]
        if missing:
            raise KeyError(f"Column(s) {missing} not in the DataFrame (columns: {list(df.columns)})")
        return cls.from_pairs(
            zip(df[question].astype(str), df[answer].astype(str), strict=True), system=system
        )

    @classmethod
    def from_csv(
        cls, path: str | Path, question: str = "question", answer: str = "answer", system: str | None = None
    ) -> ChatDataset:
        """From a CSV file (see `from_dataframe` for the columns)."""
        import pandas as pd

        return cls.from_dataframe(
            pd.read_csv(path, dtype=str, keep_default_na=False), question, answer, system
        )

    @classmethod
    def from_jsonl(cls, path: str | Path) -> ChatDataset:
        """Load a JSONL file. Bad lines never stop the load: each is in `load_problems`, the rest in `examples`."""
        ds, pool = cls(), {}
        for line, example, problem in read_examples(path):
            if problem:
                ds.load_problems.append(problem)
            else:
                ds.examples.append(_share_strings(example, pool))
                ds.lines.append(line)
        return ds

    def add_pair(self, question: str, answer: str, system: str | None = None) -> None:
        """Append one [system?, user, assistant] example."""
        messages = [{"role": "system", "content": system}] if system else []
        self.append(
            {
                "messages": [
                    *messages,
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )

    def append(self, example: Mapping | list) -> None:
        """Append one example: a dict with `messages` (and maybe `tools`), or a bare list of messages."""
        self.examples.append({"messages": list(example)} if isinstance(example, list) else dict(example))
        self.lines.append(None)

    # --- container protocol
    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | slice) -> dict | ChatDataset:
        if isinstance(index, slice):
            return self._subset(range(len(self))[index])
        return self.examples[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"ChatDataset({len(self)} examples, {len(self.load_problems)} load problems)"

    # --- writing
    def to_jsonl(self, path: str | Path) -> Path:
        """Write one example per line, atomically (a crash mid-write leaves the old file intact)."""
        text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.examples)
        return _write(path, text)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per example: ``messages`` (and ``tools`` when any example has them), plus readable columns."""
        import pandas as pd

        def text(example: Mapping, role: str, last: bool = False) -> str | None:
            found = [
                m.get("content")
                for m in example.get("messages", ())
                if isinstance(m, dict) and m.get("role") == role
            ]
            return (found[-1] if last else found[0]) if found else None

        data: dict[str, list] = {
            "line": self.lines,
            "messages": [e.get("messages") for e in self.examples],
            "user": [text(e, "user") for e in self.examples],
            "assistant": [text(e, "assistant", last=True) for e in self.examples],
        }
        if any("tools" in e for e in self.examples):
            data["tools"] = [e.get("tools") for e in self.examples]
        return pd.DataFrame(data).astype({"line": "Int64"})

    def to_csv(self, path: str | Path) -> Path:
        """Write `to_dataframe()` as CSV with JSON cells, atomically; `from_csv` reads it back."""
        df = self.to_dataframe().drop(columns=["line"])
        for column in ("messages", "tools"):
            if column in df.columns:
                df[column] = [json.dumps(v, ensure_ascii=False) if v is not None else "" for v in df[column]]
        buffer = io.StringIO()
        df.to_csv(buffer, index=False, quoting=csv.QUOTE_NONNUMERIC)
        return _write(path, buffer.getvalue())

    # --- checking and counting
    def validate(self, model: str | None = None, min_examples: int = MIN_EXAMPLES) -> ValidationReport:
        """Every problem of every example (with its file line) plus the load problems; falsy when any is an error."""
        validator = Validator(model, min_examples)
        validator.known = self._known_counts(validator.encoding)
        for i, (example, line) in enumerate(zip(self.examples, self.lines, strict=True)):
            validator.check(example, line, i)
        return ValidationReport.of(validator.report(self.load_problems))

    def _known_counts(self, encoding: str) -> dict[bytes, tuple[int, int]]:
        known = self._token_cache.setdefault(encoding, {})
        if len(known) > 2 * len(self.examples) + 1000:  # many edits since: forget the old versions
            known.clear()
        return known

    def _counts(self, model: str) -> list[tuple[int, int]]:
        """(total, trained) tokens per example, reusing counts of unchanged examples."""
        encoding = tokens.encoding_name_for(model)
        known, counts = self._known_counts(encoding), []
        for example in self.examples:
            try:
                counts.append(cached_tokens(example, fingerprint(example), encoding, known))
            except (TypeError, ValueError):  # not JSON-serializable: count it, don't cache it
                counts.append(example_tokens(example, encoding))
        return counts

    def stats(self, model: str = tokens.DEFAULT_MODEL) -> TokenStats:
        """Per-example tokens (total, trained assistant tokens), messages per example, and their distributions."""
        import pandas as pd

        counts = self._counts(model)
        per_example = pd.DataFrame(
            {
                "total_tokens": [c[0] for c in counts],
                "assistant_tokens": [c[1] for c in counts],
                "n_messages": [len(e.get("messages") or ()) for e in self.examples],
            }
        )
        return TokenStats(model, per_example)

    def estimate_cost(self, model: str = FINETUNE_MODEL, n_epochs: int | str = "auto") -> CostEstimate:
        """The fine-tuning cost on `model`: OpenAI's default epochs (or `n_epochs`), billed tokens and the price."""
        price = tokens.price_for(model)
        if price.training is None:
            raise tokens.UnknownModelError(
                f"{model!r} cannot be fine-tuned; choose one of: "
                + ", ".join(m for m, p in tokens.PRICES.items() if p.training)
            )
        if not self.examples:
            raise ValueError("The dataset is empty: nothing to price")
        epochs = default_epochs(len(self)) if n_epochs == "auto" else int(n_epochs)
        cap = price.training_context or tokens.MAX_TOKENS_PER_EXAMPLE
        per_epoch = tokens.billed_tokens((c[0] for c in self._counts(model)), 1, cap)
        billed = per_epoch * epochs
        return CostEstimate(
            model,
            len(self),
            epochs,
            per_epoch,
            billed,
            price.training,
            tokens.training_cost(model, billed),
            price.date,
        )

    # --- reshaping
    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[ChatDataset, ChatDataset]:
        """(train, validation): a deterministic shuffle by `seed`; at least one of each when there are 2+ examples."""
        if not 0 <= val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_val = round(len(order) * val_fraction)
        if val_fraction > 0 and len(order) >= 2:
            n_val = min(max(n_val, 1), len(order) - 1)
        return self._subset(sorted(order[n_val:])), self._subset(sorted(order[:n_val]))

    def dedupe(self) -> ChatDataset:
        """A new dataset without exact duplicates (the first occurrence of each example is kept)."""
        seen, keep = set(), []
        for i, example in enumerate(self.examples):
            digest = fingerprint(example)
            if digest not in seen:
                seen.add(digest)
                keep.append(i)
        return self._subset(keep)

    def _subset(self, indices: Iterable[int]) -> ChatDataset:
        indices = list(indices)
        return ChatDataset([self.examples[i] for i in indices], lines=[self.lines[i] for i in indices])
