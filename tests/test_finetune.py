"""`llmlab.finetune.find_job` / `fine_tune(reuse=True)` on the session's real job through the local server."""

from __future__ import annotations

import json

from conftest import FT_EPOCHS

from llmlab.finetune import find_job, fine_tune


def _write(tmp_path, examples, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(
        "".join(json.dumps(e) + "\n" for e in examples).encode("utf-8")
    )  # as the fixture uploads
    return path


def test_find_job_matches_the_same_bytes_and_settings_only(lab, finetuned, ft_examples, tmp_path):
    same = _write(tmp_path, ft_examples)
    found = find_job(lab, same, n_epochs=FT_EPOCHS, batch_size=2, seed=7)
    assert found is not None and found.id == finetuned.id
    assert find_job(lab, same).id == finetuned.id, "'auto' and no seed match any value"
    assert find_job(lab, same, seed=8) is None
    assert find_job(lab, same, n_epochs=FT_EPOCHS + 1) is None
    assert find_job(lab, _write(tmp_path, ft_examples[:-1], "fewer.jsonl")) is None


def test_fine_tune_reuse_returns_the_finished_job_without_training(
    lab, finetuned, ft_examples, tmp_path, capsys
):
    before = len(lab.client.fine_tuning.jobs.list(limit=100).data)
    job = fine_tune(lab, _write(tmp_path, ft_examples), n_epochs=FT_EPOCHS, batch_size=2, seed=7, reuse=True)
    assert job.id == finetuned.id and job.fine_tuned_model == finetuned.fine_tuned_model
    assert len(lab.client.fine_tuning.jobs.list(limit=100).data) == before, "no new job was created"
    assert f"reusing {finetuned.id}" in capsys.readouterr().out
