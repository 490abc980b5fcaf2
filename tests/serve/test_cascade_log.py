"""A cascade's escalations in the traffic log: the teacher's answers are collectable by default, under the model
that answered, with the student's tokens beside them (both models ran); a student without log-probs is reported."""

from __future__ import annotations

import json
import logging
import time

from tests.collect.fake_openai_server import FakeOpenAI
from tests.serve.test_edges import backend, chat, live, post
from toolkit.collect.log_source import ineligible, read_log
from toolkit.config.collect import LogBackendConfig


def test_escalated_answers_are_logged_as_the_teachers_with_both_models_usage(tmp_path, caplog):
    log = tmp_path / "traffic.jsonl"
    with FakeOpenAI(logprob_tokens=["x", "y"]) as small, FakeOpenAI() as big:
        with live({"student": backend(small, "s-model"), "teacher": backend(big, "t-model")},
                  cascade={"threshold": 0.0}, traffic_log={"enabled": True, "path": str(log)}) as url:
            r = post(url, chat("Escalate this question please."))
            assert r.headers["x-optkit-route"] == "teacher-escalated"
            assert sum(small.hits.values()) == 1 and sum(big.hits.values()) == 1
        deadline = time.monotonic() + 10
        while not (log.is_file() and log.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
    line = json.loads(log.read_text().splitlines()[0])
    assert line["route"] == "teacher-escalated" and line["served_model"] == "t-model"
    assert line["student_usage"]["completion_tokens"] >= 1 and line["usage"]["completion_tokens"] >= 1
    entries = read_log([log], "auto", "error", {"lines": 0, "skipped": {}})
    assert [ineligible(e, LogBackendConfig(), False) for e, _ in entries] == [None]  # collected by default
    assert [ineligible(e, LogBackendConfig(models=["t-model"]), False) for e, _ in entries] == [None]


def test_a_student_that_returns_no_log_probs_is_reported_once(tmp_path, caplog):
    """No log-probs means no confidence: every request escalates (student + teacher, dearer than the teacher
    alone), and nothing said so."""
    from toolkit.serve import cascade

    cascade._warned.clear()
    with FakeOpenAI() as small, FakeOpenAI() as big:  # this student never sends log-probs
        with caplog.at_level(logging.WARNING, logger="optkit.serve"):
            with live({"student": backend(small, "s-model"), "teacher": backend(big, "t-model")},
                      cascade={"threshold": -5.0}) as url:
                routes = [post(url, chat(f"question {i}")).headers["x-optkit-route"] for i in range(3)]
    assert routes == ["teacher-escalated"] * 3
    assert caplog.text.count("returned no token log-probs") == 1
