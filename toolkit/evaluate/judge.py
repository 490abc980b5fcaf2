"""LLM-as-judge through any OpenAI-compatible /chat/completions endpoint.

The judge sees the user's question, a reference answer (gold, or the teacher's) and the candidate answer, and
replies with one integer from 1 to 10. A variant's judge score = mean / 10. Replies without a usable integer are
retried, then counted as missing (never as a low score). The API key comes from the environment and is
registered for redaction, so it never reaches a log line. Transport, retries and errors are the one
OpenAI-compatible client's (toolkit.engines.openai_client), shared with collect.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

log = logging.getLogger("optkit.evaluate")

CONCURRENCY = 4  # judge requests in flight at once

SYSTEM = ("You grade answers. Compare the candidate answer with the reference answer for the user's request. "
          "Reply with a single integer from 1 (wrong or useless) to 10 (as good as the reference), nothing else.")
_INT = re.compile(r"\b(10|[1-9])\b")


def parse_score(text: str) -> Optional[int]:
    m = _INT.search(text or "")
    return int(m.group(1)) if m else None


class Judge:
    """Scores answers through the one OpenAI-compatible client (toolkit.engines.openai_client): retries with
    backoff and Retry-After, a rejected key or a wrong URL stops the stage, a few requests in flight at once."""

    def __init__(self, cfg):
        from toolkit.engines.openai_client import ClientConfig, OpenAIClient

        self.cfg = cfg
        self.client = OpenAIClient(ClientConfig.of(cfg, "evaluate.judge", concurrency=CONCURRENCY, backoff_max_s=8.0))

    def body(self, question: str, reference: str, answer: str) -> dict:
        return {"model": self.cfg.model, "temperature": 0, "max_tokens": 4, "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Request:\n{question}\n\nReference answer:\n{reference}\n\n"
                                        f"Candidate answer:\n{answer}\n\nScore (1-10):"}]}

    @staticmethod
    def parse(data, seconds: float) -> int:
        from toolkit.engines.openai_client import Retryable

        try:
            got = parse_score(data["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            got = None
        if got is None:  # retried like a malformed reply; in the end counted as missing, never as a low score
            raise Retryable("no score in the reply", "malformed")
        return got

    def score_many(self, items: list[tuple[str, str, str]]) -> list[Optional[int]]:
        """A score per (question, reference, answer), None where the judge gave none after its retries."""
        from toolkit.engines.openai_client import PromptFailed, Retryable

        scores: list[Optional[int]] = [None] * len(items)

        async def handle(http, i: int) -> None:
            try:
                scores[i], _ = await self.client.call(http, "/chat/completions", self.body(*items[i]), self.parse)
            except (Retryable, PromptFailed) as exc:
                log.warning("judge: giving up on one answer (%s)", exc)

        self.client.run_all(list(range(len(items))), handle)
        return scores

    def score(self, question: str, reference: str, answer: str) -> Optional[int]:
        return self.score_many([(question, reference, answer)])[0]

    def close(self) -> None:
        pass


def judge_variant(judge: Judge, scored: list[dict], records: list[dict], against: str, limit: Optional[int]) -> dict:
    """judge_score (mean / 10) and how many answers it covers."""
    pairs = list(zip(scored, records))[:limit or len(scored)]
    items = [(rec["prompt"], rec.get("reference") if against == "gold" and rec.get("reference") else rec["output"],
              row["output"]) for row, rec in pairs]
    scores = []
    for (row, _), s in zip(pairs, judge.score_many(items)):
        row["judge"] = s
        if s is not None:
            scores.append(s)
    return {"judge_score": sum(scores) / len(scores) / 10 if scores else None, "judge_n": len(scores)}
