"""The one decision path of the composed system: exact cache -> semantic cache -> router -> a model.

Both the live gateway (toolkit/serve/app.py) and evaluate's offline replay (toolkit/evaluate/system.py) call
`Decider.decide` and `Decider.remember`, so the decision the report priced is the decision the gateway makes:
they cannot drift, because there is only one implementation. Imports numpy and the cache/route runtimes only.

Latency: when the semantic cache and the router use the same embedder object, a request is embedded once and
the vector is shared by the cache lookup, the router and the later cache insert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from toolkit.cache.exact import ExactStore  # noqa: F401  (the memory exact store; also RedisExactStore there)

EXACT, SEMANTIC = "exact-cache", "semantic-cache"


@dataclass
class Decision:
    route: str  # EXACT | SEMANTIC | the target the router's choice maps to (a backend or variant name)
    answer: Any = None  # the cached answer on a hit
    similarity: Optional[float] = None  # of the cache entry served (cosine, or the learned metric of cache.json)
    choice: Optional[str] = None  # the router's model name
    score: Optional[float] = None  # two models: predicted quality gain of the strong one
    threshold: Optional[float] = None
    vector: Optional[np.ndarray] = None  # the shared embedding, reused by remember()
    seconds: float = 0.0  # time spent deciding (the system's overhead)
    shift: Optional[str] = None  # the router's shift guard flagged the prompt: the action taken (teacher | warn)
    escalate_to: Optional[str] = None  # cascade mode: route answers first; this target if Decider.escalates(...)

    @property
    def hit(self) -> bool:
        return self.route in (EXACT, SEMANTIC)


def target_for(router, choice: str, student: str, routes: Optional[dict] = None, teacher: str = "teacher") -> str:
    """Router model name -> target: an explicit mapping wins; else the teacher by name (or the router's strong
    model when none is called teacher), every other model -> the student."""
    if routes and choice in routes:
        return routes[choice]
    if choice == teacher or (teacher not in router.models and choice == router.strong):
        return teacher
    return student


class Decider:
    """cache (SemanticCache or None), router (Router or None), exact (toolkit.cache.exact: ExactStore |
    RedisExactStore, or None); `target(choice)` maps
    the router's model name to a backend / variant; `default` serves misses when there is no router."""

    def __init__(self, cache=None, router=None, exact: Optional[ExactStore] = None,
                 target: Optional[Callable[[str], str]] = None, default: str = "student", cascade=None,
                 escalate_to: str = "teacher"):
        self.cache, self.router, self.exact, self.default = cache, router, exact, default
        # cascade (toolkit.route.cascade.Cascade): on a miss the default target answers first, and escalates to
        # `escalate_to` when its confidence is below the threshold; the router is then not consulted.
        self.cascade, self.escalate_to = cascade, escalate_to
        self.target = target or (lambda choice: target_for(router, choice, default))
        # One embedding for both only when they hold the very same embedder (the gateway arranges that when the
        # cache's probe check accepts the router's embedder); otherwise each embeds with its own.
        self.shared = (cache is not None and router is not None and getattr(cache, "embedder", None) is not None
                       and cache.embedder is router.embedder)
        self._cost_norm = None if router is None else np.asarray(router.spec["cost_norm"], dtype=np.float64)

    def decide(self, prompt: str, namespace="default", use_cache: bool = True) -> Decision:
        started = time.perf_counter()
        decision = self._decide(prompt, namespace, use_cache)
        decision.seconds = time.perf_counter() - started
        return decision

    def _decide(self, prompt: str, namespace, use_cache: bool) -> Decision:
        if use_cache and self.exact is not None:
            answer = self.exact.get(prompt, namespace)
            if answer is not None:
                return Decision(EXACT, answer, similarity=1.0)
        vec = self.router.embed([prompt]) if self.shared else None
        if use_cache and self.cache is not None:
            # One exact layer: the exact store (memory or Redis, shared by replicas) when there is one, and the
            # semantic cache is asked for its nearest neighbour only; without one, lookup() runs the cache's own.
            if self.exact is None:
                hit = self.cache.lookup(prompt, namespace)
            elif vec is not None:
                hit = self.cache.lookup_vector(vec[0], namespace)
            else:
                hit = self.cache.lookup(prompt, namespace, exact=False)
            if hit is not None:
                return Decision(EXACT if hit.exact else SEMANTIC, hit.answer, similarity=hit.similarity)
        if self.cascade is not None:
            return Decision(self.default, vector=vec, threshold=self.cascade.threshold, escalate_to=self.escalate_to)
        if self.router is None:
            return Decision(self.default, vector=vec)
        return self._route(prompt, vec)

    def _route(self, prompt: str, vec: Optional[np.ndarray]) -> Decision:
        """Router.route's own rule (route.runtime.decide over predicted qualities), keeping the score."""
        from toolkit.route.runtime import decide

        router = self.router
        P = router.predict_quality([prompt], vec)
        choice = router.models[int(decide(P, self._cost_norm, router.threshold)[0])]
        shift = self._shift(prompt, vec)
        if shift == "teacher":  # out of the distribution the router was calibrated on: the strong model answers
            choice = router.strong
        score = None
        if len(router.models) == 2:
            s = router.models.index(router.strong)
            score = float(P[0, s] - P[0, 1 - s])
        return Decision(self.target(choice), choice=choice, score=score, threshold=float(router.threshold),
                        vector=vec, shift=shift)

    def escalates(self, confidence: float) -> bool:
        """Cascade mode: the one escalation rule (gateway and evaluate's replay), on the answer's confidence."""
        return self.cascade.escalate(confidence)

    def _shift(self, prompt: str, vec: Optional[np.ndarray]) -> Optional[str]:
        """The router's shift guard, when it carries one (`router.shift_guard.check(prompt, vector)` -> None or
        the action the bundle sets: teacher | warn); routers without one are never flagged."""
        guard = getattr(self.router, "shift_guard", None)
        if guard is None:
            return None
        action = guard.check(prompt, None if vec is None else vec[0])
        return None if action is None else "teacher" if action == "teacher" else "warn"

    def remember_many(self, prompts: list[str], answers: list[Any], namespace="default") -> None:
        """Pre-fill every layer (a warm cache), embedding the prompts in one batch."""
        if self.exact is not None:
            self.exact.put_many(list(prompts), list(answers), namespace)
        if self.cache is not None:
            self.cache.insert_many(prompts, answers, namespace)

    def remember(self, prompt: str, answer: Any, namespace="default", decision: Optional[Decision] = None) -> None:
        """Store a complete, successful answer in every layer (re-using the request's vector when it has one)."""
        if self.exact is not None:
            self.exact.put(prompt, answer, namespace)
        if self.cache is not None:
            vec = None if decision is None else decision.vector
            self.cache.insert_many([prompt], [answer], namespace, vectors=vec)
