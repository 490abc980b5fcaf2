"""`collect.backend: log`: the teacher's live answers, logged by the gateway, train the next student.

The proof runs real processes on 127.0.0.1: a llama.cpp server with the SmolLM2 GGUF (the teacher, behind an API
key), the gateway under uvicorn with its traffic log on (everything routed to the teacher), then `optkit run`
with collect.backend: log on that log and a tiny distill stage. The other tests feed hand-written logs (the
gateway's format and OpenAI-style {request, response} lines) through the same stage: filters, repeats, torn and
bad lines, data-prompt mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.collect.conftest import bitext_rows
from toolkit.cli import main

SYSTEM = "Classify the customer message into a category such as ORDER, REFUND or SHIPPING. Answer briefly."
CLIENT_KEY = "sk-client-live-7e31b0c9d2a4f685"
TRAIN = {"max_steps": 3, "batch_size": 4, "save_steps": 3, "logging_steps": 1, "learning_rate": 2e-3}


def write_recipe(workdir: Path, log_path: Path, teacher: str, collect_log: dict | None = None,
                 distill: dict | None = None, data: dict | None = None, name: str = "t") -> Path:
    recipe = {"name": name, "seed": 0, "tracking": {"enabled": False}, "teacher": {"model": teacher},
              "data": {"path": str(log_path), "splits": {"train": 0.6, "val": 0.2, "test": 0.2}, **(data or {})},
              "collect": {"backend": "log", "generation": {"max_new_tokens": 6}, "log": collect_log or {}}}
    if distill:
        recipe["distill"] = distill
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------ the live loop


def _bundle(root: Path) -> Path:
    """A bundle with no router and no cache.json: every miss goes to serve.yaml's default backend (the teacher)."""
    from toolkit.bundle import FORMAT, MANIFEST
    from toolkit.export.build import file_table

    root.mkdir(parents=True)
    manifest = {"format": FORMAT, "run": "log-test", "models": []}
    manifest["files"] = file_table(root)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


@pytest.mark.slow
@pytest.mark.server
def test_gateway_log_trains_the_next_student(workdir, smollm2_dir, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    import httpx

    from tests.distill.helpers import build_tiny_llama
    from tests.serve.conftest import KEY, KEY_ENV, LlamaServer, _stop, start_gateway
    from toolkit.collect.prompts import load_prompts, split_of
    from toolkit.config import DataConfig
    from toolkit.engines import Renderer
    from toolkit.models import load_tokenizer

    tiny = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "teacher", smollm2_dir, layers=4, hidden=64)
    traffic = workdir / "logs" / "traffic.jsonl"
    cfg = {"model_name": "optkit-test", "request_timeout_s": 120, "default_backend": "teacher",
           "backends": {"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "smollm2-teacher",
                                    "api_key_env": KEY_ENV, "timeout_s": 90, "max_concurrency": 2}},
           "audit": {"sample_rate": 0.0}, "traffic_log": {"enabled": True, "path": str(traffic)}}
    rows = bitext_rows(12)
    teacher = LlamaServer(tmp_path_factory.mktemp("teacher"), "teacher", api_key=KEY)
    gw = None
    try:
        teacher.wait()
        cfg["backends"]["teacher"]["base_url"] = teacher.url
        gw = start_gateway(_bundle(workdir / "bundle"), tmp_path_factory.mktemp("gw"), cfg)
        answers, headers = {}, {"Authorization": f"Bearer {CLIENT_KEY}"}
        with httpx.Client(timeout=120) as client:
            for i, r in enumerate(rows):
                body = {"model": "optkit-test", "temperature": 0, "max_tokens": 12,
                        "messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": r["instruction"]}]}
                if i == 2:  # a field the log must redact
                    body["user"] = "alice@example.com"
                if i == 3:  # streamed: the log assembles the answer from the SSE chunks
                    body["stream"] = True
                resp = gw.post("/v1/chat/completions", body, headers, client=client)
                assert resp.status_code == 200 and resp.headers["x-optkit-route"] == "teacher", \
                    (i, resp.text, teacher.log.read_text()[-1500:])
                if i == 3:
                    from toolkit.serve.protocol import StreamAnswer

                    collected = StreamAnswer("chat")
                    for line in resp.text.splitlines():
                        collected.feed(line)
                    answer = collected.answer()
                else:
                    choice = resp.json()["choices"][0]
                    answer = {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"]}
                answers[r["instruction"]] = answer
            # a repeat is an exact-cache hit: logged, but not a teacher answer, so not imported by default
            again = gw.post("/v1/chat/completions", body, headers, client=client)
            assert again.headers["x-optkit-route"] == "exact-cache"
    finally:
        if gw is not None:
            _stop(gw.proc)  # SIGTERM: the gateway's shutdown flushes the log
        _stop(teacher.proc)

    logged = read_jsonl(traffic)
    assert len(logged) == len(rows) + 1 and [e["route"] for e in logged].count("exact-cache") == 1
    raw = traffic.read_text()
    for secret in (KEY, CLIENT_KEY, "alice@example.com"):
        assert secret not in raw
    assert all(e["tenant"].startswith("k:") for e in logged) and logged[3]["stream"] is True

    distill = {"student": {"from_teacher": {"num_layers": 2, "score_batches": 1}}, "method": "lora",
               "lora": {"dropout": 0.0}, "training": TRAIN}
    path = write_recipe(workdir, traffic, str(tiny), {"paths": [str(traffic.parent / "traffic*.jsonl")],
                                                      "finish_reasons": ["stop", "length"]}, distill)
    assert main(["run", str(path)]) == 0
    out = workdir / "artifacts" / "t" / "collect"
    records = read_jsonl(out / "outputs.jsonl")
    # every teacher answer the gateway gave, once, equal to what the client received
    assert sorted(r["prompt"] for r in records) == sorted(answers)
    for r in records:
        sent = answers[r["prompt"]]
        assert r["output"] == sent["text"] and r["finish_reason"] == sent["finish_reason"]
        assert r["model"] == "smollm2-teacher" and r["output_tokens"] >= 1 and r["input_tokens"] > 20
    summary = json.loads((out / "summary.json").read_text())
    assert summary["log"]["imported"] == len(rows) and summary["log"]["skipped"] == {"route_exact-cache": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["log"]["skipped"] == {"route_exact-cache": 1}

    # the same prompts collected from a data file get the same ids, splits, messages and token ids
    data_file = workdir / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"text": r["instruction"]}) + "\n" for r in rows))
    prompts = load_prompts(DataConfig(path=str(data_file), prompt_column="text", system_prompt=SYSTEM),
                           data_file, 0)
    by_id = {r["id"]: r for r in records}
    assert set(by_id) == {p.id for p in prompts}
    renderer = Renderer(load_tokenizer(str(tiny)), True)
    for p in prompts:
        rec = by_id[p.id]
        assert rec["messages"] == p.messages and rec["split"] == split_of(p.id, 0, 0.6, 0.2)
        assert renderer.prompt(rec["messages"]).ids == renderer.prompt(p.messages).ids

    # distill trained the student on them
    d = workdir / "artifacts" / "t" / "distill"
    student = json.loads((d / "student.json").read_text())
    assert student["training"]["global_step"] == TRAIN["max_steps"]
    assert student["training"]["data"]["examples"] == sum(r["split"] == "train" for r in records)
    assert json.loads((d / "manifest.json").read_text())["status"] == "done"
    for f in (workdir / "artifacts").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml", ".txt", ".log"):
            text = f.read_text(errors="replace")
            assert KEY not in text and CLIENT_KEY not in text, f


