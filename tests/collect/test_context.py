"""The context guard (collect.context): a prompt whose tokens + max_new_tokens exceed the teacher's context is
an error naming it, or skipped, or truncated -- counted in summary.json and the manifest. The openai backend
against the fake server (its context set in the recipe, prompts counted with the real SmolLM2 tokenizer), and
the hf backend against the real model's 8,192-token context."""

from __future__ import annotations

import json

import pytest

from tests.collect.conftest import openai_collect, read_jsonl, write_recipe
from toolkit.cli import main

LIMIT, MAX_NEW = 160, 8
LONG_ID = "long"


def data_with_a_long_prompt(workdir, words: int = 400):
    rows = [{"id": "a", "instruction": "where is my order", "category": "ORDER"},
            {"id": LONG_ID, "instruction": "My parcel is late. " + "It never came and nobody answers. " * (words // 6)
             + "What do I do now?", "category": "DELIVERY"},
            {"id": "b", "instruction": "I want my money back", "category": "REFUND"}]
    path = workdir / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"path": str(path)}


def run(workdir, server, policy, capsys=None):
    collect = {**openai_collect(server, context_length=LIMIT), "context": policy}
    collect["generation"] = {"max_new_tokens": MAX_NEW}
    code = main(["run", str(write_recipe(workdir, collect, data=data_with_a_long_prompt(workdir)))])
    return code, workdir / "artifacts" / "t" / "collect"


def sent_prompts(server) -> list[str]:
    return [b["messages"][-1]["content"] for b in server.bodies]


def test_error_names_the_prompt_and_the_lengths(workdir, fake_openai, capsys, smollm2_dir):
    server = fake_openai()
    code, _ = run(workdir, server, "error")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"prompt {LONG_ID} has" in err and f"context of {LIMIT} tokens" in err and "collect.context" in err
    assert server.bodies == []  # nothing was sent: the check runs before the first request


def test_skip_records_the_prompt_and_counts_it(workdir, fake_openai, smollm2_dir):
    server = fake_openai()
    code, out = run(workdir, server, "skip")
    assert code == 0
    assert [r["id"] for r in read_jsonl(out / "outputs.jsonl")] == ["a", "b"]
    (failure,) = read_jsonl(out / "failures.jsonl")
    assert failure["id"] == LONG_ID and "collect.context: skip" in failure["error"] and failure["attempts"] == 0
    assert not any("nobody answers" in p for p in sent_prompts(server))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["context"] == {"policy": "skip", "limit": LIMIT, "over_limit": 1, "skipped": 1, "truncated": 0,
                                  "checked": True}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["context_skipped"] == 1


def test_truncate_cuts_the_middle_until_it_fits(workdir, fake_openai, smollm2_dir):
    from toolkit.engines import Renderer
    from toolkit.models import load_tokenizer

    server = fake_openai()
    code, out = run(workdir, server, "truncate")
    assert code == 0
    records = {r["id"]: r for r in read_jsonl(out / "outputs.jsonl")}
    long = records[LONG_ID]
    sent = long["messages"][-1]["content"]
    assert sent in sent_prompts(server) and sent.startswith("My parcel is late.") and sent.endswith("do I do now?")
    assert " ... " in sent
    renderer = Renderer(load_tokenizer("smollm2-135m-instruct"), True)
    assert len(renderer.prompt(long["messages"]).ids) + MAX_NEW <= LIMIT
    assert records["a"]["messages"][-1]["content"] == "where is my order"  # prompts that fit are untouched
    summary = json.loads((out / "summary.json").read_text())
    assert summary["context"]["truncated"] == 1 and summary["context"]["skipped"] == 0
    assert json.loads((out / "manifest.json").read_text())["metrics"]["context_truncated"] == 1


@pytest.mark.slow
def test_hf_backend_checks_the_models_own_context(workdir, capsys, smollm2_dir):
    """SmolLM2-135M: 8,192 positions. A ~9k-token prompt stops the stage before any generation."""
    collect = {"backend": "hf", "generation": {"max_new_tokens": 4}}
    code = main(["run", str(write_recipe(workdir, collect, data=data_with_a_long_prompt(workdir, words=9000)))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"prompt {LONG_ID} has" in err and "context of 8192 tokens" in err
