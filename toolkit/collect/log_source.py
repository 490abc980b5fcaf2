"""`collect.backend: log`: teacher records from answers the teacher already gave — the gateway's traffic log
(toolkit/serve/traffic_log.py, format optkit-traffic/1) or any OpenAI-style {request, response} JSONL (what
OpenAI-compatible proxies write). No model is called and nothing is paid again.

Which answers count (collect.log): the routes (teacher only by default; the gateway's route header), the served
models, complete answers only (finish_reason stop by default), a temperature ceiling. The messages are the ones
the teacher saw (system prompt included), so a record renders to the same token ids as a collected one. Repeats
are merged by rendered prompt (the teacher's tokenizer and data.chat_template; the newest answer wins). Prompts:
`log` = every eligible logged request (id = hash of its messages, as data prompts without an id column, split by
hash of id and seed), `data` = only data.path's prompts, answered from the log.

Bad lines: `bad_lines: error` (default) stops with one line naming file and line; `skip` counts them. A torn last
line (a writer killed mid-line) is always skipped and counted. JSON is strict (no NaN / Infinity). Every skip has
a reason, counted in summary.json and the manifest.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from toolkit.errors import OptkitError
from toolkit.io import strings_without_surrogates

log = logging.getLogger("optkit.collect")


@dataclass
class Entry:
    kind: str  # chat | completions
    messages: list  # normalized [{"role", "content": str}] (completions: one user message)
    answer: str
    finish_reason: str
    route: Optional[str]
    model: Optional[str]
    temperature: float
    usage: dict
    latency_s: Optional[float]
    time: str


class BadLine(ValueError):
    pass


class Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def log_paths(recipe) -> list[Path]:
    patterns = recipe.collect.log.paths or [recipe.data.path]
    out: list[Path] = []
    for pattern in patterns:
        path = recipe.resolve_path(pattern)
        matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)] * path.exists()
        if not matches:
            raise OptkitError(f"collect.log.paths: no file matches {path}")
        out += [Path(m) for m in matches if Path(m) not in out]
    return out


def read_log(paths: list[Path], fmt: str, bad_lines: str, counts: dict) -> list[tuple[Entry, int]]:
    """Every parsed entry with its order; skips counted in counts['skipped'][reason]."""
    entries, order = [], 0
    for path in paths:
        data = path.read_bytes()
        lines = data.split(b"\n")
        torn_tail = not data.endswith(b"\n") and bool(data)
        for no, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            counts["lines"] += 1
            try:
                obj = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
                if b"\\u" in raw:  # only an escape makes a lone surrogate, which no file can hold
                    obj = strings_without_surrogates(obj)
                entries.append((parse(obj, fmt), order))
                order += 1
            except Skip as skip:
                _skip(counts, skip.reason)
            except (ValueError, UnicodeDecodeError) as exc:  # BadLine, JSONDecodeError
                if torn_tail and no == len(lines):
                    _skip(counts, "torn_last_line")
                elif bad_lines == "skip":
                    _skip(counts, "bad_line")
                else:
                    raise OptkitError(f"{path}:{no}: not a traffic-log entry ({str(exc)[:200]}); fix the line or "
                                      "set collect.log.bad_lines: skip") from None
    return entries


def _skip(counts: dict, reason: str) -> None:
    counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1


def parse(obj, fmt: str) -> Entry:
    if not isinstance(obj, dict):
        raise BadLine("a line must be a JSON object")
    optkit = str(obj.get("format", "")).startswith("optkit-traffic/")
    if fmt == "optkit" or (fmt == "auto" and optkit):
        if not optkit:
            raise BadLine("no format: optkit-traffic/1 field")
        return _optkit(obj)
    if "request" in obj and "response" in obj:
        return _openai(obj)
    raise BadLine("neither an optkit-traffic line nor a {request, response} pair")


def _optkit(obj: dict) -> Entry:
    kind = obj.get("kind")
    if kind not in ("chat", "completions") or not isinstance(obj.get("answer"), str):
        raise BadLine("kind must be chat or completions and answer a string")
    messages = _messages(obj.get("messages")) if kind == "chat" else _prompt(obj.get("prompt"))
    params = obj.get("params") if isinstance(obj.get("params"), dict) else {}
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
    return Entry(kind, messages, obj["answer"], str(obj.get("finish_reason")), obj.get("route"),
                 obj.get("served_model") or obj.get("reply_model"), _temperature(params), usage,
                 _latency(obj.get("backend_latency_s") or obj.get("latency_s")), str(obj.get("time") or ""))


def _openai(obj: dict) -> Entry:
    req, resp = obj["request"], obj["response"]
    if isinstance(resp, dict) and isinstance(resp.get("body"), dict) and "status_code" in resp:
        resp = resp["body"]  # the Batch API's {status_code, body} wrapper
    if not isinstance(req, dict) or not isinstance(resp, dict):
        raise BadLine("request and response must be JSON objects")
    if "error" in resp and not resp.get("choices"):
        raise Skip("error_response")
    choices = resp.get("choices")
    if not isinstance(choices, list) or not choices:
        raise BadLine("response has no choices")
    if len(choices) != 1:
        raise Skip("several_choices")
    c = choices[0]
    if "messages" in req:
        kind, messages = "chat", _messages(req["messages"])
        msg = c.get("message") or {}
        if msg.get("tool_calls") or msg.get("function_call"):
            raise Skip("tool_calls")
        text = msg.get("content")
    elif "prompt" in req:
        kind, messages, text = "completions", _prompt(req["prompt"]), c.get("text")
    else:
        raise BadLine("request has neither messages nor prompt")
    if not isinstance(text, str):
        raise Skip("no_text_answer")
    usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
    latency = obj.get("latency_s", obj.get("response_time"))
    return Entry(kind, messages, text, str(c.get("finish_reason")), None, resp.get("model") or req.get("model"),
                 _temperature(req), usage, _latency(latency),
                 str(obj.get("time") or resp.get("created") or ""))


def _temperature(params: dict) -> float:
    t = params.get("temperature")
    if t is None:
        return 1.0
    try:
        value = None if isinstance(t, bool) else float(t)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or value < 0:
        raise BadLine(f"temperature must be a number >= 0, got {str(t)[:40]!r}")
    return value


def _latency(value) -> Optional[float]:
    """A logged latency when it is a finite number >= 0; anything else (a string, NaN, a dict) is unknown."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _prompt(prompt) -> list:
    if not isinstance(prompt, str):
        raise Skip("batched_prompt") if isinstance(prompt, list) else BadLine("prompt must be a string")
    return [{"role": "user", "content": prompt}]


