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
        self.decision_text = Counter("optkit_decision_text", "Routed-model requests by where their decision text "
                                     "came from: template = the prompt column read out of the bundle's template, "
                                     "whole_turn = the turn did not match it", ["source"], registry=r)

        # The online audit (toolkit/serve/audit.py); kind = cache | route.
        self.audit_checks = Counter("optkit_audit_checks", "Audit checks by kind (cache | route) and source "
                                    "(shadow | feedback)", ["kind", "source"], registry=r)
        self.audit_failures = Counter("optkit_audit_failed_checks", "Checks that failed: cache = a false hit, "
                                      "route = the student disagreed with the teacher", ["kind"], registry=r)
        self.audit_skipped = Counter("optkit_audit_skipped", "Sampled checks not made (queue_full, "
                                     "teacher_unavailable, teacher_busy, teacher_error)", ["reason"], registry=r)
        self.audit_queue = Gauge("optkit_audit_queue", "Checks waiting for the teacher", registry=r)
        self.audit_rate = Gauge("optkit_audit_rate", "Realized rate: cache = false-hit rate, route = routed quality "
                                "ratio (vs always-teacher)", ["kind"], registry=r)
        self.audit_lower = Gauge("optkit_audit_rate_lower", "One-sided lower confidence bound of optkit_audit_rate",
                                 ["kind"], registry=r)
        self.audit_upper = Gauge("optkit_audit_rate_upper", "One-sided upper confidence bound of optkit_audit_rate",
                                 ["kind"], registry=r)
        self.audit_target = Gauge("optkit_audit_target", "The bundle's guarantee: cache = epsilon (max false-hit "
                                  "rate), route = quality target (min ratio); NaN = none", ["kind"], registry=r)
        self.audit_confidence = Gauge("optkit_audit_confidence", "Confidence of the one-sided bounds", ["kind"],
                                      registry=r)
        self.audit_breached = Gauge("optkit_audit_breached", "1 while the bound shows the target is missed",
                                    ["kind"], registry=r)
        self.audit_certified = Gauge("optkit_audit_certified", "1 while the bound certifies the target",
                                     ["kind"], registry=r)
        self.route_agreement = Gauge("optkit_audit_route_agreement", "Share of checked student answers that agree "
                                     "with the teacher", registry=r)
        self.route_student_share = Gauge("optkit_audit_route_student_share", "Share of router decisions sent to a "
                                         "non-teacher backend", registry=r)
        self.feedback = Counter("optkit_feedback", "POST /v1/feedback verdicts by route served", ["route", "correct"],
                                registry=r)
        self.shift_flagged = Counter("optkit_shift_flagged", "Prompts the router's shift guard flagged", ["action"],
                                     registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
