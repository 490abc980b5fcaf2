"""The gateway in cascade mode (the bundle ships route/cascade.json): on a cache miss the student answers first,
asked for its tokens' log-probs; its confidence (toolkit.route.cascade) below the threshold escalates the request
to the teacher (Decider.escalates: the rule evaluate's replay prices). The reply says how it was served:
x-optkit-route: <student backend> | teacher-escalated, with x-optkit-cascade-confidence / -threshold.

The student's answer must be complete before the decision, so a streaming request is answered as one stream of
the final reply (role, content or tool calls, finish, the usage chunk when asked, [DONE]). A failing teacher after
an escalation serves the student's answer (x-optkit-fallback says so; not cached); a failing student falls back
as its backend config says, unscored.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Optional

from fastapi.responses import JSONResponse, StreamingResponse

from toolkit.serve import protocol as P
from toolkit.serve.backends import BackendError

ESCALATED = "teacher-escalated"
log = logging.getLogger("optkit.serve")
_warned: dict[str, bool] = {}  # backends already reported as returning no log-probs (once per process)


def _student_body(kind: str, body: dict) -> dict:
    """The client's body, non-streaming, asking for the sampled tokens' log-probs."""
    ask = {**body, "stream": False}
    ask.pop("stream_options", None)
    if kind == "chat":  # top_logprobs >= 1 too: llama.cpp's server returns none without it
        ask["logprobs"], ask["top_logprobs"] = True, max(1, int(body.get("top_logprobs") or 0))
    else:
        ask["logprobs"] = max(1, int(body.get("logprobs") or 0))
    return ask


def _strip_logprobs(kind: str, body: dict, reply: dict) -> dict:
    """Log-probs the client did not ask for are not passed on."""
    if body.get("logprobs") or not isinstance(reply, dict):
        return reply
    for choice in reply.get("choices") or []:
        if isinstance(choice, dict) and "logprobs" in choice:
            choice["logprobs"] = None
    return reply


async def forward_cascade(gw, kind: str, req, body: dict, decision, key) -> object:
    from toolkit.route.cascade import token_logprobs_of
    from toolkit.serve.app import PATHS, route_headers, text_of, upstream_error

    deadline = time.monotonic() + gw.cfg.request_timeout_s
    cascade = gw.decider.cascade

    def call_with(payload: dict):
        async def call(backend, queue_s):
            return await backend.post(PATHS[kind], {**payload, "model": backend.cfg.model}, deadline, queue_s)
        return call

    try:
        (reply, seconds), served, falls = await gw.pool.run(decision.route, call_with(_student_body(kind, body)),
                                                            deadline, True)
    except BackendError as exc:
        raise upstream_error(exc) from None
    gw.metrics.backend.labels(served).observe(seconds)
    extra: dict[str, str] = {}
    if served == decision.route:  # the student answered: score it
        logprobs = token_logprobs_of(reply)
        if not logprobs and not _warned.get(served):
            # No confidence means every request escalates: student + teacher, dearer than the teacher alone
            _warned[served] = True
            log.warning("serve: backend '%s' returned no token log-probs; in cascade mode every request escalates "
                        "to the teacher (serve it with log-probs enabled, e.g. vLLM, or llama.cpp's server with "
                        "n_probs)", served)
        confidence, escalate = cascade.decide(logprobs)
        extra = {"x-optkit-cascade-confidence": f"{confidence:.6g}",
                 "x-optkit-cascade-threshold": f"{cascade.threshold:.6g}"}
        if escalate:
            plain = {**body, "stream": False}
            plain.pop("stream_options", None)
            try:
                (t_reply, t_seconds), t_served, t_falls = await gw.pool.run(
                    decision.escalate_to, call_with(plain), deadline, False)
                gw.metrics.backend.labels(t_served).observe(t_seconds)
                # Both models ran: the reply's usage is the teacher's; the student's travels beside it (traffic log)
                student_usage = reply.get("usage") if isinstance(reply, dict) else None
                extra["x-optkit-served-backend"] = t_served
                if isinstance(student_usage, dict):
                    extra["x-optkit-student-usage"] = json.dumps(student_usage, separators=(",", ":"))
                reply, seconds, served, falls = t_reply, seconds + t_seconds, ESCALATED, falls + t_falls
            except BackendError as exc:  # the student's answer is still an answer
                falls = falls + [f"{ESCALATED}->{decision.route}:{exc.reason}"]
    reply = _strip_logprobs(kind, body, reply)
    answer = P.answer_of(kind, reply)
    await gw.remember(key, answer, decision, falls)
    rid: Optional[str] = reply.get("id") if isinstance(reply, dict) else None
    gw.audit(kind, body, decision, served, rid, text_of(answer))
    headers = {**route_headers(decision, served, falls, seconds), **extra}
    if req.stream:
        chunks = P.reply_chunks(kind, reply, P.include_usage(body))
        return StreamingResponse(iter(chunks), media_type="text/event-stream", headers=headers)
    return JSONResponse(reply, headers=headers)