def _messages(messages) -> list:
    """The messages as the records hold them ({role, content: str}); text parts joined as the gateway does."""
    if not isinstance(messages, list) or not messages:
        raise BadLine("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadLine("each message must be an object with a role")
        if m["role"] in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise Skip("tool_calls")
        content = m.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise Skip("non_text_content")
            content = "\n".join(p.get("text") or "" for p in content)
        if not isinstance(content, str):
            raise BadLine("message content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def ineligible(e: Entry, cfg, chat_template: bool) -> Optional[str]:
    if e.route is not None and e.route not in cfg.routes:
        return f"route_{e.route}"
    if cfg.models is not None and e.model not in cfg.models:
        return "model"
    if e.finish_reason not in cfg.finish_reasons:
        return f"finish_{e.finish_reason}"
    if cfg.max_temperature is not None and e.temperature > cfg.max_temperature:
        return "temperature"
    if e.kind == "completions" and chat_template:
        return "completions_api"  # a raw prompt is not what the chat template would render
    if not e.answer.strip():
        return "empty_answer"
    return None


def _renderer(recipe):
    """The teacher's renderer (dedupe and token counts), or None for a teacher without a local tokenizer."""
    from toolkit.engines import Renderer
    from toolkit.models import load_tokenizer

    try:
        return Renderer(load_tokenizer(recipe.teacher.model, recipe.teacher.revision), recipe.data.chat_template,
                        recipe.teacher.model)
    except Exception as exc:  # an API teacher (gpt-4o): no tokenizer here
        log.info("collect: log backend: no tokenizer for %s (%s); merging repeats by their messages",
                 recipe.teacher.model, type(exc).__name__)
        return None


def run(ctx) -> dict:
    from toolkit.collect import (FAILURES, OUTPUTS, PROMPTS, SUMMARY, check_failures, headline, make_record,
                                 summarize)
    from toolkit.collect.prompts import Prompt, load_prompts, messages_id, split_of, unit_hash
    from toolkit.io import atomic_write_json, write_jsonl

    recipe, cfg = ctx.recipe, ctx.config
    lcfg, data = cfg.log, recipe.data
    started = time.perf_counter()
    paths = log_paths(recipe)
    for p in paths:
        ctx.add_input(p)
    counts = {"files": len(paths), "lines": 0, "eligible": 0, "merged_repeats": 0, "skipped": {}}
    renderer = _renderer(recipe)

    def render_key(messages: list) -> str:
        if renderer is not None:
            return renderer.text(messages)
        return json.dumps([data.chat_template, messages], sort_keys=True, ensure_ascii=False)

    answers: dict[str, tuple] = {}  # rendered prompt -> (entry, order): the newest eligible answer
    for entry, order in read_log(paths, lcfg.format, lcfg.bad_lines, counts):
        reason = ineligible(entry, lcfg, data.chat_template)
        if reason:
            _skip(counts, reason)
            continue
        counts["eligible"] += 1
        key = render_key(entry.messages)
        if key in answers:
            counts["merged_repeats"] += 1
            if (entry.time, order) < (answers[key][0].time, answers[key][1]):
                continue
        answers[key] = (entry, order)

    if lcfg.prompts == "data":
        data_path = recipe.resolve_path(data.path)
        ctx.add_input(data_path)
        prompts = load_prompts(data, data_path, recipe.seed)
    else:
        prompts = []
        for entry, _ in sorted(answers.values(), key=lambda eo: eo[1]):
            pid = messages_id(entry.messages)
            users = [m["content"] for m in entry.messages if m["role"] == "user"]
            prompts.append(Prompt(pid, split_of(pid, recipe.seed, data.splits.train, data.splits.val),
                                  entry.messages, users[-1] if users else entry.messages[-1]["content"], None))
        if data.limit is not None and len(prompts) > data.limit:
            keep = set(sorted(range(len(prompts)), key=lambda j: unit_hash(recipe.seed, "sample", prompts[j].id))
                       [:data.limit])
            prompts = [p for j, p in enumerate(prompts) if j in keep]
    write_jsonl(ctx.dir / PROMPTS, (p.to_dict() for p in prompts))
    selected = [p for p in prompts if p.split in cfg.splits]
    records, failures, estimated = [], [], 0
    for p in selected:
        hit = answers.get(render_key(p.messages))
        if hit is None:
            failures.append({"id": p.id, "split": p.split, "prompt": p.prompt, "error": "not_in_log", "attempts": 0})
            continue
        result, est = _result(hit[0], p.messages, renderer)
        estimated += est
        records.append(make_record(p, result, hit[0].model or recipe.teacher.model))
    if not records:
        raise OptkitError(f"collect: the log ({', '.join(str(p) for p in paths)}) holds no eligible answer for "
                          f"the selected prompts; lines {counts['lines']}, skipped {counts['skipped']} "
                          "(see collect.log: routes, models, finish_reasons)")
    write_jsonl(ctx.dir / OUTPUTS, records)
    write_jsonl(ctx.dir / FAILURES, failures)
    counts.update(imported=len(records), not_in_log=len(failures), tokens_counted_here=estimated,
                  merged_by="rendered_prompt" if renderer is not None else "messages")
    summary = summarize(records, failures, [], time.perf_counter() - started, len(prompts), {})
    summary.update(teacher={"backend": "log", "files": [str(p) for p in paths]}, log=counts,
                   context={"policy": cfg.context, "checked": False}, resent_after_interrupt=0)
    atomic_write_json(ctx.dir / SUMMARY, summary)
    ctx.extra["teacher"] = summary["teacher"]
    ctx.extra["log"] = counts
    metrics = headline(summary)
    metrics.update(imported=len(records), skipped=sum(counts["skipped"].values()), not_in_log=len(failures))
    ctx.log_metrics(metrics)
    ctx.log_artifact(ctx.dir / SUMMARY)
    log.info("collect: imported %d teacher answers from %d log file(s): %d lines, %d repeats merged, skipped %s%s",
             len(records), len(paths), counts["lines"], counts["merged_repeats"], counts["skipped"] or "none",
             f", {len(failures)} data prompts not in the log" if failures else "")
    check_failures(0, len(selected), cfg.max_failures, failures)
    return metrics


def _result(e: Entry, messages: list, renderer) -> tuple[dict, int]:
    """The engines' result dict for a logged answer; token counts from the log's usage, else counted with the
    teacher's tokenizer (cache hits and most streams carry none), else estimated (4 characters a token)."""
    n_in, n_out = e.usage.get("prompt_tokens"), e.usage.get("completion_tokens")
    counted = 0
    if not (isinstance(n_in, int) and n_in > 0 and isinstance(n_out, int)):
        counted = 1
        if renderer is not None:
            n_in, n_out = len(renderer.prompt(messages).ids), len(renderer.encode_text(e.answer))
        else:
            n_in = sum(len(m["content"]) for m in messages) // 4 + 1
            n_out = len(e.answer) // 4 + 1
    result = {"output": e.answer, "finish_reason": e.finish_reason, "input_tokens": n_in,
              "output_tokens": n_out, "latency_s": float(e.latency_s or 0.0)}
    if counted and renderer is None:
        result["tokens_estimated"] = True
    return result, counted
