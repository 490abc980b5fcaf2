"""The OpenAI-compatible gateway (FastAPI on uvicorn): every request goes exact cache -> semantic cache ->
router -> a backend, through the Decider that evaluate's replay uses too.

Every reply says how it was served (x-optkit-route: exact-cache | semantic-cache | <backend>), with the router's
score and threshold, the cache similarity and the backend latency. Errors are OpenAI-style JSON with a 4xx for
anything the client sent wrong; a backend failure is a 502/504, never a crash.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from toolkit.config.serve import ServeConfig
from toolkit.serve import protocol as P
from toolkit.serve.audit import CACHE, ROUTE, Auditor
from toolkit.serve.backends import BackendError, Pool
from toolkit.serve.decide import SEMANTIC, Decider, Decision
from toolkit.serve.metrics import Metrics
from toolkit.serve.traffic_log import TrafficLog

log = logging.getLogger("optkit.serve")
PATHS = {"chat": "/chat/completions", "completions": "/completions"}
MODELS = {"chat": P.ChatRequest, "completions": P.CompletionRequest}


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise P.ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise P.ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise P.ApiError(400, "request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise P.ApiError(400, "request body must be a JSON object", code="invalid_json")
    return body


def validate(kind: str, body: dict):
    try:
        return MODELS[kind].model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise P.ApiError(400, f"{where}: {err['msg']}", param=where or None, code="invalid_value") from None


def upstream_error(exc: BackendError) -> P.ApiError:
    """A backend failure the fallback chain could not absorb, as the client's error."""
    if exc.status in (400, 413, 422):  # the backend refused the request itself: the client can fix it
        return P.ApiError(exc.status, f"the model backend refused the request: {exc}", code="backend_refused")
    status = 504 if exc.reason in ("timeout", "deadline", "busy") else 502
    return P.ApiError(status, f"backend '{exc.backend}' failed ({exc.reason})", "upstream_error", code=exc.reason)


def route_headers(decision: Decision, served: str, falls: list[str], backend_s: Optional[float]) -> dict:
    h = {"x-optkit-route": served, "x-optkit-decision": decision.route,
         "x-optkit-decision-ms": f"{decision.seconds * 1000:.3f}"}
    if decision.choice is not None:
        h["x-optkit-router-choice"] = decision.choice
    if decision.score is not None:
        h["x-optkit-router-score"] = f"{decision.score:.6g}"
        h["x-optkit-router-threshold"] = f"{decision.threshold:.6g}"
    if decision.similarity is not None:
        h["x-optkit-cache-similarity"] = f"{decision.similarity:.6g}"
    if backend_s is not None:
        h["x-optkit-backend-latency-ms"] = f"{backend_s * 1000:.1f}"
    if falls:
        h["x-optkit-fallback"] = ",".join(falls)
    return h


def text_of(answer) -> Optional[str]:
    return answer.get("text") if isinstance(answer, dict) else answer if isinstance(answer, str) else None


