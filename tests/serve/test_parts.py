"""The gateway's parts without servers: serve.yaml validation, the cache key space, the breaker, the exact
layer, and export's serve.yaml / serve.sh gateway mode (all fast)."""

from __future__ import annotations

import pytest
import yaml

from toolkit.config.serve import ServeConfig, load_serve_config
from toolkit.errors import OptkitError
from toolkit.serve.backends import Breaker
from toolkit.serve.decide import ExactStore
from toolkit.serve.protocol import ChatRequest, keyed, tenant_of

BACKENDS = {"student": {"base_url": "http://127.0.0.1:8000/v1", "model": "s", "fallback": "teacher"},
            "teacher": {"base_url": "https://api.example.com/v1", "model": "t", "api_key_env": "K"}}


def write(tmp_path, data) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("data, message", [
    ({"backends": BACKENDS, "fallbak": "x"}, "fallbak: unknown key"),
    ({"backends": {**BACKENDS, "student": {**BACKENDS["student"], "fallback": "nobody"}}}, "no backend 'nobody'"),
    ({"backends": {**BACKENDS, "student": {**BACKENDS["student"], "fallback": "student"}}}, "itself"),
    ({"backends": BACKENDS, "routes": {"m": "ghost"}}, "routes.m: no backend 'ghost'"),
    ({"backends": {"exact-cache": BACKENDS["student"]}}, "reserved"),
    ({"backends": {**BACKENDS, "teacher": {**BACKENDS["teacher"], "timeout_s": -1}}}, "timeout_s"),
    ({"backends": {**BACKENDS, "teacher": {**BACKENDS["teacher"], "base_url": "ftp://x"}}}, "http"),
    ({"backends": {**BACKENDS, "student": {**BACKENDS["student"], "timeout_s": 60}}, "request_timeout_s": 60},
     "backends.student.timeout_s: 60s leaves its fallback no time"),
    ({"backends": {}}, "at least one"),
])
def test_serve_yaml_refuses_mistakes(tmp_path, data, message):
    with pytest.raises(OptkitError, match=message):
        load_serve_config(write(tmp_path, data))


def test_serve_yaml_ok(tmp_path):
    cfg = load_serve_config(write(tmp_path, {"backends": BACKENDS}))
    assert cfg.backends["student"].fallback == "teacher" and cfg.cache.cache_sampled is False


def req(prompt="hi", system=None, **params):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    body = {"model": "m", "messages": messages, "temperature": 0, **params}
    return ChatRequest.model_validate(body), body


def key(prompt="hi", tenant="a", system=None, no_cache=False, **params):
    r, body = req(prompt, system, **params)
    return keyed("chat", r, body, tenant, "m", ServeConfig(backends=BACKENDS).cache, no_cache, False)


def test_key_space_splits_on_everything_that_changes_the_answer():
    base = key()
    assert base.query == "hi" and base.lookup and base.store
    for other in (key(tenant="b"), key(system="be terse"), key(max_tokens=5), key(stop=["\n"]),
                  key(response_format={"type": "json_object"})):
        assert other.namespace != base.namespace and other.query == "hi"
    assert key(stream=True, user="x").namespace == base.namespace  # transport details do not split it
    assert key(prompt="other").namespace == base.namespace  # the query itself is what the cache compares
    sampled = key(temperature=0.7)
    assert not sampled.lookup and not sampled.store
    absent = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    policy = ServeConfig(backends=BACKENDS).cache
    assert not keyed("chat", absent, {"model": "m"}, "a", "m", policy, False, False).lookup  # default T = 1
    bypass = key(no_cache=True)
    assert not bypass.lookup and bypass.store
    # 0 and 0.0, 1 and 1.0 are one request (json spelled them apart and split the cache)
    assert key(temperature=0.0, top_p=1).namespace == key(temperature=0, top_p=1.0).namespace
    assert key(top_p=0.5).namespace != key(top_p=1).namespace


def test_tenant_from_key_hash_or_trusted_header():
    a = tenant_of({"authorization": "Bearer sk-secret-1"}, None)
    assert a != tenant_of({"authorization": "Bearer sk-secret-2"}, None) and "sk-secret" not in a
    assert tenant_of({"x-tenant": "acme", "authorization": "Bearer k"}, "x-tenant") == "h:acme"
    assert tenant_of({"x-tenant": "acme"}, None) == "anonymous"  # an untrusted header is ignored


