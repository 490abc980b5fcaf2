"""Text a user's files and a teacher's replies really contain: half an emoji (a lone UTF-16 surrogate from a JSON
escape), a byte-order mark, a server that reports no token usage, odd values in a traffic log."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.collect.conftest import read_jsonl
from toolkit.io import read_table

HALF_EMOJI = '{"choices": [{"message": {"role": "assistant", "content": "thanks \\ud83d"}, "finish_reason": "stop"}]}'


def serve(body: str, status: int = 200):
    """A loopback OpenAI-style server answering every request with this JSON body; returns (base_url, server)."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", server


@pytest.fixture
def no_usage_server():
    """Replies that end in half an emoji and carry no usage block."""
    url, server = serve(HALF_EMOJI)
    yield url
    server.shutdown()
    server.server_close()


def collect_recipe(workdir, base_url: str, data_lines: str, **openai):
    import yaml

    data = workdir / "prompts.jsonl"
    data.write_text(data_lines)
    recipe = {"name": "t", "teacher": {"model": "smollm2-135m-instruct"}, "tracking": {"enabled": False},
              "data": {"path": str(data), "id_column": "id"},
              "collect": {"backend": "openai", "generation": {"max_new_tokens": 8},
                          "openai": {"base_url": base_url, "model": "m", "max_retries": 0, **openai}}}
    path = workdir / "t.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_half_an_emoji_in_a_prompt_or_a_reply_is_replaced_not_fatal(workdir, no_usage_server):
    """A lone surrogate cannot be written as UTF-8: the result store raised on the reply, every re-run got the
    same reply and crashed again; one in a data row stopped validate and run with a traceback. And a reply
    without usage recorded 0 input tokens (the larger part of a bill)."""
    from toolkit.cli import main

    path = collect_recipe(workdir, no_usage_server,
                          '{"id": "a", "prompt": "my order \\ud83d is late"}\n{"id": "b", "prompt": "refund please"}\n')
    assert main(["validate", str(path)]) == 0
    assert main(["run", str(path)]) == 0
    records = {r["id"]: r for r in read_jsonl(workdir / "artifacts" / "t" / "collect" / "outputs.jsonl")}
    assert records["a"]["prompt"] == "my order \ufffd is late" and records["a"]["output"] == "thanks \ufffd"
    assert all(r["tokens_estimated"] and r["input_tokens"] >= 3 for r in records.values())


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the header read '\\ufeffprompt' and the error said 'prompt' was
    missing while listing it."""
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffprompt,label\nwhere is my parcel,DELIVERY\n".encode())
    assert read_table(path) == [{"prompt": "where is my parcel", "label": "DELIVERY"}]
    jsonl = tmp_path / "notepad.jsonl"
    jsonl.write_bytes('\ufeff{"prompt": "hi"}\n'.encode())
    assert read_table(jsonl) == [{"prompt": "hi"}]


@pytest.mark.parametrize("latency, kept", [("NaN", None), ("fast", None), ({"ms": 12}, None), (float("inf"), None),
                                           (-1, None), (0.25, 0.25), (True, None)])
def test_a_traffic_logs_latency_is_a_finite_number_or_unknown(latency, kept):
    from toolkit.collect.log_source import parse

    line = {"format": "optkit-traffic/1", "kind": "chat", "messages": [{"role": "user", "content": "hi"}],
            "answer": "hello", "latency_s": latency}
    assert parse(json.loads(json.dumps(line, allow_nan=True)), "auto").latency_s == kept


def test_a_traffic_logs_odd_temperature_is_a_bad_line_not_a_traceback():
    from toolkit.collect.log_source import BadLine, parse

    line = {"format": "optkit-traffic/1", "kind": "chat", "messages": [{"role": "user", "content": "hi"}],
            "answer": "hello", "params": {"temperature": [1]}}
    with pytest.raises(BadLine, match="temperature must be a number"):
        parse(line, "auto")


@pytest.mark.parametrize("body, failure", [
    ('{"choices": [{"message": {"role": "assistant", "content": null}, "finish_reason": "content_filter"}]}',
     "no text in the reply (finish_reason 'content_filter')"),
    ('{"choices": [{"message": {"role": "assistant", "content": "ok"}}], "usage": [1, 2]}', None)])
def test_a_reply_with_no_text_fails_that_prompt_and_odd_usage_is_ignored(workdir, body, failure):
    """content: null (a content filter, tool calls) was stored as a successful empty answer; a usage block that
    is not an object raised AttributeError and killed the whole concurrent run."""
    from toolkit.cli import main

    url, server = serve(body)
    try:
        path = collect_recipe(workdir, url, '{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "hello"}\n')
        assert main(["run", str(path)]) == (2 if failure else 0)  # failure: none of the prompts was answered
    finally:
        server.shutdown()
        server.server_close()
    out = workdir / "artifacts" / "t" / "collect"
    if failure:
        assert read_jsonl(out / "outputs.jsonl") == []
        assert {f["error"] for f in read_jsonl(out / "failures.jsonl")} == {failure}
    else:
        assert [r["output"] for r in read_jsonl(out / "outputs.jsonl")] == ["ok", "ok"]


def test_an_account_out_of_quota_stops_the_run_at_once(workdir, capsys):
    """OpenAI answers 429 insufficient_quota for an unpaid account: it was retried like a rate limit, every prompt
    spending all its retries and backoff on a bill."""
    from toolkit.cli import main

    quota = ('{"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", '
             '"code": "insufficient_quota"}}')
    url, server = serve(quota, status=429)
    try:
        path = collect_recipe(workdir, url, "".join(f'{{"id": "{i}", "prompt": "q{i}"}}\n' for i in range(20)),
                              max_retries=5, backoff_base_s=1.0)
        assert main(["run", str(path)]) == 2
    finally:
        server.shutdown()
        server.server_close()
    assert "refused for billing (HTTP 429" in capsys.readouterr().err
