"""The openai backend against a real HTTP server on 127.0.0.1 (tests/collect/fake_openai_server.py) that
injects faults and counts what it receives."""

from __future__ import annotations

import json

from tests.collect.conftest import openai_collect, read_jsonl, write_recipe
from tests.collect.fake_openai_server import answer_for
from toolkit.cli import main
from toolkit.engines.openai_client import parse_retry_after


def collect_dir(workdir, name="t"):
    return workdir / "artifacts" / name / "collect"


def test_every_fault_kind_is_retried_and_each_prompt_answered_once(workdir, fake_openai):
    server = fake_openai(faults={"429": 0.15, "500": 0.15, "timeout": 0.1, "malformed": 0.15},
                         fault_attempts=2, timeout_sleep_s=4.0)
    # A 2 s client timeout: an answered request must never time out on a loaded machine (that would be a retry
    # nobody injected); the injected ones hold the reply for 4 s.
    path = write_recipe(workdir, openai_collect(server, timeout_s=2.0), data={"limit": 40})
    assert main(["run", str(path)]) == 0
    out = collect_dir(workdir)
    records = read_jsonl(out / "outputs.jsonl")
    assert len(records) == 40 and read_jsonl(out / "failures.jsonl") == []
    for r in records:  # each answer belongs to its own prompt (no mix-up between concurrent requests)
        assert r["output"] == answer_for(r["messages"][-1]["content"])
        assert r["finish_reason"] == "stop" and r["output_tokens"] == 2 and r["input_tokens"] > 3
    assert len(server.successes) == 40 and set(server.successes.values()) == {1}
    faults = server.fault_counts
    assert all(faults[k] > 0 for k in ("429", "500", "timeout", "malformed")), faults
    stats = json.loads((out / "summary.json").read_text())["backend_stats"]
    # Each injected fault cost exactly one retry, counted by kind.
    assert stats["retries"] == sum(faults.values())
    assert (stats.get("retry_http_429", 0), stats.get("retry_http_5xx", 0), stats.get("retry_timeout", 0),
            stats.get("retry_malformed", 0)) == (faults["429"], faults["500"], faults["timeout"], faults["malformed"])


def test_retry_after_is_honored(workdir, fake_openai):
    server = fake_openai(faults={"429": 1.0}, fault_attempts=1, retry_after="1")
    collect = openai_collect(server, backoff_base_s=0.001, backoff_max_s=0.002)
    assert main(["run", str(write_recipe(workdir, collect, data={"limit": 3}))]) == 0
    assert len(server.attempt_times) == 3
    for times in server.attempt_times.values():
        assert len(times) == 2 and times[1] - times[0] >= 0.95  # the server asked for 1 s; backoff alone: 2 ms


def test_retry_after_parsing():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    import email.utils
    import time

    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(later) <= 31


def test_concurrency_is_bounded(workdir, fake_openai):
    # The server holds each request until 4 are in flight (at most 5 s): a client that kept its bound of 3 is
    # seen with 2..3 in flight (never 4), one that ignored it with 4+, one that sends serially with 1.
    server = fake_openai(gather=4, gather_timeout_s=1.0)
    assert main(["run", str(write_recipe(workdir, openai_collect(server, concurrency=3, timeout_s=5.0),
                                         data={"limit": 12}))]) == 0
    assert 1 < server.max_in_flight <= 3 and len(server.successes) == 12