def test_breaker_opens_then_lets_one_trial_through():
    now = [0.0]
    b = Breaker(failures=2, cooldown_s=5, clock=lambda: now[0])
    b.failure()
    assert b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    now[0] = 6.0
    assert b.allow() and not b.allow()  # half-open: exactly one trial
    b.failure()
    assert b.state == "open"
    now[0] = 12.0
    assert b.allow() and not b.allow()
    now[0] = 17.5  # that trial never reported back: another one may go
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_exact_store_namespaces_ttl_and_bound():
    now = [0.0]
    s = ExactStore(max_entries=2, ttl_s=10, clock=lambda: now[0])
    s.put("Hello  world", "A", {"tenant": "a"})
    assert s.get("Hello world", {"tenant": "a"}) == "A" and s.get("Hello world", {"tenant": "b"}) is None
    assert s.get("hello world", {"tenant": "a"}) is None  # case is kept: it can change meaning
    s.put("x", "X", "n")
    s.put("y", "Y", "n")
    assert len(s) == 2 and s.get("Hello world", {"tenant": "a"}) is None  # oldest evicted
    now[0] = 11.0
    assert s.get("x", "n") is None  # expired


def test_both_cache_layers_expire_an_entry_at_the_same_age():
    """The exact layer served an entry aged exactly ttl_s that the semantic layer had expired (> vs >=)."""
    import numpy as np

    from toolkit.cache import SemanticCache

    now = [0.0]
    exact = ExactStore(max_entries=10, ttl_s=10, clock=lambda: now[0])
    semantic = SemanticCache(threshold=0.9, ann="numpy", ttl_s=10, clock=lambda: now[0])
    exact.put("q", "A", "n")
    semantic.insert_many(["q"], ["A"], "n", vectors=np.ones((1, 4), np.float32))
    now[0] = 9.999
    assert exact.get("q", "n") == "A" and semantic.lookup_vector(np.ones(4, np.float32), "n").answer == "A"
    now[0] = 10.0
    assert exact.get("q", "n") is None and semantic.lookup_vector(np.ones(4, np.float32), "n") is None


def test_export_writes_a_serve_yaml_that_serve_accepts(tmp_path):
    import subprocess

    from toolkit.config import recipe_from_dict
    from toolkit.export.serve import serve_script
    from toolkit.serve.bundle_config import serve_yaml

    models = [{"name": "student", "kind": "hf", "path": "models/student", "served_name": "run-student"},
              {"name": "int8", "kind": "hf", "path": "models/int8", "served_name": "run-int8"},
              {"name": "gguf-Q4_K_M", "kind": "gguf", "path": "gguf/m.gguf"}]
    recipe = recipe_from_dict({
        "name": "run", "teacher": {"model": "big-model"}, "data": {"path": "prompts.jsonl"},
        "collect": {"backend": "openai", "openai": {"base_url": "https://api.example.com/v1",
                                                    "api_key_env": "TEACHER_KEY"}},
        "evaluate": {"system": {"student": "int8"}}})
    path = tmp_path / "serve.yaml"
    path.write_text(serve_yaml(models, "run", 9000, recipe))
    cfg = load_serve_config(path)
    student, teacher = cfg.backends["student"], cfg.backends["teacher"]
    script = serve_script(models, "run", 9000)
    assert "--served-model-name run-int8 --port 9001" in script  # the port serve.sh starts it on
    assert (student.base_url, student.model, student.fallback) == ("http://127.0.0.1:9001/v1", "run-int8", "teacher")
    assert (teacher.base_url, teacher.model, teacher.api_key_env) == ("https://api.example.com/v1", "big-model",
                                                                      "TEACHER_KEY")
    assert cfg.model_name == "run" and "./serve.sh int8" in path.read_text()
    (tmp_path / "serve.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "serve.sh")]).returncode == 0
    assert 'gateway)\n    exec optkit serve . --config serve.yaml "${@:2}"' in script


def test_only_complete_streams_are_answers():
    from toolkit.serve.protocol import StreamAnswer, sse

    def feed(events, done=True):
        s = StreamAnswer("chat")
        for e in events:
            s.feed(sse(e).decode().strip())
        if done:
            s.feed("data: [DONE]")
        return s.answer()

    part = {"choices": [{"index": 0, "delta": {"content": "Par"}, "finish_reason": None}]}
    end = {"choices": [{"index": 0, "delta": {"content": "is"}, "finish_reason": "stop"}]}
    assert feed([part, end]) == {"text": "Paris", "finish_reason": "stop"}
    assert feed([part, end], done=False) is None  # cut before [DONE]
    assert feed([part], done=True) is None  # no finish_reason: cut mid-answer
    assert feed([part, {"choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]}]) is None


def test_an_edited_serve_yaml_is_served_and_said(tmp_path, caplog):
    """serve.yaml is the bundle file meant to be edited (backend URLs), so it is served; but it decides where
    requests and API keys go, so a copy that is not the exported one is said in the log (verify flags it too)."""
    import json

    from toolkit.bundle import FORMAT
    from toolkit.export.build import file_table
    from toolkit.serve.system import load_config

    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({"backends": BACKENDS}))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "models": [],
                                                        "files": file_table(tmp_path)}))
    with caplog.at_level("WARNING", logger="optkit.serve"):
        load_config(tmp_path, None)
    assert not caplog.records
    edited = {"backends": {**BACKENDS, "teacher": {**BACKENDS["teacher"], "base_url": "https://elsewhere/v1"}}}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(edited))
    with caplog.at_level("WARNING", logger="optkit.serve"):
        cfg = load_config(tmp_path, None)
    assert cfg.backends["teacher"].base_url == "https://elsewhere/v1"
    assert any("serve.yaml is not the exported one" in r.getMessage() for r in caplog.records)


