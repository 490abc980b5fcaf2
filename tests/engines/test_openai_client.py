"""The one OpenAI-compatible client, as the judge uses it (collect's use is tested in tests/collect): a server's
Retry-After is honoured, 401/404 stop at once (never retried), an unusable reply is retried then counted as
missing. Against the real HTTP test server of tests/collect/fake_openai_server.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.collect.fake_openai_server import FakeOpenAI
from toolkit.errors import OptkitError


def judge_cfg(base_url: str, **kw):
    return SimpleNamespace(base_url=base_url, model="judge-1", api_key_env="OPTKIT_NO_SUCH_KEY_VAR", timeout_s=5.0,
                           max_retries=2, **kw)


@pytest.fixture
def server():
    servers = []

    def make(**kw):
        servers.append(FakeOpenAI(**kw).start())
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def test_judge_honours_retry_after_and_counts_unusable_replies_as_missing(server):
    from toolkit.evaluate.judge import Judge

    fake = server(faults={"429": 1.0}, fault_attempts=1, retry_after="1")
    judge = Judge(judge_cfg(fake.base_url))
    # The fake server's answers carry no 1-10 score: retried (max_retries), then missing -- never a low score.
    assert judge.score("q", "ref", "cand") is None
    (times,) = fake.attempt_times.values()
    assert len(times) == 3 and times[1] - times[0] >= 0.95  # 429 + Retry-After: 1 s (backoff alone: 0.25-0.5 s)
    assert judge.client.stats["retry_http_429"] == 1 and judge.client.stats["retry_malformed"] == 1


@pytest.mark.parametrize("case", ["401", "404"])
def test_a_rejected_key_or_a_wrong_url_is_not_retried(server, case, monkeypatch):
    from toolkit.evaluate.judge import Judge

    fake = server(api_key="sk-right-1234")
    monkeypatch.setenv("JUDGE_KEY_T", "sk-wrong-5678")
    url = fake.base_url if case == "401" else fake.base_url.replace("/v1", "/nope")
    judge = Judge(judge_cfg(url) if case == "404" else SimpleNamespace(**{**vars(judge_cfg(url)),
                                                                         "api_key_env": "JUDGE_KEY_T"}))
    with pytest.raises(OptkitError, match="rejected the API key" if case == "401" else "HTTP 404") as err:
        judge.score("q", "ref", "cand")
    assert str(err.value).startswith("evaluate.judge: ") and "sk-wrong-5678" not in str(err.value)
    assert len(fake.bodies) == 1  # one request, no retry