def test_failures_after_retries_are_recorded_and_reported(workdir, fake_openai, capsys):
    bad = "Cancel my newsletter"  # never answered: this prompt always gets HTTP 500
    data = workdir / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "instruction": p, "category": "X"}) + "\n"
                            for i, p in enumerate(["where is my order", bad, "change my address", "refund please"])))
    server = fake_openai(always_fail=(bad,))
    path = write_recipe(workdir, {**openai_collect(server, max_retries=2), "max_failures": 0.25},
                        data={"path": str(data)})
    assert main(["run", str(path)]) == 0
    out = collect_dir(workdir)
    failures = read_jsonl(out / "failures.jsonl")
    assert [(f["prompt"], f["attempts"], f["error"]) for f in failures] == [(bad, 3, "HTTP 500")]
    assert server.hits[bad] == 3  # 1 try + max_retries
    assert len(read_jsonl(out / "outputs.jsonl")) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["failed"] == 1

    # Stricter: the same failure now fails the stage; only the failed prompt is sent again.
    capsys.readouterr()
    assert main(["run", str(path), "collect.max_failures=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 of 4 prompts failed after retries" in err and "collect.max_failures" in err and "\n" not in err
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert server.hits[bad] == 6 and all(server.hits[p] == 1 for p in server.hits if p != bad)


def test_api_key_from_env_var(workdir, fake_openai, monkeypatch):
    server = fake_openai(api_key="sk-env-0123456789")
    monkeypatch.setenv("MY_TEAM_KEY", "sk-env-0123456789")
    collect = openai_collect(server, api_key_env="MY_TEAM_KEY")
    assert main(["run", str(write_recipe(workdir, collect, data={"limit": 5}))]) == 0
    assert set(server.auth_seen) == {"Bearer sk-env-0123456789"} and len(server.successes) == 5


def test_completions_api_sends_plain_prompt(workdir, fake_openai):
    server = fake_openai()
    collect = openai_collect(server, api="completions")
    assert main(["run", str(write_recipe(workdir, collect, data={"limit": 3, "system_prompt": "Be brief."}))]) == 0
    assert all(b["prompt"].startswith("Be brief.\n\n") and "messages" not in b for b in server.bodies)
    records = read_jsonl(collect_dir(workdir) / "outputs.jsonl")
    assert len(records) == 3
    assert all(r["output"] == answer_for("Be brief.\n\n" + r["messages"][-1]["content"]) for r in records)


def test_logprobs_become_teacher_token_ids(workdir, fake_openai, smollm2_dir):
    from toolkit.models import load_tokenizer
    from toolkit.records import load_topk

    tok = load_tokenizer("smollm2-135m-instruct")
    ids = tok.encode(" The category is REFUND.", add_special_tokens=False)
    strings = [tok.decode([i]) for i in ids]
    server = fake_openai(logprob_tokens=strings)
    collect = {**openai_collect(server), "top_logprobs": 3}
    assert main(["run", str(write_recipe(workdir, collect, data={"limit": 2}))]) == 0
    assert all(b["logprobs"] is True and b["top_logprobs"] == 3 for b in server.bodies)
    topk = load_topk(collect_dir(workdir))
    assert len(topk) == 2
    for top_ids, top_lps in topk.values():
        assert tuple(top_ids.shape) == (len(ids), 3) and str(top_lps.dtype) == "torch.float16"
        assert top_ids[:, 0].tolist() == ids  # token strings mapped back to the teacher's vocabulary
        assert (top_lps[:, 0] >= top_lps[:, 1]).all()


def test_missing_logprobs_are_counted_not_fatal(workdir, fake_openai):
    server = fake_openai()  # this server never returns logprobs
    collect = {**openai_collect(server), "top_logprobs": 2}
    assert main(["run", str(write_recipe(workdir, collect, data={"limit": 2}))]) == 0
    summary = json.loads((collect_dir(workdir) / "summary.json").read_text())
    assert summary["backend_stats"]["missing_logprobs"] == 2 and summary["answered"] == 2


def test_backoff_doubles_with_jitter_and_is_capped():
    from types import SimpleNamespace

    from toolkit.engines.openai_client import ClientConfig, OpenAIClient, Retryable

    backend = OpenAIClient(ClientConfig("http://127.0.0.1:1/v1", "collect.openai", backoff_base_s=0.5,
                                        backoff_max_s=3.0))

    def wait(attempt, retry_after=None):  # tenacity's RetryCallState exposes these two attributes
        exc = Retryable("HTTP 500", "http_5xx", retry_after)
        return backend.wait_s(SimpleNamespace(outcome=SimpleNamespace(exception=lambda: exc), attempt_number=attempt))

    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        waits = [wait(attempt) for _ in range(200)]
        assert ceiling / 2 <= min(waits) and max(waits) <= ceiling and max(waits) - min(waits) > ceiling / 10
    assert wait(1, retry_after=7.5) == 7.5  # the server's Retry-After wins over the backoff cap