# ------------------------------------------------------------------------------------ hand-written logs


def optkit_line(prompt: str, answer: str, route: str = "teacher", finish: str = "stop", time: str = "2026-01-01",
                **extra) -> dict:
    return {"format": "optkit-traffic/1", "id": "x", "time": time, "tenant": "anonymous", "kind": "chat",
            "model": "optkit", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            "params": {"temperature": 0}, "stream": False, "route": route, "decision": route,
            "served_model": "big", "answer": answer, "finish_reason": finish,
            "usage": {"prompt_tokens": 40, "completion_tokens": 2}, "latency_s": 0.5, "backend_latency_s": 0.4,
            **extra}


def openai_line(prompt: str, answer: str, finish: str = "stop") -> dict:
    return {"request": {"model": "gpt-x", "temperature": 0,
                        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]},
            "response": {"id": "c", "object": "chat.completion", "model": "gpt-x-2025",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                      "finish_reason": finish}]}}


def write_log(path: Path, entries: list, tail: str = "") -> Path:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries) + tail)
    return path


def restart_gateway_log(path: Path, prompt: str, answer: str) -> None:
    """What a restarted gateway does to its log: the real TrafficLog writer appends one teacher reply."""
    import time

    from starlette.responses import JSONResponse

    from toolkit.config.serve import ServeConfig
    from toolkit.serve.traffic_log import TrafficLog

    cfg = ServeConfig.model_validate({"backends": {"teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "big"}},
                                      "default_backend": "teacher",
                                      "traffic_log": {"enabled": True, "path": str(path)}})
    writer = TrafficLog(cfg.traffic_log, cfg)
    writer.start()
    reply = {"id": "r", "model": "big", "choices": [{"index": 0, "finish_reason": "stop",
                                                     "message": {"role": "assistant", "content": answer}}]}
    body = {"model": "optkit", "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]}
    writer.observe("chat", body, {}, JSONResponse(reply, headers={"x-optkit-route": "teacher"}), time.perf_counter())
    writer.close()


def test_filters_repeats_formats_and_a_torn_last_line(workdir, smollm2_dir):
    log = write_log(workdir / "mixed.jsonl", [
        optkit_line("where is my order", "ORDER"),
        optkit_line("where is my order", "ORDER (older)", time="2025-12-31"),  # a repeat: the newest wins
        optkit_line([{"type": "text", "text": "where is my order"}], "ORDER (oldest)", time="2025-12-30"),  # same
        optkit_line([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "A picture"),
        optkit_line("refund please", "REFUND", route="student"),
        optkit_line("cancel it", "CANCEL", route="semantic-cache"),
        optkit_line("change address", "SHIPP", finish="length"),
        openai_line("my invoice is wrong", "INVOICE"),
        {"request": {"messages": [{"role": "user", "content": "x"}]}, "response": {"error": {"message": "429"}}},
    ], tail=json.dumps(optkit_line("torn", "T"))[:50])
    assert main(["run", str(write_recipe(workdir, log, str(smollm2_dir)))]) == 0
    out = workdir / "artifacts" / "t" / "collect"
    records = {r["prompt"]: r for r in read_jsonl(out / "outputs.jsonl")}
    assert {p: r["output"] for p, r in records.items()} == {"where is my order": "ORDER",
                                                            "my invoice is wrong": "INVOICE"}
    assert records["my invoice is wrong"]["model"] == "gpt-x-2025"
    assert records["where is my order"]["input_tokens"] == 40  # the log's usage
    assert records["my invoice is wrong"]["input_tokens"] > 20  # none logged: counted with the tokenizer
    summary = json.loads((out / "summary.json").read_text())["log"]
    assert summary["skipped"] == {"route_student": 1, "route_semantic-cache": 1, "finish_length": 1,
                                  "error_response": 1, "torn_last_line": 1, "non_text_content": 1}
    assert summary["merged_repeats"] == 2 and summary["lines"] == 10 and summary["merged_by"] == "rendered_prompt"

    # the log is an input: unchanged -> skipped; a new line -> imported again
    from toolkit.config import load_recipe
    from toolkit.pipeline import run_pipeline

    recipe = load_recipe(workdir / "t.yaml")
    assert [o.status for o in run_pipeline(recipe)] == ["skipped"]
    restart_gateway_log(log, "track my parcel", "SHIPPING")  # cuts the torn tail, appends a whole line
    assert [o.status for o in run_pipeline(recipe)] == ["ran"]
    assert len(read_jsonl(out / "outputs.jsonl")) == 3

    # also the student's answers and cut ones, when asked
    path = write_recipe(workdir, log, str(smollm2_dir), {"routes": ["teacher", "student"],
                                                         "finish_reasons": ["stop", "length"]}, name="u")
    assert main(["run", str(path)]) == 0
    records = read_jsonl(workdir / "artifacts" / "u" / "collect" / "outputs.jsonl")
    assert len(records) == 5  # + the student answer and the cut one


def test_a_bad_line_names_file_and_line_unless_skipped(workdir, smollm2_dir, capsys):
    log = write_log(workdir / "bad.jsonl", [optkit_line("a", "A"), '{"format": "optkit-traffic/1", "kind": 3}',
                                           optkit_line("b", "B"), '{"x": NaN}'])
    capsys.readouterr()
    assert main(["run", str(write_recipe(workdir, log, str(smollm2_dir)))]) != 0
    err = capsys.readouterr().err.strip()
    assert f"{log}:2: not a traffic-log entry" in err and len(err.splitlines()) == 1
    path = write_recipe(workdir, log, str(smollm2_dir), {"bad_lines": "skip"}, name="s")
    assert main(["run", str(path)]) == 0
    summary = json.loads((workdir / "artifacts" / "s" / "collect" / "summary.json").read_text())["log"]
    assert summary["skipped"] == {"bad_line": 2} and summary["imported"] == 2  # NaN is not JSON


def test_data_prompts_answered_from_the_log(workdir, smollm2_dir):
    log = write_log(workdir / "proxy.jsonl", [openai_line("where is my order", "ORDER"),
                                             openai_line("refund please", "REFUND")])
    data = workdir / "data.jsonl"
    data.write_text("".join(json.dumps({"q": q, "label": lab}) + "\n" for q, lab in
                            [("where is my order", "ORDER"), ("refund please", "REFUND"), ("new one", "X")]))
    path = write_recipe(workdir, data, str(smollm2_dir), {"paths": [str(log)], "prompts": "data"},
                        data={"prompt_column": "q", "reference_column": "label", "system_prompt": SYSTEM})
    assert main(["run", str(path)]) == 0
    out = workdir / "artifacts" / "t" / "collect"
    records = read_jsonl(out / "outputs.jsonl")
    assert {(r["prompt"], r["output"], r["reference"]) for r in records} == {
        ("where is my order", "ORDER", "ORDER"), ("refund please", "REFUND", "REFUND")}
    assert [f["error"] for f in read_jsonl(out / "failures.jsonl")] == ["not_in_log"]


def test_log_backend_refuses_top_logprobs():
    from toolkit.config import CollectConfig

    with pytest.raises(ValueError, match="log-probs"):
        CollectConfig.model_validate({"backend": "log", "top_logprobs": 2})