class Gateway:
    def __init__(self, cfg: ServeConfig, decider: Decider, targets: Optional[dict] = None):
        self.cfg, self.decider, self.metrics = cfg, decider, Metrics()
        self.decision_text = None  # the recipe's template, to read the prompt column out of a user turn
        if cfg.decision_text is not None:
            from toolkit.serve.decision_text import DecisionText

            self.decision_text = DecisionText(cfg.decision_text.template, cfg.decision_text.column)
        self.pool: Optional[Pool] = None
        self.clients = P.ClientKeys(cfg.api_keys_env)
        self.auditor = Auditor(cfg.audit, targets or {}, self.metrics)
        self.traffic = TrafficLog(cfg.traffic_log, cfg, self.metrics)  # opt-in; writes on its own thread

    def start(self) -> None:
        self.pool = Pool(self.cfg.backends, lambda s, d, r: self.metrics.fallbacks.labels(s, d, r).inc())
        self.auditor.start(self.pool)
        self.traffic.start()

    def audit(self, kind: str, body: dict, decision: Decision, served: str, rid: Optional[str],
              answer: Optional[str]) -> None:
        """A complete reply: remembered for /v1/feedback, and maybe shadow-checked (in the background)."""
        check = None
        if decision.route == SEMANTIC:
            check = CACHE
        elif decision.choice is not None and served == decision.route and served != self.cfg.audit.teacher:
            check = ROUTE  # the router chose a student and the student answered
        self.auditor.remember(rid, served, check)
        if check is not None:
            self.auditor.sample(check, PATHS[kind], body, answer)

    # ------------------------------------------------------------------ one request

    async def handle(self, kind: str, request: Request) -> Response:
        started, route = time.perf_counter(), "none"
        try:
            self.clients.check(request.headers)
            body = await read_json(request, self.cfg.max_body_bytes)
            resp = await self.serve(kind, validate(kind, body), body, request.headers)
            route = resp.headers.get("x-optkit-route", "none")
            resp = self.traffic.observe(kind, body, request.headers, resp, started)
        except P.ApiError as exc:
            resp = self.error(exc)
        except Exception:  # a bug: counted here, answered by the app's crash handler
            self.count(kind, route, "5xx", started)
            raise
        if isinstance(resp, StreamingResponse):  # counted when the stream ends: its outcome and whole duration
            resp.body_iterator = self.counted(resp.body_iterator, kind, route, started, getattr(resp, "cut", None))
        else:
            self.count(kind, route, f"{resp.status_code // 100}xx", started)
        return resp

    def count(self, kind: str, route: str, status: str, started: float) -> None:
        self.metrics.requests.labels(kind, route, status).inc()
        self.metrics.latency.labels(kind, route).observe(time.perf_counter() - started)
        for name, b in self.pool.backends.items():
            self.metrics.breaker_open.labels(name).set(float(b.breaker.state == "open"))

    async def counted(self, iterator, kind: str, route: str, started: float, cut: Optional[asyncio.Event]):
        """A stream, counted at its end: 2xx when it completed, 5xx when the backend cut it (the client got the
        error in-band), 4xx when the client went away first (nginx's 499)."""
        status = "4xx"
        try:
            async for chunk in iterator:
                yield chunk
            status = "5xx" if cut is not None and cut.is_set() else "2xx"
        finally:
            self.count(kind, route, status, started)

    def error(self, exc: P.ApiError) -> JSONResponse:
        self.metrics.errors.labels(exc.code or exc.type).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    async def serve(self, kind: str, req, body: dict, headers) -> Response:
        passthrough = self.pool.by_model(req.model) if self.cfg.passthrough else None
        if passthrough is not None:  # a concrete backend model: not cached, not routed, not re-routed on failure
            return await self.forward(kind, req, body, Decision(passthrough.name), None, fallback=False)
        if req.model != self.cfg.model_name:
            known = [m["id"] for m in self.models()["data"]]
            raise P.ApiError(404, f"model '{req.model[:100]}' does not exist (served: {', '.join(known)})",
                             param="model", code="model_not_found")
        no_cache, no_store = P.cache_control(headers)
        key = P.keyed(kind, req, body, P.tenant_of(headers, self.cfg.tenant_header), self.cfg.model_name,
                      self.cfg.cache, no_cache, no_store, self.decision_text)
        if key.templated is not None:
            self.metrics.decision_text.labels("template" if key.templated else "whole_turn").inc()
        decision = await asyncio.to_thread(self.decider.decide, key.query, key.namespace, key.lookup)
        self.metrics.decision.observe(decision.seconds)
        if decision.shift is not None:
            self.metrics.shift_flagged.labels(decision.shift).inc()
        if decision.hit:
            self.metrics.cache_hits.labels(decision.route).inc()
            return self.from_cache(kind, req, body, decision)
        if decision.choice is not None:
            self.auditor.decided(decision.route == self.cfg.audit.teacher)
        if key.lookup:
            self.metrics.cache_misses.inc()
        return await self.forward(kind, req, body, decision, key if key.store else None)

    def from_cache(self, kind: str, req, body: dict, decision: Decision) -> Response:
        headers = route_headers(decision, decision.route, [], None)
        rid = P.new_id(kind)
        self.audit(kind, body, decision, decision.route, rid, text_of(decision.answer))
        if req.stream:
            chunks = P.cached_chunks(kind, decision.answer, self.cfg.model_name, rid, P.include_usage(body))
            return StreamingResponse(iter(chunks), media_type="text/event-stream", headers=headers)
        return JSONResponse(P.cached_reply(kind, decision.answer, self.cfg.model_name, rid), headers=headers)

    async def remember(self, key: Optional[P.Keyed], answer: Optional[dict], decision: Decision,
                       falls: list[str]) -> None:
        """Store the answer the decision meant to get. Stored before the reply goes out: the next request of the
        same client sees it (no race), and it costs no embedding when the request's vector is shared. Never an
        answer a fallback gave (a student standing in for a failed teacher would be served for the whole TTL)."""
        if key is None or answer is None or falls:
            return

        def store() -> int:  # on a thread, count included: with Redis that is a network call
            self.decider.remember(key.query, answer, key.namespace, decision)
            return len(self.decider.exact) if self.decider.exact is not None else 0

        self.metrics.cache_entries.set(await asyncio.to_thread(store))

    async def forward(self, kind: str, req, body: dict, decision: Decision, key: Optional[P.Keyed],
                      fallback: bool = True) -> Response:
        if decision.escalate_to is not None:  # cascade mode: the student answers, maybe escalates (serve/cascade.py)
            from toolkit.serve.cascade import forward_cascade

            return await forward_cascade(self, kind, req, body, decision, key)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        if req.stream:
            return await self.forward_stream(kind, body, decision, key, deadline, fallback)

        async def call(backend, queue_s):
            return await backend.post(PATHS[kind], {**body, "model": backend.cfg.model}, deadline, queue_s)

        try:
            (reply, seconds), served, falls = await self.pool.run(decision.route, call, deadline, fallback)
        except BackendError as exc:
            raise upstream_error(exc) from None
        self.metrics.backend.labels(served).observe(seconds)
        answer = P.answer_of(kind, reply)
        await self.remember(key, answer, decision, falls)
        self.audit(kind, body, decision, served, reply.get("id") if isinstance(reply, dict) else None,
                   text_of(answer))
        return JSONResponse(reply, headers=route_headers(decision, served, falls, seconds))

    async def forward_stream(self, kind: str, body: dict, decision: Decision, key: Optional[P.Keyed],
                             deadline: float, fallback: bool) -> Response:
        from contextlib import AsyncExitStack

        stack = AsyncExitStack()
        started = time.monotonic()

        async def call(backend, queue_s):
            return await stack.enter_async_context(
                backend.stream(PATHS[kind], {**body, "model": backend.cfg.model}, deadline, queue_s))

        try:
            resp, served, falls = await self.pool.run(decision.route, call, deadline, fallback)
        except BackendError as exc:
            await stack.aclose()
            raise upstream_error(exc) from None
        first_byte = time.monotonic() - started
        self.metrics.backend.labels(served).observe(first_byte)
        cut = asyncio.Event()
        out = StreamingResponse(self.relay(kind, resp, stack, key, decision, body, served, falls, cut),
                                media_type="text/event-stream",
                                headers=route_headers(decision, served, falls, first_byte))
        out.cut = cut  # read by handle's count at the stream's end
        return out

    async def relay(self, kind: str, resp, stack, key: Optional[P.Keyed], decision: Decision, body: dict,
                    served: str, falls: list[str], cut: asyncio.Event):
        """The backend's SSE bytes unchanged; the answer is cached only if the stream completed."""
        collected, pending, stored = P.StreamAnswer(kind), "", False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split across chunks
        try:
            async for chunk in resp.aiter_bytes():
                pending += decoder.decode(chunk)
                *lines, pending = pending.split("\n")
                for line in lines:
                    collected.feed(line.rstrip("\r"))
                if collected.done and not stored:  # stored before [DONE] reaches the client: no race
                    stored = True
                    await self.remember(key, collected.answer(), decision, falls)
                    self.audit(kind, body, decision, served, collected.id, text_of(collected.answer()))
                yield chunk
        except Exception as exc:  # the backend died mid-stream: tell the client in-band, cache nothing
            cut.set()
            self.pool.backends[served].breaker.failure()  # its headers had counted as a success
            self.metrics.errors.labels("stream_cut").inc()
            log.warning("serve: stream from %s cut: %s", decision.route, type(exc).__name__)
            yield P.sse(P.ApiError(502, "the backend stream was cut", "upstream_error", code="stream_cut").body())
            return
        finally:
            await stack.aclose()

    # ------------------------------------------------------------------ other endpoints

    def models(self) -> dict:
        ids = [(self.cfg.model_name, "optkit")]
        if self.cfg.passthrough:
            ids += [(b.cfg.model, name) for name, b in self.pool.backends.items()]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": o}
                                           for i, o in ids]}

    async def ready(self) -> JSONResponse:
        """Ready while every backend's requests have somewhere to go: it, or a backend on its fallback chain, is
        reachable. A dead student behind a live teacher keeps the gateway ready -- requests succeed through the
        fallback, and a readiness probe failing on every replica at once would turn that into an outage."""
        names = list(self.pool.backends)
        up = dict(zip(names, await asyncio.gather(*(self.pool.backends[n].reachable() for n in names))))

        def served(name: str) -> bool:
            seen = set()
            while name is not None and name not in seen:
                if up[name]:
                    return True
                seen.add(name)
                name = self.pool.backends[name].cfg.fallback
            return False

        ok = all(served(n) for n in names)
        return JSONResponse({"ready": ok, "backends": up}, status_code=200 if ok else 503)


