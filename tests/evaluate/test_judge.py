"""LLM-as-judge through an OpenAI-compatible endpoint. The endpoint is a tiny HTTP server on 127.0.0.1 (a test
double for a judge model, which cannot run here at useful quality): it records each request and grades by a
rule the test knows (10 when the candidate names the reference category, else 2), so the expected score is
computable from the student's real answers. The evaluation around it is real."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.evaluate import fakerun
from toolkit.errors import OptkitError
from toolkit.evaluate.judge import parse_score
from toolkit.io import read_jsonl

pytestmark = pytest.mark.slow
KEY = "sk-judge-test-4242"


class JudgeServer:
    def __init__(self, status: int = 200):
        self.requests, self.status = [], status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                text = body["messages"][1]["content"]
                ref = text.split("Reference answer:\n", 1)[1].split("\n", 1)[0].strip()
                cand = text.split("Candidate answer:\n", 1)[1].split("\n\nScore", 1)[0]
                score = 10 if ref.lower() in cand.lower() else 2
                reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"{score}"}}]}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def _recipe(root, url, **judge):
    from toolkit.config import recipe_from_dict

    return recipe_from_dict(fakerun.recipe_dict(root, evaluate={
        "variants": ["teacher"], "latency_samples": 1, "warmup": 0, "batch_sizes": [1], "perplexity": False,
        "system": {"enabled": False},
        "judge": {"base_url": url, "model": "judge-1", "api_key_env": "JUDGE_KEY", "max_retries": 1, **judge}}))


def test_judge_scores_every_answer_through_the_endpoint(built_root, tmp_path, server, monkeypatch):
    from toolkit.pipeline import run_pipeline

    monkeypatch.setenv("JUDGE_KEY", KEY)
    run = fakerun.copy_run(built_root, tmp_path)
    run_pipeline(_recipe(tmp_path, server.url, max_samples=6), only="evaluate")
    (row,) = json.loads((run / "evaluate" / "variants.json").read_text())
    scored = read_jsonl(run / "evaluate" / "outputs" / "teacher.jsonl")[:6]
    expected = sum(10 if s["reference"].lower() in s["output"].lower() else 2 for s in scored) / 6 / 10
    assert row["judge_n"] == 6 and row["judge_score"] == pytest.approx(expected)
    assert len(server.requests) == 6
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {KEY}"
    assert req["body"]["model"] == "judge-1" and req["body"]["temperature"] == 0
    # The key reaches the endpoint and nothing else.
    for path in run.joinpath("evaluate").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".csv", ".jsonl"):
            assert KEY not in path.read_text(), path


def test_judge_rejecting_the_key_is_a_one_line_error(built_root, tmp_path, monkeypatch):
    from toolkit.pipeline import run_pipeline

    monkeypatch.setenv("JUDGE_KEY", KEY)
    bad = JudgeServer(status=401)
    try:
        fakerun.copy_run(built_root, tmp_path)
        with pytest.raises(OptkitError, match=r"evaluate.judge: .* rejected the API key \(HTTP 401"):
            run_pipeline(_recipe(tmp_path, bad.url), only="evaluate")
    finally:
        bad.close()


def test_parse_score():
    assert parse_score("8") == 8 and parse_score("Score: 10/10") == 10 and parse_score(" 3.") == 3
    assert parse_score("no idea") is None and parse_score("") is None and parse_score("42") is None
