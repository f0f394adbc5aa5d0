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


def test_a_fine_tuned_model_can_be_fine_tuned_again_from_its_adapter(lab, finetuned, ft_examples, tmp_path):
    """`jobs.create(model="ft:...")` continues from that model's adapter (as on OpenAI): with a learning rate
    near zero the new model answers as its parent does, not as the base model; `fine_tune(model=...)` reuses it."""
    question = [m for m in ft_examples[0]["messages"] if m["role"] != "assistant"]

    def answer(model):
        response = lab.client.chat.completions.create(
            model=model, messages=question, temperature=0, max_completion_tokens=24
        )
        return response.choices[0].message.content

    parent, base = answer(finetuned.fine_tuned_model), answer(lab.chat_model)
    assert parent != base, "the parent must answer its example unlike the base model for this test to tell"
    options = {"n_epochs": 1, "batch_size": 10, "learning_rate_multiplier": 1e-6, "seed": 1}
    data = _write(tmp_path, ft_examples[:10], "ten.jsonl")  # OpenAI's least
    job = fine_tune(lab, data, model=finetuned.fine_tuned_model, progress=False, **options)
    assert job.status == "succeeded" and job.model == finetuned.fine_tuned_model, job.error
    assert job.fine_tuned_model.startswith("ft:") and job.fine_tuned_model != finetuned.fine_tuned_model
    assert answer(job.fine_tuned_model) == parent
    again = fine_tune(lab, data, model=finetuned.fine_tuned_model, reuse=True, **options)
    assert again.id == job.id
    assert find_job(lab, data, **options) is None, "a job on the base model is another job"
