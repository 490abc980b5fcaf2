"""serve.yaml: how `optkit serve` fronts a bundle — the backends (OpenAI-compatible URLs), which router output
goes to which backend, timeouts, fault handling and the cache policy.

Export writes one into the bundle; `optkit serve BUNDLE --config other.yaml` replaces it. Unknown keys are errors
(the recipe's rule): a misspelled `fallbak:` must not silently turn fallback off. API keys never appear here,
only the name of the environment variable that holds one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    retries: int = Field(2, ge=0, le=10, description="Retries on 429 / 5xx / dropped connections, honouring "
                         "Retry-After, never past the request deadline.")
    backoff_s: float = Field(0.25, ge=0, description="First retry wait when the backend sends no Retry-After "
                             "(doubles per retry).")
    fallback: Optional[str] = Field(None, description="Backend that takes a request this one failed (down, 5xx "
                                    "after retries, over its deadline, circuit open).")
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
    max_entries: int = Field(100_000, ge=1, description="Entries kept (oldest evicted first).")
    max_entries_per_tenant: Optional[int] = Field(None, ge=1, description="One tenant's inserts evict only its own "
                                                  "entries beyond this many.")
    ttl_s: Optional[float] = Field(None, gt=0, description="Entry lifetime; default = cache.json's ttl_s.")


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
    cache: CachePolicy = Field(default_factory=CachePolicy)

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
        for model, backend in self.routes.items():
            if backend not in self.backends:
                raise ValueError(f"routes.{model}: no backend '{backend}'")
        if self.default_backend not in self.backends:
            raise ValueError(f"default_backend: no backend '{self.default_backend}'")
        return self


def load_serve_config(path: str | Path) -> ServeConfig:
    """The validated serve.yaml at `path`; every problem is one OptkitError line naming the key."""
    import yaml

    from toolkit.config.loading import format_validation_error, read_utf8

    path = Path(path)
    if not path.is_file():
        raise OptkitError(f"serve config not found: {path}")
    try:
        data = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as exc:
        raise OptkitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise OptkitError(f"{path}: a serve config is a YAML mapping (backends:, routes:, ...)")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise OptkitError(format_validation_error(exc, str(path), ServeConfig)) from None
