"""The bundle's guarantees, audited while the gateway runs.

Two kinds of check, each a yes/no outcome:
- cache: a semantic-cache hit was a FALSE hit when its cached answer is not an acceptable answer to the new prompt,
  judged by evaluate's own metric against the teacher's fresh answer to that prompt (evaluate.measure.agrees:
  same label when audit.labels is set, else normalized exact match; or toolkit.metrics' exact / f1 / rouge_l
  with audit.min_score). Realized false-hit rate = false hits / checks; one-sided Clopper-Pearson bounds.
- route: a student-routed answer that agrees with the teacher's answer to the same request (same metric).
  With quality measured as agreement with the teacher, the teacher scores 1 on its own answers, so the routed
  system's quality ratio (routed vs always-teacher) is 1 - f * (1 - agreement), f = the share of router
  decisions that went to a non-teacher backend (counted exactly); its bounds follow from agreement's.

A sampled request (audit.sample_rate) is queued after its reply is complete and re-asked to the teacher by a
background worker: the client never waits for it. The queue is bounded (full -> dropped, counted); a teacher
whose breaker is not closed or whose slots are all busy is skipped. `POST /v1/feedback {"id", "correct"}` adds
the application's own verdict on a served response as a check of the same kind.

A warning is logged when a bound crosses the bundle's target: breached (the bound shows the target is missed at
the audit's confidence), or no longer certified (a certified target became uncertain); once per crossing, and
at most once per audit.warn_interval_s per kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from toolkit.config.serve import AuditConfig

log = logging.getLogger("optkit.serve")
CACHE, ROUTE = "cache", "route"
TOL = 1e-9  # a bound equal to the target (up to rounding) neither breaches nor certifies it


def bundle_targets(bundle_dir: Path) -> dict:
    """The guarantees the bundle was exported with: cache.json's epsilon / confidence and the router's
    calibrated min_quality / confidence (None where the bundle has no such part or goal)."""
    from toolkit.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    out = {"epsilon": None, "cache_confidence": None, "quality_target": None, "route_confidence": None}
    if bundle.manifest.get("cache"):
        data = json.loads(bundle.path(bundle.manifest["cache"]).read_text())
        out["epsilon"], out["cache_confidence"] = data.get("epsilon"), data.get("confidence")
    if bundle.manifest.get("router"):
        spec = json.loads((bundle.path(bundle.manifest["router"]) / "router.json").read_text())
        cal = spec.get("calibration") or {}
        if cal.get("goal") == "min_quality":
            out["quality_target"] = cal.get("goal_value")
        out["route_confidence"] = cal.get("confidence")
    return out


@lru_cache(maxsize=4096)  # recomputed only when a count changes, not on every routed request
def one_sided(k: int, n: int, confidence: float) -> tuple[float, float]:
    """(lower, upper) one-sided Clopper-Pearson bounds of a rate after k successes in n trials (scipy exact)."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    low = binomtest(k, n, alternative="greater").proportion_ci(confidence_level=confidence, method="exact").low
    high = binomtest(k, n, alternative="less").proportion_ci(confidence_level=confidence, method="exact").high
    return float(low), float(high)


def acceptable(cfg: AuditConfig) -> Callable[[str, str], bool]:
    """served answer, teacher's answer -> acceptable? with evaluate's metric."""
    if cfg.metric == "agreement":
        from toolkit.evaluate.measure import agrees

        return lambda served, teacher: agrees(served, teacher, cfg.labels) >= 1.0
    from toolkit.metrics import METRICS

    return lambda served, teacher: METRICS[cfg.metric](served, teacher) >= cfg.min_score


