"""serve.yaml: how `optkit serve` fronts a bundle — the backends (OpenAI-compatible URLs), which router output
goes to which backend, timeouts, fault handling and the cache policy.

Export writes one into the bundle; `optkit serve BUNDLE --config other.yaml` replaces it. Unknown keys are errors
(the recipe's rule): a misspelled `fallbak:` must not silently turn fallback off. API keys never appear here,
only the name of the environment variable that holds one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator

from toolkit.config.base import Section
from toolkit.errors import OptkitError

# Route labels the gateway reports for cache hits; a backend may not take one of these names.
CACHE_ROUTES = ("exact-cache", "semantic-cache")


class BackendConfig(Section):
    base_url: str = Field(description="OpenAI-compatible base URL, ending in /v1 (vLLM serve, llama.cpp server, "
                          "an API).")
    model: str = Field(min_length=1, description="Model name sent upstream; a client naming it is passed through "
                       "unrouted.")
    api_key_env: Optional[str] = Field(None, description="Environment variable holding this backend's API key "
                                       "(never logged). None = no key.")
    timeout_s: float = Field(30.0, gt=0, description="Deadline of one call to this backend; over it counts as a "
                             "failure (falls back when `fallback` is set).")
    max_concurrency: int = Field(16, ge=1, description="Requests in flight to this backend at once; the rest wait "
                                 "(within the request deadline).")
    queue_timeout_s: float = Field(2.0, gt=0, description="With a fallback: the longest a request waits for a free "
                                   "slot here before the fallback takes it (reason busy); without one it waits "
                                   "within the request deadline.")
    retries: int = Field(2, ge=0, le=10, description="Retries on 429 / 5xx / dropped connections, honouring "
                         "Retry-After, never past the request deadline.")
    backoff_s: float = Field(0.25, ge=0, description="First retry wait when the backend sends no Retry-After "
                             "(doubles per retry).")
    fallback: Optional[str] = Field(None, description="Backend that takes a request this one failed or refused "
                                    "(down, 5xx after retries, over its deadline, circuit open, slots busy past "
                                    "queue_timeout_s, a 400 such as a prompt over its context).")
    breaker_failures: int = Field(3, ge=1, description="Consecutive failures that open the circuit breaker.")
    breaker_cooldown_s: float = Field(10.0, gt=0, description="Seconds an open breaker sends traffic straight to "
                                      "the fallback before one trial request is let through.")

    @model_validator(mode="after")
    def _url(self) -> "BackendConfig":
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got '{self.base_url[:40]}'")
        return self


class CachePolicy(Section):
    enabled: bool = Field(True, description="Serve exact and semantic cache hits.")
    semantic: bool = Field(True, description="Use the bundle's cache.json semantic layer (off = exact matches "
                           "only).")
    cache_sampled: bool = Field(False, description="Also cache requests with temperature > 0 (their answers vary "
                                "by design, so by default they are neither served from nor stored in the cache).")
    default_temperature: float = Field(1.0, ge=0, description="Temperature assumed when a request sends none "
                                       "(the OpenAI API default is 1).")
    max_entries: Optional[int] = Field(None, ge=1, description="Entries kept (oldest evicted first); default = "
                                       "cache.json's max_entries (100,000 without a cache.json).")
    max_entries_per_tenant: Optional[int] = Field(None, ge=1, description="One tenant's inserts evict only its own "
                                                  "entries beyond this many, counted across all its conversation "
                                                  "contexts, models and parameters, in the exact and semantic "
                                                  "layers alike; default = cache.json's max_entries_per_namespace.")
    ttl_s: Optional[float] = Field(None, gt=0, description="Entry lifetime; default = cache.json's ttl_s.")
    store: Literal["memory", "redis"] = Field(
        "memory", description="Where cache entries live, exact and semantic layers alike: memory = this gateway "
        "process; redis = one Redis server shared by every replica (entries, their TTL, the limits), also for an "
        "exact-only bundle (no cache.json).")
    redis_url: Optional[str] = Field(None, description="store: redis: redis://host:port/db (or rediss://, "
                                     "unix://). No password here: put a URL with one in the redis_url_env variable.")
    redis_url_env: str = Field("OPTKIT_REDIS_URL", min_length=1, description="Environment variable holding the "
                               "Redis URL; wins over redis_url and may carry a password (never logged).")
    redis_prefix: str = Field("optkit", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="Key prefix in Redis; "
                              "replicas share entries when prefix and cache config match.")

    @model_validator(mode="after")
    def _redis_url(self) -> "CachePolicy":
        from urllib.parse import urlsplit

        if self.redis_url is not None:
            parts = urlsplit(self.redis_url)
            if parts.scheme not in ("redis", "rediss", "unix"):
                raise ValueError("redis_url must start with redis://, rediss:// or unix://")
            if parts.password or "@" in parts.netloc:
                raise ValueError(f"redis_url must not hold credentials: put that URL in ${self.redis_url_env}")
        return self

    def store_settings(self) -> dict:
        """SemanticCache.load's store arguments ({} for memory); the URL from the environment wins."""
        if self.store == "memory":
            return {}
        url = os.environ.get(self.redis_url_env) or self.redis_url
        if not url:
            raise OptkitError(f"serve config: cache.store is redis but neither ${self.redis_url_env} nor "
                              "cache.redis_url names the server")
        return {"store": "redis", "redis_url": url, "redis_prefix": self.redis_prefix}


