"""The context guard: a prompt's tokens + max_new_tokens must fit the teacher's context, or the answer is
garbage (a 13.6k-token prompt against an 8k model ran for minutes and was kept). Policy collect.context:
error (default: stop, naming the prompt and the numbers), skip, or truncate (cut the middle of the last
message, where the least-needed text usually is: the head says what it is, the tail says what to do).
Lengths come from the engine's own rendering (toolkit.engines.render); the limit from the engine (hf: the
model config; vllm: max_model_len; openai: collect.openai.context_length, else unchecked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.collect")

ELLIPSIS = " ... "
MAX_ROUNDS = 4  # re-rendering after a cut can add a token or two; a few rounds always suffice


@dataclass
class ContextReport:
    policy: str
    limit: Optional[int] = None
    over: int = 0
    skipped: dict = field(default_factory=dict)  # prompt id -> reason
    truncated: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"policy": self.policy, "limit": self.limit, "over_limit": self.over, "skipped": len(self.skipped),
                "truncated": len(self.truncated)}


def cut_middle(tok, text: str, drop: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    keep = max(len(ids) - drop, 0)
    head, tail = keep // 2, keep - keep // 2
    return tok.decode(ids[:head]) + ELLIPSIS + (tok.decode(ids[len(ids) - tail:]) if tail else "")


def guard(engine, requests: list, max_new: int, policy: str) -> tuple[list, ContextReport]:
    """(requests to send, with truncated ones re-rendered; what happened). Requests are (id, messages) pairs."""
    report = ContextReport(policy, engine.context_length())
    if report.limit is None:
        return list(requests), report
    out = []
    for pid, messages in requests:
        n = len(engine.prompt_ids(messages))
        if n + max_new <= report.limit:
            out.append((pid, messages))
            continue
        report.over += 1
        what = (f"prompt {pid} has {n} tokens + collect.generation.max_new_tokens {max_new} = {n + max_new}, over "
                f"the model's context of {report.limit} tokens")
        if policy == "error":
            raise OptkitError(f"collect.context: {what}; set collect.context: skip or truncate, or shorten the data")
        if policy == "skip":
            report.skipped[pid] = f"skipped: {what} (collect.context: skip)"
            continue
        out.append((pid, truncate(engine, messages, report.limit - max_new, what)))
        report.truncated.append(pid)
    if report.over:
        log.warning("collect: %d prompt(s) over the context of %d tokens (collect.context: %s)", report.over,
                    report.limit, policy)
    return out, report


def truncate(engine, messages: list[dict], budget: int, what: str) -> list[dict]:
    """The messages with the last one's middle cut until the rendered prompt fits `budget` tokens."""
    tok = engine.renderer.tok
    messages = [dict(m) for m in messages]
    for _ in range(MAX_ROUNDS):
        excess = len(engine.prompt_ids(messages)) - budget
        if excess <= 0:
            return messages
        messages[-1]["content"] = cut_middle(tok, messages[-1]["content"], excess + 4)
    raise OptkitError(f"collect.context: {what}, and cutting its last message cannot make it fit (the rest of "
                      "the prompt is too long); use collect.context: skip")
