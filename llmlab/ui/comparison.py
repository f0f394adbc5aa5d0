"""`ComparisonView`: a results table (one row per technique) and one bar chart per numeric metric.

>>> import pandas as pd
>>> df = pd.DataFrame({"technique": ["base", "RAG"], "accuracy": [0.2, 0.8], "latency_s": [1.1, 1.6]})
>>> view = ComparisonView(df)
>>> view.metrics
['accuracy', 'latency_s']
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w
import pandas as pd

from llmlab.ui._base import Panel, styled
from llmlab.ui.svg import bar_chart


class ComparisonView(Panel):
    """Table + bar charts of a results DataFrame.

    The row labels are the first text column (or the index when no column is text); every numeric
    column is a metric with its own chart. `.metrics`, `.labels`, `.charts` (metric -> HTML widget).
    """

    def __init__(self, results: pd.DataFrame, label: str | None = None, metrics: list[str] | None = None):
        self.results = results
        if label is None:
            text = [c for c in results.columns if not pd.api.types.is_numeric_dtype(results[c])]
            label = text[0] if text else None
        self.labels = [str(v) for v in (results[label] if label is not None else results.index)]
        self.metrics = metrics or [
            c for c in results.columns if c != label and pd.api.types.is_numeric_dtype(results[c])
        ]
        self.table = styled(w.HTML(self._table_html(results, index=label is None)), "comparison-table")
        self.charts = {
            m: styled(w.HTML(bar_chart(self.labels, self._values(m), title=str(m))), "comparison-chart")
            for m in self.metrics
        }
        charts = w.GridBox(
            list(self.charts.values()),
            layout=w.Layout(grid_template_columns="repeat(auto-fill, minmax(430px, 1fr))"),
        )
        super().__init__("comparison", [self.table, charts])

    def _values(self, metric: str) -> list[Any]:
        return [None if pd.isna(v) else float(v) for v in self.results[metric]]

    @staticmethod
    def _table_html(results: pd.DataFrame, index: bool) -> str:
        return results.to_html(
            index=index, float_format=lambda v: f"{v:.3g}", na_rep="", classes="llmlab-table"
        )