class AuditConfig(Section):
    enabled: bool = Field(True, description="Audit the bundle's guarantees online (shadow checks + /v1/feedback).")
    sample_rate: float = Field(0.05, ge=0, le=1, description="Fraction of semantic-cache hits and of student-routed "
                               "requests re-asked to the teacher in the background (never delays the reply).")
    teacher: str = Field("teacher", description="Backend whose fresh answer is the reference; skipped while its "
                         "breaker is open or its slots are all busy.")
    metric: Literal["agreement", "exact", "f1", "rouge_l"] = Field("agreement", description="How a served answer is judged against the teacher's: agreement "
                        "(evaluate's teacher agreement: same label when `labels` is set, else normalized exact "
                        "match) or exact / f1 / rouge_l (acceptable when >= min_score).")
    labels: Optional[list[str]] = Field(None, description="Label set for metric agreement (evaluate's rule for "
                                        "class-label tasks).")
    min_score: float = Field(0.5, ge=0, le=1, description="exact / f1 / rouge_l: the score that counts as an "
                             "acceptable answer.")
    confidence: Optional[float] = Field(None, gt=0, lt=1, description="One-sided confidence of the exported "
                                        "bounds; default: the bundle's (cache.json / router calibration), else "
                                        "0.95.")
    epsilon: Optional[float] = Field(None, gt=0, lt=1, description="False-hit target; default: cache.json's "
                                     "epsilon.")
    quality_target: Optional[float] = Field(None, gt=0, le=1, description="Routed quality-ratio target; default: "
                                            "the router's calibrated min_quality.")
    queue_size: int = Field(256, ge=1, description="Checks waiting for the teacher; more are dropped (counted).")
    concurrency: int = Field(1, ge=1, description="Teacher calls the audit makes at once.")
    remember_ids: int = Field(100_000, ge=1, description="Response ids kept for /v1/feedback (oldest dropped).")
    min_checks: int = Field(10, ge=1, description="Checks of a kind before its bounds are compared with the target "
                            "(gauges are exported from the first check).")
    warn_interval_s: float = Field(60.0, ge=0, description="At most one bound-crossing warning per check kind in "
                                   "this many seconds.")


class TrafficLogConfig(Section):
    enabled: bool = Field(False, description="Log every completed request as one JSONL line (opt-in) that "
                          "`collect.backend: log` imports as teacher records.")
    path: str = Field("traffic.jsonl", min_length=1, description="The log file (relative to the working "
                      "directory); one per gateway replica. Rotated files are named <stem>.<UTC time>Z<suffix>.")
    rotate_bytes: Optional[int] = Field(100_000_000, ge=1024, description="Rotate when the file would grow past "
                                        "this size; null = never.")
    keep_files: Optional[int] = Field(None, ge=1, description="Rotated files kept (oldest deleted); null = all.")
    sample_rate: float = Field(1.0, ge=0, le=1, description="Fraction of completed requests logged.")
    redact_fields: list[str] = Field(["user", "metadata"], description="Request fields (at any depth of the "
                                     "logged request, messages included) whose values are written as ***.")
    redact_patterns: list[str] = Field([r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}", r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"],
                                       description="Regular expressions masked (***) in prompts and answers; the "
                                       "backends' API keys and URL credentials are always masked.")
    queue_size: int = Field(10_000, ge=1, description="Lines waiting for the writer thread; beyond it lines are "
                            "dropped (counted), never the reply delayed.")

    @model_validator(mode="after")
    def _patterns(self) -> "TrafficLogConfig":
        import re

        for p in self.redact_patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"redact_patterns: {p!r} is not a regular expression ({exc})") from None
        return self