def create_app(cfg: ServeConfig, decider: Decider, targets: Optional[dict] = None) -> FastAPI:
    gw = Gateway(cfg, decider, targets)

    @asynccontextmanager
    async def lifespan(app):
        gw.start()
        yield
        await gw.auditor.stop()
        await gw.pool.aclose()
        await asyncio.to_thread(gw.traffic.close)

    app = FastAPI(title="optkit gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await gw.handle("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await gw.handle("completions", request)

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        try:
            gw.clients.check(request.headers)  # verdicts move the audit's gauges: only from clients
            fb = P.Feedback.model_validate(await read_json(request, 4096))
            result = gw.auditor.feedback(fb.id, fb.correct)
            if result is None:
                raise P.ApiError(404, f"no response with id '{fb.id[:100]}' (unknown, or forgotten: the gateway "
                                 f"keeps the last {cfg.audit.remember_ids})", param="id", code="unknown_id")
        except ValidationError as exc:
            return gw.error(P.ApiError(400, exc.errors(include_url=False)[0]["msg"], code="invalid_value"))
        except P.ApiError as exc:
            return gw.error(exc)
        return result

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            gw.clients.check(request.headers)
        except P.ApiError as exc:
            return gw.error(exc)
        return gw.models()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return await gw.ready()

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown path, wrong method: the same error shape
        return gw.error(P.ApiError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"))

    @app.exception_handler(Exception)
    async def crash(request, exc):  # a bug: logged (redacted by the handlers' filter), answered as JSON
        log.error("serve: internal error: %s: %s", type(exc).__name__, exc)
        return gw.error(P.ApiError(500, "internal error in the gateway", "server_error", code="internal_error"))

    return app
