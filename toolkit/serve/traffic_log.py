"""The gateway's traffic log (opt-in, serve.yaml `traffic_log:`): one JSONL line per completed request, in the
format `collect.backend: log` imports as teacher records (toolkit/collect/log_source.py), so the teacher's live
answers train the next student without being paid for twice.

A line (format optkit-traffic/1):

    {"format": "optkit-traffic/1", "id": "chatcmpl-…", "time": "2026-11-30T05:46:13.123456Z",
     "tenant": "k:<sha256 of the API key, 16 hex>" | "h:<tenant header>" | "anonymous",
     "kind": "chat" | "completions", "model": <model the client asked for>,
     "messages": [...] (chat) | "prompt": "..." (completions), "params": {temperature, max_tokens, ...},
     "stream": bool, "route": "teacher" | "student" | "exact-cache" | "semantic-cache" | <backend>,
     "decision": <what the decision path chose>, "served_model": <backend model name, null for cache hits>,
     "reply_model": <the reply's model field>, "answer": "...", "finish_reason": "stop" | "length",
     "usage": {"prompt_tokens", "completion_tokens"} | null, "latency_s": float, "backend_latency_s": float | null}

Secrets never reach the file: no header is logged (the tenant is the gateway's hash of the key), the backends'
API keys and URL credentials are masked in every string (toolkit.runtime.redact), `redact_fields` are written as
*** wherever they occur in the request, `redact_patterns` are masked in prompts and answers.

Cost on the request path: the hook keeps references (the reply's bytes, or the stream's chunks as they pass) and
puts them on a bounded queue; a writer thread parses, redacts and appends. A full queue drops the line (counted
on /metrics), never delays the reply. Each line is one write() on an O_APPEND file, so a crash can tear at most
the last line (the importer skips it, counted; the next writer cuts it before appending). Size-based rotation renames the file to <stem>.<UTC time>Z<suffix>,
which sorts before the live file: a glob such as `traffic*.jsonl` reads everything in order.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from toolkit.runtime import redact

log = logging.getLogger("optkit.serve")
FORMAT = "optkit-traffic/1"
MASK = "***"
NOT_PARAMS = {"model", "messages", "prompt", "stream", "stream_options"}
_STOP = object()


def rotated_name(path: Path, when: Optional[datetime] = None) -> Path:
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%f")
    return path.with_name(f"{path.stem}.{stamp}Z{path.suffix}")


def _mask_fields(obj: Any, fields: frozenset) -> Any:
    if isinstance(obj, dict):
        return {k: (MASK if k in fields else _mask_fields(v, fields)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mask_fields(v, fields) for v in obj]
    return obj


class TrafficLog:
    """`observe(...)` from the request handler; a daemon thread writes. Disabled = a no-op."""

    def __init__(self, cfg, serve_cfg, metrics=None):
        self.cfg, self.enabled = cfg, bool(cfg.enabled)
        self.backend_models = {name: b.model for name, b in serve_cfg.backends.items()}
        self.tenant_header = serve_cfg.tenant_header
        self.fields = frozenset(cfg.redact_fields)
        self.patterns = [re.compile(p) for p in cfg.redact_patterns]
        self.path = Path(cfg.path)
        self.counts = {"written": 0, "dropped": 0, "no_answer": 0, "error": 0, "rotated": 0}
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self._thread: Optional[threading.Thread] = None
        self._fd: Optional[int] = None
        self._size = 0
        self._counter = None
        if metrics is not None and self.enabled:
            from prometheus_client import Counter

            self._counter = Counter("optkit_traffic_log_lines", "Traffic-log lines by outcome (written, dropped = "
                                    "queue full, no_answer = incomplete reply, error = write failed)",
                                    ["outcome"], registry=metrics.registry)

    # ------------------------------------------------------------------ request path (event loop)

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self._thread = threading.Thread(target=self._run, name="optkit-traffic-log", daemon=True)
        self._thread.start()

    def observe(self, kind: str, body: dict, headers, resp, started: float):
        """Called once per reply the gateway built; returns the response (a stream is wrapped to tee its
        chunks). Only 2xx replies are logged; the answer is parsed later, on the writer thread."""
        if not self.enabled or self._thread is None or not 200 <= resp.status_code < 300:
            return resp
        if self.cfg.sample_rate < 1 and random.random() >= self.cfg.sample_rate:
            return resp
        from toolkit.serve.protocol import tenant_of

        item = {"kind": kind, "body": body, "tenant": tenant_of(headers, self.tenant_header),
                "time": time.time(), "started": started,
                "headers": {k: v for k, v in resp.headers.items() if k.startswith("x-optkit-")}}
        iterator = getattr(resp, "body_iterator", None)
        if iterator is None:
            item.update(reply=resp.body, ended=time.perf_counter())
            self._put(item)
            return resp
        resp.body_iterator = self._tee(iterator, item)
        return resp

    async def _tee(self, iterator, item: dict):
        chunks: list = []
        try:
            async for chunk in iterator:
                chunks.append(chunk)
                yield chunk
        finally:  # also when the client went away: the writer then finds no complete answer and skips it
            item.update(chunks=chunks, ended=time.perf_counter())
            self._put(item)

    def _put(self, item: dict) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._count("dropped")

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self._counter is not None:
            self._counter.labels(outcome).inc()

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                entry = self.entry(item)
                if entry is None:
                    self._count("no_answer")
                    continue
                self._write((json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
                self._count("written")
            except Exception as exc:  # never kill the writer: one bad item is counted and logged
                self._count("error")
                log.warning("serve: traffic log: cannot write a line (%s: %s)", type(exc).__name__, redact(str(exc)))

    def clean(self, obj: Any) -> Any:
        """Registered secrets, URL credentials and redact_patterns masked in every string."""
        if isinstance(obj, dict):
            return {k: self.clean(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.clean(v) for v in obj]
        if isinstance(obj, str):
            text = redact(obj)
            for p in self.patterns:
                text = p.sub(MASK, text)
            return text
        return obj

    def entry(self, item: dict) -> Optional[dict]:
        """The log line of one reply, or None when it holds no complete answer."""
        from toolkit.serve import protocol as P

        kind, body, h = item["kind"], item["body"], item["headers"]
        if "reply" in item:
            reply = json.loads(item["reply"])
            answer, usage = P.answer_of(kind, reply), reply.get("usage")
            rid, reply_model = reply.get("id"), reply.get("model")
        else:
            answer, rid, reply_model, usage = self._from_stream(kind, item["chunks"])
        if answer is None:
            return None
        route = h.get("x-optkit-route")
        backend_ms = h.get("x-optkit-backend-latency-ms")
        request = _mask_fields({k: v for k, v in body.items() if k in ("messages", "prompt")}, self.fields)
        params = _mask_fields({k: v for k, v in body.items() if k not in NOT_PARAMS}, self.fields)
        line = {"format": FORMAT, "id": rid,
                "time": datetime.fromtimestamp(item["time"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "tenant": item["tenant"], "kind": kind, "model": body.get("model"), **request, "params": params,
                "stream": "chunks" in item, "route": route, "decision": h.get("x-optkit-decision"),
                "served_model": self.backend_models.get(h.get("x-optkit-served-backend") or route),
                "reply_model": reply_model,
                "answer": answer["text"], "finish_reason": answer["finish_reason"],
                "usage": _usage(usage), "latency_s": round(item["ended"] - item["started"], 6),
                "backend_latency_s": round(float(backend_ms) / 1000, 6) if backend_ms else None}
        if h.get("x-optkit-student-usage"):  # a cascade escalation: the student ran first, its tokens are paid too
            try:
                line["student_usage"] = _usage(json.loads(h["x-optkit-student-usage"]))
            except ValueError:
                pass
        return self.clean(line)

    @staticmethod
    def _from_stream(kind: str, chunks: list) -> tuple:
        from toolkit.serve.protocol import StreamAnswer

        text = b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks).decode("utf-8", "replace")
        collected, usage = StreamAnswer(kind), None
        for line in text.split("\n"):
            line = line.rstrip("\r")
            collected.feed(line)
            if line.startswith("data:") and '"usage"' in line:  # stream_options.include_usage: the last event
                try:
                    usage = json.loads(line[5:]).get("usage") or usage
                except (ValueError, AttributeError):
                    pass
        return collected.answer(), collected.id, None, usage

    # ------------------------------------------------------------------ the file

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        if self._size and os.pread(self._fd, 1, self._size - 1) != b"\n":
            # a writer killed mid-line (one gateway per file, so it was ours): cut the torn tail, or the next
            # line would be glued to it
            tail = os.pread(self._fd, min(self._size, 1 << 20), max(self._size - (1 << 20), 0))
            keep = self._size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
            os.ftruncate(self._fd, keep)
            log.warning("serve: traffic log %s ended in a torn line (%d bytes, from a killed writer); cut it",
                        self.path, self._size - keep)
            self._size = keep

    def _write(self, data: bytes) -> None:
        limit = self.cfg.rotate_bytes
        if limit is not None and self._size and self._size + len(data) > limit:
            self._rotate()
        view = memoryview(data)
        while view:  # one write() for a line in practice; a short write is finished, never interleaved by us
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(data)

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self.path, rotated_name(self.path))
        self._count("rotated")
        if self.cfg.keep_files is not None:
            pattern = re.compile(re.escape(self.path.stem) + r"\.\d{8}T\d{12}Z" + re.escape(self.path.suffix) + "$")
            old = sorted(p for p in self.path.parent.iterdir() if pattern.match(p.name))
            for p in old[:max(len(old) - self.cfg.keep_files, 0)]:
                p.unlink(missing_ok=True)
        self._open()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (within `timeout`), then close the file."""
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._thread = None
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def _usage(usage) -> Optional[dict]:
    if not isinstance(usage, dict):
        return None
    out = {k: usage[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}
    return out or None
