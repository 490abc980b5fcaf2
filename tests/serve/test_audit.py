"""The online audit, live: a bundle whose cache.json threshold is deliberately loose (-1: every lookup hits) behind
the real gateway with audit.sample_rate 1.0. Every semantic hit and every student-routed answer is re-asked to the
teacher in the background; /metrics must show exactly those checks, the false hits the metric finds when the test
asks the teacher itself, bounds consistent with them, and the log the breach of the bundle's epsilon.
POST /v1/feedback adds checks; unknown ids are 404."""

from __future__ import annotations

import json
import math
import shutil
import time

import httpx
import pytest

from tests.serve.conftest import CANDIDATES, KEY, _stop, chat, serve_config, start_gateway

EPSILON, TARGET = 0.05, 0.9


def loose_bundle(src, dst):
    """The test bundle with cache.json threshold -1 and the guarantees an export would carry (epsilon, the
    router's min_quality goal); manifest hashes rewritten so the bundle stays intact."""
    from toolkit.bundle import MANIFEST
    from toolkit.export.build import file_table

    shutil.copytree(src, dst)
    cache = json.loads((dst / "cache.json").read_text())
    cache.update(threshold=-1.0, epsilon=EPSILON, confidence=0.95)
    (dst / "cache.json").write_text(json.dumps(cache))
    spec = json.loads((dst / "route/router.json").read_text())
    spec["calibration"] = {"goal": "min_quality", "goal_value": TARGET, "confidence": 0.9}
    (dst / "route/router.json").write_text(json.dumps(spec))
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["files"] = file_table(dst)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def scrape(gw) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(gw.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def bounds(k: int, n: int, conf: float) -> tuple[float, float]:
    from scipy.stats import binomtest

    lo = binomtest(k, n, alternative="greater").proportion_ci(confidence_level=conf).low
    hi = binomtest(k, n, alternative="less").proportion_ci(confidence_level=conf).high
    return lo, hi


def content(resp) -> str:
    return resp.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
@pytest.mark.server
def test_audit_counts_checks_bounds_warns_and_takes_feedback(bundle, teacher, student, tmp_path):
    from toolkit.evaluate.measure import agrees

    loose = loose_bundle(bundle, tmp_path / "bundle")
    cfg = serve_config(student.url, teacher.url, audit={"sample_rate": 1.0, "warn_interval_s": 0})
    gw = start_gateway(loose, tmp_path, cfg)
    try:
        # Router traffic (no cache lookups): every student-routed answer is checked against the teacher.
        routed = [gw.post("/v1/chat/completions", chat(p), headers={"Cache-Control": "no-cache",
                                                                   "Authorization": "Bearer route"})
                  for p in CANDIDATES[:10]]
        assert all(r.status_code == 200 for r in routed)
        students = [r for r in routed if r.headers["x-optkit-route"] == "student"]
        assert students and len(students) < len(routed)  # the router splits the candidates
        # Cache traffic: one miss fills the tenant's cache, every later prompt is a (loose) semantic hit.
        first = gw.post("/v1/chat/completions", chat(CANDIDATES[10]), headers={"Authorization": "Bearer c"})
        hits = [gw.post("/v1/chat/completions", chat(p), headers={"Authorization": "Bearer c"})
                for p in CANDIDATES[:10]]
        assert [h.headers["x-optkit-route"] for h in hits] == ["semantic-cache"] * len(hits)
        if first.headers["x-optkit-route"] == "student":
            students.append(first)

        deadline, m = time.monotonic() + 120, {}
        while time.monotonic() < deadline:  # the checks run in the background, after the replies
            m = scrape(gw)
            if (value(m, "optkit_audit_checks_total", kind="cache", source="shadow") >= len(hits)
                    and value(m, "optkit_audit_checks_total", kind="route", source="shadow") >= len(students)):
                break
            time.sleep(0.5)
        assert value(m, "optkit_audit_checks_total", kind="cache", source="shadow") == len(hits)
        assert value(m, "optkit_audit_checks_total", kind="route", source="shadow") == len(students)
        assert sum(v for (name, _), v in m.items() if name == "optkit_audit_skipped_total") == 0

        # The same judgment made here: the teacher asked directly, evaluate's metric on the cached answers.
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as client:
            fresh = [client.post(teacher.url + "/chat/completions", json={**chat(p), "model": "t"},
                                 timeout=90).json()["choices"][0]["message"]["content"] for p in CANDIDATES[:10]]
        false_hits = sum(1 - agrees(content(h), f, None) for h, f in zip(hits, fresh))
        failed = value(m, "optkit_audit_failed_checks_total", kind="cache")
        assert failed == false_hits and failed >= len(hits) // 2, (failed, false_hits)
        print(f"audit: {failed:g}/{len(hits)} false hits, route disagreements "
              f"{value(m, 'optkit_audit_failed_checks_total', kind='route'):g}/{len(students)}")
        lo, hi = bounds(int(failed), len(hits), 0.95)
        assert value(m, "optkit_audit_rate", kind="cache") == pytest.approx(failed / len(hits))
        assert value(m, "optkit_audit_rate_lower", kind="cache") == pytest.approx(lo)
        assert value(m, "optkit_audit_rate_upper", kind="cache") == pytest.approx(hi)
        assert lo > EPSILON and value(m, "optkit_audit_breached", kind="cache") == 1
        assert value(m, "optkit_audit_target", kind="cache") == EPSILON
        assert value(m, "optkit_audit_target", kind="route") == TARGET
        assert value(m, "optkit_audit_confidence", kind="route") == 0.9
        # Routed quality: 1 - f * (1 - agreement), f = student share of the router's decisions.
        f = value(m, "optkit_audit_route_student_share")
        assert f == pytest.approx(len(students) / (len(routed) + 1))  # + the cache tenant's first miss
        disagree = value(m, "optkit_audit_failed_checks_total", kind="route")
        assert value(m, "optkit_audit_rate", kind="route") == pytest.approx(1 - f * disagree / len(students))
        log = " ".join(gw.log.read_text().split())  # the console handler wraps long lines
        assert log.count("guarantee BREACHED: cache false-hit rate") == 1, log[-3000:]

        # Feedback: counted once per response, as a check of the kind that response was.
        rid = students[0].json()["id"]
        ok = gw.post("/v1/feedback", {"id": rid, "correct": False})
        assert ok.status_code == 200 and ok.json()["counted_as"] == "route", ok.text
        again = gw.post("/v1/feedback", {"id": rid, "correct": True})
        assert again.status_code == 200 and again.json()["counted_as"] is None
        hit = gw.post("/v1/feedback", {"id": hits[0].json()["id"], "correct": True})
        assert hit.json()["counted_as"] == "cache"
        teacher_id = next(r for r in routed if r.headers["x-optkit-route"] == "teacher").json()["id"]
        assert gw.post("/v1/feedback", {"id": teacher_id, "correct": True}).json()["counted_as"] is None
        streamed = gw.post("/v1/chat/completions", chat(CANDIDATES[11], stream=True),
                           headers={"Authorization": "Bearer c"})
        sid = json.loads(streamed.text.split("data: ", 2)[1].split("\n")[0])["id"]
        assert gw.post("/v1/feedback", {"id": sid, "correct": False}).json()["counted_as"] == "cache"
        after = scrape(gw)
        assert value(after, "optkit_audit_checks_total", kind="route", source="feedback") == 1
        assert value(after, "optkit_audit_checks_total", kind="cache", source="feedback") == 2
        assert value(after, "optkit_audit_failed_checks_total", kind="route") == disagree + 1
        assert value(after, "optkit_feedback_total", route="teacher", correct="true") == 1
        for body, status in (({"id": "chatcmpl-nope", "correct": True}, 404), ({"id": rid, "correct": "yes"}, 400),
                             ({"id": rid}, 400), ([1], 400)):
            bad = gw.post("/v1/feedback", body)
            assert bad.status_code == status and set(bad.json()["error"]) == {"message", "type", "param", "code"}
        for text in [gw.log.read_text(), *gw.seen]:
            assert KEY not in text
    finally:
        _stop(gw.proc)


# ------------------------------------------------------------------ the audit's parts, without servers


def auditor(clock=None, **cfg):
    from toolkit.config.serve import AuditConfig
    from toolkit.serve.audit import Auditor
    from toolkit.serve.metrics import Metrics

    now = [0.0]
    a = Auditor(AuditConfig(**cfg), {"epsilon": 0.1, "quality_target": 0.8}, Metrics(), clock=lambda: now[0])
    return a, now


def test_warns_once_per_crossing_rate_limited(caplog):
    a, now = auditor(warn_interval_s=60)
    with caplog.at_level("INFO", logger="optkit.serve"):
        for _ in range(60):
            a.record("cache", True, "shadow")  # 0 / 60 false hits: the upper bound certifies 0.1
        assert a.state["cache"] == "certified"
        now[0] = 10.0
        for _ in range(30):
            a.record("cache", False, "shadow")  # breached, but within 60 s of the last message: not yet logged
        assert a.state["cache"] == "certified" and not any(r.levelname == "WARNING" for r in caplog.records)
        now[0] = 100.0
        a.record("cache", False, "shadow")
        a.record("cache", False, "shadow")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "BREACHED" in warnings[0] and "epsilon 0.1" in warnings[0]
    s = a.summary("cache")
    assert s["lower"] > 0.1 and s["checks"] == 92 and math.isclose(s["rate"], 32 / 92)


def test_feedback_ids_are_bounded_and_routed_ratio_uses_the_student_share():
    a, _ = auditor(remember_ids=3)
    for i in range(5):
        a.remember(f"id{i}", "student", "route")
    assert a.feedback("id0", True) is None and a.feedback("id4", False)["counted_as"] == "route"
    for to_teacher in (True, True, False, False):
        a.decided(to_teacher)
    s = a.summary("route")
    assert s["student_share"] == 0.5 and s["rate"] == 0.5 and s["lower"] <= s["rate"] <= s["upper"]


def test_shift_guard_is_counted_and_sends_to_the_teacher(bundle):
    from toolkit.bundle import Bundle
    from toolkit.serve.decide import Decider

    router = Bundle.open(bundle).router()
    plain = Decider(router=router).decide("Name a color.")
    assert plain.shift is None  # no guard: never flagged

    class Guard:  # the interface the route stage's shift guard is read through
        def check(self, prompt, vector):
            return "teacher" if "zzz" in prompt else None

    router.shift_guard = Guard()
    flagged = Decider(router=router).decide("zzz Name a color.")
    assert flagged.shift == "teacher" and flagged.route == "teacher" and flagged.choice == router.strong


def test_audit_config_and_metric():
    from toolkit.config.serve import ServeConfig
    from toolkit.serve.audit import acceptable
    from toolkit.config.serve import AuditConfig

    backends = {"student": {"base_url": "http://127.0.0.1:1/v1", "model": "s"},
                "teacher": {"base_url": "http://127.0.0.1:2/v1", "model": "t"}}
    assert ServeConfig(backends=backends).audit.sample_rate == 0.05
    with pytest.raises(ValueError, match="audit.teacher: no backend 'oracle'"):
        ServeConfig(backends=backends, audit={"teacher": "oracle"})
    with pytest.raises(ValueError, match="metric"):
        ServeConfig(backends=backends, audit={"metric": "bleu"})
    ok = acceptable(AuditConfig(labels=["REFUND", "ORDER"]))  # evaluate's label agreement
    assert ok("The category is REFUND.", "REFUND") and not ok("ORDER, not REFUND", "REFUND")
    assert acceptable(AuditConfig())("The Answer.", "answer") and not acceptable(AuditConfig())("yes", "no")
    f1 = acceptable(AuditConfig(metric="f1", min_score=0.5))
    assert f1("paris is the capital", "the capital is paris") and not f1("rome", "paris")


def test_checks_are_skipped_while_the_teacher_is_unavailable():
    import asyncio

    from toolkit.config.serve import BackendConfig
    from toolkit.serve.backends import Backend

    a, _ = auditor(sample_rate=1.0)
    body = {"model": "optkit", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def go():
        from tests.collect.test_llama_cpp_server import free_port

        a.teacher = Backend("teacher", BackendConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="t",
                                                     breaker_failures=1, retries=0))
        try:
            a.teacher.breaker.failure()  # open: no call is made at all
            await a._check("cache", "/chat/completions", body, "x")
            a.teacher.breaker.success()
            await a._check("cache", "/chat/completions", body, "x")  # nothing listens there: a failed call
        finally:
            await a.teacher.aclose()

    asyncio.run(go())
    skipped = lambda reason: a.metrics.registry.get_sample_value("optkit_audit_skipped_total", {"reason": reason})
    assert skipped("teacher_unavailable") == 1 and skipped("teacher_error") == 1
    assert a.counts == {"cache": [0, 0], "route": [0, 0]}  # a skipped check is no check
