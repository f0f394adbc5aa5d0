"""The course: Fernhollow Instruments, the fictional company of the notebooks, and how the course measures
the three techniques on its questions. The only code in llmlab that knows the company; the helpers
(`llmlab.datasets`, `llmlab.rag`, `llmlab.tools`, ...) never import it.

- `data`: the company's files (`DATA_DIR`, `read_jsonl`), carried in the wheel.
- `company`: its employee table and its live-data tools for function calling.
- `questions`: the question sets (trained, paraphrase, handbook-only, live; the tool-calling cases), the
  fine-tuning set behind them, and the rule that says an answer is right (`contains_facts`).
- `formatting`: the format task of notebook 02b (HR messages to a JSON object) and its answer checker.
- `claims`: the usual qualitative comparisons of the techniques, as tables.
- `evaluation`: the harness: systems (base, fine-tuned, RAG, tools, hybrid) asked the same questions, scored
  and priced; the tool-choice score of `evaluate_tool_calls`.

>>> from llmlab.course import company, questions
>>> company.get_leave_balance("Kwame Mensah")["leave_days_left"]
13
>>> len(questions.training_set(10))
10
"""