class DecisionTextConfig(Section):
    template: str = Field(min_length=1, description="The recipe's data.prompt_template: a user turn that is this "
                          "template filled in is decided on its `column` value, the text route and cache were fit "
                          "on; any other turn on the whole turn (counted: optkit_decision_text{source=whole_turn}).")
    column: str = Field(min_length=1, description="The recipe's data.prompt_column: the template field read back "
                        "as the decision text.")

    @model_validator(mode="after")
    def _readable(self) -> "DecisionTextConfig":
        from toolkit.collect.prompts import template_problem
        from toolkit.serve.decision_text import compile_template

        problem = template_problem(self.template)
        if problem:
            raise ValueError(f"template: {problem}")
        compile_template(self.template, self.column)  # raises ValueError naming what cannot be read back
        return self


class ServeConfig(Section):
    model_name: str = Field("optkit", min_length=1, description="The model id clients ask for to get the routed "
                            "system (listed by /v1/models with each backend's own model).")
    backends: dict[str, BackendConfig] = Field(description="Backends by name; the name is what the "
                                               "x-optkit-route header reports (student, teacher).")
    routes: dict[str, str] = Field(default_factory=dict, description="Router model name -> backend name. Default: "
                                   "the router's strong model (or one named teacher) -> teacher, others -> student.")
    default_backend: str = Field("student", description="Backend for cache misses when the bundle has no router.")
    request_timeout_s: float = Field(60.0, gt=0, description="Whole-request deadline, retries and fallback "
                                     "included.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (413 above).")
    tenant_header: Optional[str] = Field(None, description="Trusted header naming the tenant (set it only behind a "
                                         "proxy that authenticates it); default: tenant = hash of the client's API "
                                         "key.")
    api_keys_env: Optional[str] = Field(None, min_length=1, description="Environment variable holding the API "
                                        "keys clients must send (comma-separated; checked on /v1/*, never logged). "
                                        "None = no client authentication: put the gateway behind a proxy that "
                                        "authenticates.")
    passthrough: bool = Field(True, description="A client naming a backend's own model reaches that backend "
                              "directly (no cache, no router); false = only model_name is served.")
    decision_text: Optional[DecisionTextConfig] = Field(None, description="How to read the decision text out of "
                                                        "a user turn (export writes the recipe's template and "
                                                        "prompt column). None = the whole last user turn.")
    cache: CachePolicy = Field(default_factory=CachePolicy)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    traffic_log: TrafficLogConfig = Field(default_factory=TrafficLogConfig)

    @model_validator(mode="after")
    def _names(self) -> "ServeConfig":
        if not self.backends:
            raise ValueError("backends: name at least one backend")
        for name, b in self.backends.items():
            if name in CACHE_ROUTES or name == self.model_name:
                raise ValueError(f"backends: '{name}' is reserved (cache routes and model_name)")
            if b.fallback is not None and b.fallback not in self.backends:
                raise ValueError(f"backends.{name}.fallback: no backend '{b.fallback}'")
            if b.fallback == name:
                raise ValueError(f"backends.{name}.fallback: a backend cannot fall back to itself")
            if b.fallback is not None and b.timeout_s >= self.request_timeout_s:  # a slow one would eat it all
                raise ValueError(f"backends.{name}.timeout_s: {b.timeout_s:g}s leaves its fallback no time within "
                                 f"request_timeout_s {self.request_timeout_s:g}s; make it shorter")
        for model, backend in self.routes.items():
            if backend not in self.backends:
                raise ValueError(f"routes.{model}: no backend '{backend}'")
        if "teacher" in self.audit.model_fields_set and self.audit.teacher not in self.backends:
            raise ValueError(f"audit.teacher: no backend '{self.audit.teacher}'")  # unset: feedback-only audit
        if self.default_backend not in self.backends:
            raise ValueError(f"default_backend: no backend '{self.default_backend}'")
        return self


def load_serve_config(path: str | Path) -> ServeConfig:
    """The validated serve.yaml at `path`; every problem is one OptkitError line naming the key."""
    from toolkit.config.loading import format_validation_error, read_yaml

    path = Path(path)
    data = read_yaml(path, "serve config")
    if not isinstance(data, dict):
        raise OptkitError(f"{path}: a serve config is a YAML mapping (backends:, routes:, ...)")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise OptkitError(format_validation_error(exc, str(path), ServeConfig)) from None
