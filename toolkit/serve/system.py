"""The bundle's decision parts as the gateway runs them: its Router and SemanticCache, loaded through
toolkit.bundle (every file checked against the manifest first), wired into the shared Decider."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from toolkit.config.serve import ServeConfig, load_serve_config
from toolkit.errors import OptkitError
from toolkit.cache.exact import exact_store
from toolkit.serve.decide import Decider, target_for

log = logging.getLogger("optkit.serve")
SERVE_YAML = "serve.yaml"


def load_config(bundle_dir: Path, config: Optional[Path]) -> ServeConfig:
    if not Path(bundle_dir).is_dir():
        raise OptkitError(f"{bundle_dir}: no such bundle directory")
    path = Path(config) if config else Path(bundle_dir) / SERVE_YAML
    if config is None and not path.is_file():
        raise OptkitError(f"{bundle_dir}: the bundle has no {SERVE_YAML}; pass --config serve.yaml (backends: "
                          "student/teacher base_url + model)")
    if config is None:
        _say_if_edited(Path(bundle_dir))
    return load_serve_config(path)


def _say_if_edited(bundle_dir: Path) -> None:
    """serve.yaml is the one bundle file meant to be edited (backend URLs): served as it is, but said in the log,
    because it decides where requests -- and the backends' API keys -- go, and `optkit verify` will flag it."""
    from toolkit.bundle import Bundle

    try:
        Bundle.open(bundle_dir).checked([SERVE_YAML])
    except OptkitError as exc:
        log.warning("serve: %s is not the exported one (%s); serving with it as it is now", SERVE_YAML,
                    str(exc).split(": ", 1)[-1][:200])


def _same_truncation(router, bundle) -> bool:
    """The probe check compares short texts only: a transformer router that truncates prompts at another length
    than the cache's embedder would embed long prompts differently from evaluate's replay. Share only when equal."""
    feats = router.spec["features"]
    if feats.get("embedding") == "static":
        return True  # the probe check then decides
    try:
        from toolkit.models import resolve

        model = json.loads(bundle.path(bundle.manifest["cache"]).read_text())["embedder"]["model"]
        st = json.loads((Path(resolve(model)) / "sentence_bert_config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, OptkitError):
        return False
    return st.get("max_seq_length") == feats.get("max_seq_length")


EXACT_MAX_ENTRIES = 100_000  # the exact layer's limit when neither serve.yaml nor a cache.json sets one


def _cache(bundle, cfg: ServeConfig, router):
    """The semantic cache, sharing the router's embedder when the cache's own probe check accepts it (then a
    request is embedded once); else the embedder cache.json names."""
    policy = cfg.cache
    overrides = dict(policy.store_settings())  # store: memory | redis (shared by replicas: toolkit/cache/store_redis)
    # A namespace here is tenant x model x conversation context x parameters: the quota counts per tenant, so one
    # tenant's many contexts cannot evict another tenant's entries.
    overrides["quota_by"] = "tenant"
    # serve.yaml's limits where it sets them; cache.json's (the recipe's cache section) otherwise
    for key, value in (("max_entries", policy.max_entries), ("max_entries_per_namespace",
                                                            policy.max_entries_per_tenant), ("ttl_s", policy.ttl_s)):
        if value is not None:
            overrides[key] = value
    if router is not None and _same_truncation(router, bundle):
        try:
            return bundle.cache(embedder=router.embedder, **overrides)
        except OptkitError as exc:
            log.info("serve: the cache does not share the router's embedder (%s); loading its own", exc)
    return bundle.cache(**overrides)


def _cascade(bundle, cfg: ServeConfig, router):
    """The bundle's cascade (route.mode = cascade) and the backend it escalates to; (None, 'teacher') if none."""
    if not bundle.manifest.get("cascade"):
        return None, "teacher"
    from toolkit.route.cascade import Cascade

    cascade = Cascade.load(bundle.path(bundle.manifest["cascade"]))
    target = cfg.routes.get(cascade.strong) or ("teacher" if router is None else
                                                 target_for(router, cascade.strong, cfg.default_backend, cfg.routes))
    if target not in cfg.backends:
        raise OptkitError(f"serve config: the cascade escalates to backend '{target}', which is not in backends "
                          f"({', '.join(cfg.backends)}); map '{cascade.strong}' under routes:")
    log.info("serve: cascade mode: %s answers, escalates to %s below confidence %.4g", cfg.default_backend, target,
             cascade.threshold)
    return cascade, target


def load_decider(bundle_dir: Path, cfg: ServeConfig) -> Decider:
    from toolkit.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    router = bundle.router() if bundle.manifest.get("router") else None
    for name in ([] if router is None else router.models):
        target = target_for(router, name, cfg.default_backend, cfg.routes)
        if target not in cfg.backends:
            raise OptkitError(f"serve config: router model '{name}' goes to backend '{target}', which is not in "
                              f"backends ({', '.join(cfg.backends)}); map it under routes:")
    cache = None
    if cfg.cache.enabled and cfg.cache.semantic and bundle.manifest.get("cache"):
        cache = _cache(bundle, cfg, router)
    ttl = cfg.cache.ttl_s if cfg.cache.ttl_s is not None else getattr(cache, "ttl_s", None)
    # The one exact layer, in the configured store (redis: shared by replicas, also with no cache.json).
    limit = cfg.cache.max_entries or getattr(cache, "max_entries", None) or EXACT_MAX_ENTRIES
    quota = cfg.cache.max_entries_per_tenant or getattr(cache, "max_entries_per_namespace", None)
    exact = exact_store(limit, ttl, **cfg.cache.store_settings(), quota=quota, quota_by="tenant") \
        if cfg.cache.enabled else None
    cascade, escalate_to = _cascade(bundle, cfg, router)
    decider = Decider(cache, router, exact, target=lambda c: target_for(router, c, cfg.default_backend, cfg.routes),
                      default=cfg.default_backend, cascade=cascade, escalate_to=escalate_to)
    decider.decide("warm-up: load the embedder before the first request", "warm-up", use_cache=False)
    log.info("serve: router %s, semantic cache %s, shared embedding %s", router is not None, cache is not None,
             decider.shared)
    return decider
