"""The traffic log's writer on its own (no server): what one line holds, redaction, streams, rotation, a full
queue, and that the importer reads what it writes. The live path (gateway + llama.cpp teacher -> collect ->
distill) is tests/collect/test_log_backend.py."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.responses import JSONResponse, StreamingResponse

from toolkit.config.serve import ServeConfig
from toolkit.runtime import register_secret
from toolkit.serve import protocol as P
from toolkit.serve.traffic_log import TrafficLog

SECRET = "sk-test-traffic-9c1e5d7f3a2b"
HEADERS = {"authorization": f"Bearer {SECRET}"}


def config(tmp_path, **log) -> ServeConfig:
    return ServeConfig.model_validate({
        "backends": {"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "big-teacher"}},
        "default_backend": "teacher",
        "traffic_log": {"enabled": True, "path": str(tmp_path / "traffic.jsonl"), **log}})


def reply(text: str, finish: str = "stop") -> JSONResponse:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "big-teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}
    return JSONResponse(body, headers={"x-optkit-route": "teacher", "x-optkit-decision": "teacher",
                                       "x-optkit-backend-latency-ms": "12.5"})


def request(text: str, **extra) -> dict:
    return {"model": "optkit", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": text}], "temperature": 0, **extra}


def lines(tmp_path, name="traffic.jsonl") -> list[dict]:
    return [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]


def test_a_reply_becomes_one_redacted_line(tmp_path):
    register_secret(SECRET)
    cfg = config(tmp_path)
    tl = TrafficLog(cfg.traffic_log, cfg)
    tl.start()
    body = request(f"my key is {SECRET} and sk-abcdefghijklmnopqrstuvwx, mail me", user="alice@example.com",
                   metadata={"team": "x"}, max_tokens=8)
    tl.observe("chat", body, HEADERS, reply("Sure."), time.perf_counter())
    tl.observe("chat", request("cut"), HEADERS, reply("Half", "length"), time.perf_counter())
    tl.observe("chat", request("err"), HEADERS, JSONResponse({"error": {}}, status_code=400), time.perf_counter())
    tl.close()
    out = lines(tmp_path)
    assert len(out) == 2 and tl.counts["written"] == 2  # the 400 is not logged
    first = out[0]
    assert first["format"] == "optkit-traffic/1" and first["route"] == "teacher"
    assert first["served_model"] == "big-teacher" and first["answer"] == "Sure." and first["finish_reason"] == "stop"
    assert first["usage"] == {"prompt_tokens": 11, "completion_tokens": 3} and first["backend_latency_s"] == 0.0125
    assert first["params"] == {"temperature": 0, "user": "***", "metadata": "***", "max_tokens": 8}
    assert first["messages"][1]["content"] == "my key is *** and ***, mail me"
    assert first["tenant"].startswith("k:") and first["stream"] is False
    raw = (tmp_path / "traffic.jsonl").read_text()
    assert SECRET not in raw and "alice@example.com" not in raw and "Bearer" not in raw
    assert out[1]["finish_reason"] == "length"


def test_a_stream_is_logged_only_when_it_completed(tmp_path):
    cfg = config(tmp_path)
    tl = TrafficLog(cfg.traffic_log, cfg)
    tl.start()

    async def consume(resp):
        return [c async for c in resp.body_iterator]

    answer = {"text": "Paris is the capital.", "finish_reason": "stop"}
    full = StreamingResponse(iter(P.cached_chunks("chat", answer, "optkit")), headers={"x-optkit-route": "teacher"})
    cut = StreamingResponse(iter(P.cached_chunks("chat", answer, "optkit")[:2]), headers={"x-optkit-route": "teacher"})
    for resp in (full, cut):
        resp = tl.observe("chat", request("capital of France?", stream=True), {}, resp, time.perf_counter())
        chunks = asyncio.run(consume(resp))
        assert b"".join(chunks).count(b"data:") >= 2  # the client gets the bytes unchanged
    tl.close()
    out = lines(tmp_path)
    assert len(out) == 1 and out[0]["answer"] == answer["text"] and out[0]["stream"] is True
    assert out[0]["tenant"] == "anonymous" and tl.counts["no_answer"] == 1


def test_rotation_keeps_whole_lines_and_the_importer_reads_them_in_order(tmp_path):
    from toolkit.collect.log_source import read_log

    cfg = config(tmp_path, rotate_bytes=2048, keep_files=3)
    tl = TrafficLog(cfg.traffic_log, cfg)
    tl.start()
    for i in range(40):
        tl.observe("chat", request(f"question number {i}"), {}, reply(f"answer {i}"), time.perf_counter())
    tl.close()
    files = sorted(tmp_path.glob("traffic*.jsonl"))
    assert len(files) == 4 and files[-1].name == "traffic.jsonl"  # three rotated (the oldest deleted) + live
    assert all(f.stat().st_size <= 2048 for f in files) and tl.counts["rotated"] > 3
    counts = {"lines": 0, "skipped": {}}
    entries = read_log(files, "auto", "error", counts)
    numbers = [int(e.answer.split()[-1]) for e, _ in entries]
    assert numbers == list(range(numbers[0], 40)) and numbers[0] > 0  # in order, the newest kept, none torn
    assert counts["skipped"] == {}


def test_a_full_queue_drops_lines_and_never_blocks(tmp_path):
    cfg = config(tmp_path, queue_size=1)
    tl = TrafficLog(cfg.traffic_log, cfg)
    write = tl.entry

    def slow_entry(item):  # a slow disk: the writer falls behind the requests
        time.sleep(0.05)
        return write(item)

    tl.entry = slow_entry
    tl.start()
    started = time.perf_counter()
    for i in range(200):
        tl.observe("chat", request(f"q{i}"), {}, reply("a"), time.perf_counter())
    assert time.perf_counter() - started < 1.0
    tl.close()
    assert tl.counts["dropped"] > 0
    assert tl.counts["written"] + tl.counts["dropped"] == 200


def test_disabled_is_a_no_op(tmp_path):
    cfg = ServeConfig.model_validate({"backends": {"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}},
                                      "default_backend": "teacher",
                                      "traffic_log": {"path": str(tmp_path / "t.jsonl")}})
    tl = TrafficLog(cfg.traffic_log, cfg)
    tl.start()
    resp = reply("x")
    assert tl.observe("chat", request("q"), {}, resp, 0.0) is resp
    tl.close()
    assert not (tmp_path / "t.jsonl").exists()


def test_bad_redact_pattern_is_a_config_error():
    with pytest.raises(ValueError, match="redact_patterns"):
        ServeConfig.model_validate({"backends": {"t": {"base_url": "http://x/v1", "model": "m"}},
                                    "default_backend": "t", "traffic_log": {"redact_patterns": ["("]}})