class Auditor:
    def __init__(self, cfg: AuditConfig, targets: dict, metrics, clock: Callable[[], float] = time.monotonic):
        self.cfg, self.metrics, self.clock = cfg, metrics, clock
        self.ok = acceptable(cfg)
        if cfg.enabled:
            import scipy.stats  # noqa: F401  (at start-up, not inside the first check)
        self.epsilon = cfg.epsilon if cfg.epsilon is not None else targets.get("epsilon")
        self.target = cfg.quality_target if cfg.quality_target is not None else targets.get("quality_target")
        self.confidence = {CACHE: cfg.confidence or targets.get("cache_confidence") or 0.95,
                           ROUTE: cfg.confidence or targets.get("route_confidence") or 0.95}
        self.counts = {CACHE: [0, 0], ROUTE: [0, 0]}  # [checks, failures]
        self.routed = [0, 0]  # [router decisions, of them to a non-teacher backend]
        self.ids: OrderedDict[str, dict] = OrderedDict()
        self.state = {CACHE: "uncertain", ROUTE: "uncertain"}  # as last announced in the log
        self.last_log = {CACHE: -math.inf, ROUTE: -math.inf}
        self.queue: Optional[asyncio.Queue] = None
        self.workers: list[asyncio.Task] = []
        self.teacher = None  # the teacher Backend, set by start()
        m = metrics
        m.audit_target.labels(CACHE).set(self.epsilon if self.epsilon is not None else math.nan)
        m.audit_target.labels(ROUTE).set(self.target if self.target is not None else math.nan)
        for kind in (CACHE, ROUTE):
            m.audit_confidence.labels(kind).set(self.confidence[kind])
            self._gauges(kind)

    # ------------------------------------------------------------------ lifecycle

    def start(self, pool) -> None:
        self.teacher = pool.backends.get(self.cfg.teacher)
        self.queue = asyncio.Queue(self.cfg.queue_size)
        if self.cfg.enabled and self.teacher is not None and self.cfg.sample_rate > 0:
            self.workers = [asyncio.create_task(self._work()) for _ in range(self.cfg.concurrency)]
        if self.cfg.enabled:
            log.info("serve: audit: %s of semantic-cache hits and student answers re-asked to '%s' (epsilon %s, "
                     "quality target %s); feedback at POST /v1/feedback",
                     f"{self.cfg.sample_rate:g}" if self.workers else "none", self.cfg.teacher,
                     "n/a" if self.epsilon is None else f"{self.epsilon:g}",
                     "n/a" if self.target is None else f"{self.target:g}")

    async def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)

    # ------------------------------------------------------------------ from the request path (never blocks)

    def remember(self, rid: Optional[str], route: str, kind: Optional[str]) -> None:
        """A served response the application may give feedback on (bounded: the oldest id is forgotten)."""
        if not rid or not self.cfg.enabled:
            return
        self.ids[rid] = {"route": route, "kind": kind, "feedback": None}
        self.ids.move_to_end(rid)
        while len(self.ids) > self.cfg.remember_ids:
            self.ids.popitem(last=False)

    def decided(self, to_teacher: bool) -> None:
        """One router decision (cache misses only): the share f of non-teacher decisions."""
        self.routed[0] += 1
        self.routed[1] += 0 if to_teacher else 1
        self._gauges(ROUTE)

    def sample(self, kind: str, path: str, body: dict, answer: Optional[str]) -> None:
        """Queue a shadow check of `answer` (what the client got) with probability sample_rate."""
        if (not self.workers or answer is None or self.cfg.sample_rate <= 0
                or random.random() >= self.cfg.sample_rate):
            return
        try:
            self.queue.put_nowait((kind, path, body, answer))
        except asyncio.QueueFull:
            self.metrics.audit_skipped.labels("queue_full").inc()
        self.metrics.audit_queue.set(self.queue.qsize())

    def feedback(self, rid: str, correct: bool) -> Optional[dict]:
        """The application's verdict on a response; None = unknown id."""
        entry = self.ids.get(rid)
        if entry is None:
            return None
        counted = entry["feedback"] is None and entry["kind"] is not None
        self.metrics.feedback.labels(entry["route"], str(bool(correct)).lower()).inc()
        if counted:
            self.record(entry["kind"], correct, "feedback")
        previous, entry["feedback"] = entry["feedback"], bool(correct)
        return {"id": rid, "route": entry["route"], "counted_as": entry["kind"] if counted else None,
                "previous": previous}

    # ------------------------------------------------------------------ the worker

    async def _work(self) -> None:
        while True:
            kind, path, body, answer = await self.queue.get()
            self.metrics.audit_queue.set(self.queue.qsize())
            try:
                await self._check(kind, path, body, answer)
            except Exception as exc:  # an audit bug must never take the worker down
                log.warning("serve: audit check failed: %s", type(exc).__name__)
                self.metrics.audit_skipped.labels("error").inc()

    async def _check(self, kind: str, path: str, body: dict, answer: str) -> None:
        from toolkit.serve.backends import BackendError
        from toolkit.serve.protocol import answer_of

        teacher = self.teacher
        if teacher.breaker.state != "closed":
            self.metrics.audit_skipped.labels("teacher_unavailable").inc()
            return
        if teacher.slots.locked():  # every slot serves clients: the audit waits for a quieter moment
            self.metrics.audit_skipped.labels("teacher_busy").inc()
            return
        request = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        request["model"] = teacher.cfg.model
        try:
            reply, _ = await teacher.post(path, request, time.monotonic() + teacher.cfg.timeout_s)
        except BackendError as exc:
            self.metrics.audit_skipped.labels("teacher_error").inc()
            log.info("serve: audit skipped a check: teacher %s", exc.reason)
            return
        fresh = answer_of("chat" if path.startswith("/chat") else "completions", reply)
        if fresh is None:
            self.metrics.audit_skipped.labels("teacher_error").inc()
            return
        self.record(kind, self.ok(answer, fresh["text"]), "shadow")

    # ------------------------------------------------------------------ tallies, bounds, warnings

    def record(self, kind: str, ok: bool, source: str) -> None:
        c = self.counts[kind]
        c[0] += 1
        c[1] += 0 if ok else 1
        self.metrics.audit_checks.labels(kind, source).inc()
        if not ok:
            self.metrics.audit_failures.labels(kind).inc()
        self._gauges(kind)

    def summary(self, kind: str) -> dict[str, Any]:
        n, failed = self.counts[kind]
        conf = self.confidence[kind]
        if kind == CACHE:
            low, high = one_sided(failed, n, conf)
            rate = failed / n if n else math.nan
            state = self._state(low > self.epsilon + TOL, high <= self.epsilon) if self.epsilon is not None else None
            return {"checks": n, "rate": rate, "lower": low, "upper": high, "state": state}
        agree_low, agree_high = one_sided(n - failed, n, conf)
        f = self.routed[1] / self.routed[0] if self.routed[0] else 1.0  # no decisions yet: assume all student
        ratio = 1 - f * (failed / n) if n else math.nan
        low, high = 1 - f * (1 - agree_low), 1 - f * (1 - agree_high)
        state = self._state(high < self.target - TOL, low >= self.target) if self.target is not None else None
        return {"checks": n, "agreement": (n - failed) / n if n else math.nan, "agreement_lower": agree_low,
                "agreement_upper": agree_high, "student_share": f, "rate": ratio, "lower": low, "upper": high,
                "state": state}

    @staticmethod
    def _state(breached: bool, certified: bool) -> str:  # (too few checks is handled by the caller)
        return "breached" if breached else "certified" if certified else "uncertain"

    def _gauges(self, kind: str) -> None:
        s = self.summary(kind)
        m = self.metrics
        m.audit_rate.labels(kind).set(s["rate"])
        m.audit_lower.labels(kind).set(s["lower"])
        m.audit_upper.labels(kind).set(s["upper"])
        if kind == ROUTE:
            m.route_agreement.set(s["agreement"])
            m.route_student_share.set(s["student_share"])
        if s["state"] is not None and s["checks"] >= self.cfg.min_checks:
            m.audit_breached.labels(kind).set(float(s["state"] == "breached"))
            m.audit_certified.labels(kind).set(float(s["state"] == "certified"))
            self._announce(kind, s)

    def _announce(self, kind: str, s: dict) -> None:
        was, now = self.state[kind], s["state"]
        if now == was or self.clock() - self.last_log[kind] < self.cfg.warn_interval_s:
            return  # no crossing, or one too soon after the last message (announced later if it persists)
        self.state[kind], self.last_log[kind] = now, self.clock()
        conf = self.confidence[kind]
        if kind == CACHE:
            what = (f"cache false-hit rate {s['rate']:.3f} over {s['checks']} checks (one-sided {conf:g} bounds "
                    f"{s['lower']:.3f}..{s['upper']:.3f}) vs the bundle's epsilon {self.epsilon:g}")
        else:
            what = (f"routed quality ratio {s['rate']:.3f} over {s['checks']} checks (one-sided {conf:g} bounds "
                    f"{s['lower']:.3f}..{s['upper']:.3f}) vs the bundle's quality target {self.target:g}")
        if now == "breached":
            log.warning("serve: audit: guarantee BREACHED: %s", what)
        elif was == "certified":
            log.warning("serve: audit: guarantee no longer certified: %s", what)
        else:
            log.info("serve: audit: guarantee %s: %s", now, what)