def test_the_gateway_keeps_the_recipes_cache_limits_unless_serve_yaml_sets_its_own(tmp_path):
    """serve.yaml's defaults (100,000 entries, no per-tenant quota) always overrode cache.json's runtime limits:
    a recipe's cache.max_entries_per_namespace was silently dropped in the gateway."""
    import json
    from types import SimpleNamespace

    import numpy as np

    from toolkit.cache import SemanticCache
    from toolkit.cache.runtime import PROBES, embed_texts
    from toolkit.serve.system import _cache

    def embedder(texts):  # one fixed random vector per word (no model needed for the limits)
        out = np.zeros((len(texts), 16), np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i] += np.random.default_rng(sum(map(ord, word))).standard_normal(16).astype(np.float32)
        return out

    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"format": "optkit-cache/1", "similarity": {"kind": "cosine"}, "threshold": 0.9,
                                "embedder": {"model": "words", "dim": 16,
                                             "probe_vectors": embed_texts(embedder, PROBES).tolist()},
                                "runtime": {"max_entries": 50, "max_entries_per_namespace": 3}}))
    bundle = SimpleNamespace(cache=lambda **overrides: SemanticCache.load(path, embedder=embedder, **overrides))
    default = _cache(bundle, ServeConfig.model_validate({"backends": BACKENDS}), None)
    assert (default.max_entries, default.max_entries_per_namespace) == (50, 3)
    for i in range(10):  # every conversation context is its own namespace; the quota counts the tenant's
        default.insert(f"tenant question number {i}", i, {"tenant": "a", "context": str(i)})
    default.insert("another tenant's question", -1, {"tenant": "b", "context": "0"})
    assert len(default) == 4 and default.quota_by == "tenant"
    own = _cache(bundle, ServeConfig.model_validate({"backends": BACKENDS, "cache": {
        "max_entries": 7, "max_entries_per_tenant": 5}}), None)
    assert (own.max_entries, own.max_entries_per_namespace) == (7, 5)


def test_the_gateways_exact_layer_counts_the_tenant_quota_too(bundle):
    """The exact layer (in front of the semantic one) had no quota: a tenant flooding it through many conversation
    contexts evicted every other tenant's exact entries. It takes serve.yaml's max_entries_per_tenant (else
    cache.json's) per tenant, like the semantic layer."""
    from toolkit.serve.system import load_decider

    cfg = ServeConfig.model_validate({"backends": BACKENDS, "cache": {"max_entries_per_tenant": 2}})
    decider = load_decider(bundle, cfg)
    exact, semantic = decider.exact, decider.cache
    assert (exact.quota, exact.quota_by, semantic.max_entries_per_namespace, semantic.quota_by) == (
        2, "tenant", 2, "tenant")
    exact.put("mine", {"v": 0}, {"tenant": "b", "context": "0"})
    for i in range(5):
        exact.put(f"q{i}", {"v": i}, {"tenant": "a", "context": str(i)})
    assert len(exact) == 3 and exact.get("mine", {"tenant": "b", "context": "0"}) == {"v": 0}


def test_a_recipe_whose_prompts_come_from_a_traffic_log_decides_on_the_whole_user_turn():
    """Prompts imported from a log are whole user turns (route and cache were fit on those); reading the template's
    column back out of the turn in the gateway would route on another text than the one calibrated."""
    from toolkit.config import recipe_from_dict
    from toolkit.serve.bundle_config import _decision_text

    base = {"name": "t", "teacher": {"model": "smollm2-135m-instruct"},
            "data": {"path": "d.jsonl", "prompt_template": 'Customer message: "{prompt}"\n\nWhich category?'}}
    assert _decision_text(recipe_from_dict(base))["column"] == "prompt"
    logged = {**base, "collect": {"backend": "log", "log": {"paths": ["traffic.jsonl"]}}}
    assert _decision_text(recipe_from_dict(logged)) is None
    from_data = {**base, "collect": {"backend": "log", "log": {"paths": ["traffic.jsonl"], "prompts": "data"}}}
    assert _decision_text(recipe_from_dict(from_data)) is not None  # data prompts: the template's column again
