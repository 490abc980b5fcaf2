"""LLM-as-judge through any OpenAI-compatible /chat/completions endpoint.

The judge sees the user's question, a reference answer (gold, or the teacher's) and the candidate answer, and
replies with one integer from 1 to 10. A variant's judge score = mean / 10. Replies without a usable integer are
retried, then counted as missing (never as a low score). The API key comes from the environment and is
registered for redaction, so it never reaches a log line.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Optional

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.evaluate")

SYSTEM = ("You grade answers. Compare the candidate answer with the reference answer for the user's request. "
          "Reply with a single integer from 1 (wrong or useless) to 10 (as good as the reference), nothing else.")
_INT = re.compile(r"\b(10|[1-9])\b")


def parse_score(text: str) -> Optional[int]:
    m = _INT.search(text or "")
    return int(m.group(1)) if m else None


class Judge:
    def __init__(self, cfg):
        import httpx

        from toolkit.runtime import register_secret

        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env)
        register_secret(key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout_s)

    def score(self, question: str, reference: str, answer: str) -> Optional[int]:
        body = {"model": self.cfg.model, "temperature": 0, "max_tokens": 4, "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Request:\n{question}\n\nReference answer:\n{reference}\n\n"
                                        f"Candidate answer:\n{answer}\n\nScore (1-10):"}]}
        import httpx

        for attempt in range(self.cfg.max_retries + 1):
            try:
                resp = self.client.post("/chat/completions", json=body)
            except httpx.HTTPError as exc:
                err = f"{type(exc).__name__}"
            else:
                if resp.status_code in (401, 403, 404):
                    raise OptkitError(f"evaluate.judge: {self.cfg.base_url} answered HTTP {resp.status_code} "
                                      f"(check evaluate.judge.base_url, model and {self.cfg.api_key_env})")
                if resp.status_code == 200:
                    try:
                        got = parse_score(resp.json()["choices"][0]["message"]["content"])
                    except (ValueError, KeyError, IndexError, TypeError):
                        got = None
                    if got is not None:
                        return got
                    err = "no score in the reply"
                else:
                    err = f"HTTP {resp.status_code}"
            if attempt < self.cfg.max_retries:
                time.sleep(min(0.5 * 2 ** attempt, 8.0))
        log.warning("judge: giving up on one answer (%s)", err)
        return None

    def close(self) -> None:
        self.client.close()


def judge_variant(judge: Judge, scored: list[dict], records: list[dict], against: str, limit: Optional[int]) -> dict:
    """judge_score (mean / 10) and how many answers it covers."""
    scores = []
    for row, rec in list(zip(scored, records))[:limit or len(scored)]:
        reference = rec.get("reference") if against == "gold" and rec.get("reference") else rec["output"]
        s = judge.score(rec["prompt"], reference, row["output"])
        row["judge"] = s
        if s is not None:
            scores.append(s)
    return {"judge_score": sum(scores) / len(scores) / 10 if scores else None, "judge_n": len(scores)}
