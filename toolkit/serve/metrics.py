"""Prometheus metrics of one gateway (its own registry: two apps in one process never mix counts).

Labels are bounded, fixed vocabularies (endpoint, route, backend, reason, status class): never a tenant, a
prompt, a model name the client sent or anything derived from a key.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("optkit_requests", "Requests by endpoint, how they were served and status class",
                                ["endpoint", "route", "status"], registry=r)
        self.latency = Histogram("optkit_request_seconds", "Whole-request latency at the gateway",
                                 ["endpoint", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.decision = Histogram("optkit_decision_seconds", "Cache + router decision time (the gateway's "
                                  "overhead before a backend is called)", buckets=LATENCY_BUCKETS, registry=r)
        self.backend = Histogram("optkit_backend_seconds", "Backend call latency", ["backend"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("optkit_cache_hits", "Cache hits by layer", ["layer"], registry=r)
        self.cache_misses = Counter("optkit_cache_misses", "Cache lookups that missed", registry=r)
        self.fallbacks = Counter("optkit_fallbacks", "Requests moved to a fallback backend",
                                 ["src", "dst", "reason"], registry=r)
        self.errors = Counter("optkit_errors", "Error replies by type", ["type"], registry=r)
        self.breaker_open = Gauge("optkit_breaker_open", "1 while a backend's circuit breaker is open",
                                  ["backend"], registry=r)
        self.cache_entries = Gauge("optkit_cache_entries", "Entries in the exact-match layer", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
