"""collect: teacher backends and their settings; the backends are the engines of toolkit.engines.ENGINES.

`collect.backend` accepts every registered engine, plus `log` (an importer, not an engine) and `auto` (the
fastest local engine installed, resolved at run time: toolkit.collect.backends.resolve_backend). The section
gets one settings field per engine: the engine class's `settings_class` (a pydantic model defined next to the
engine, toolkit/engines/<name>.py). A new engine never touches this file.
toolkit.engines imports no heavy library at import time, so this module stays cheap (tests/spine/test_cli.py).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field, create_model, model_validator

from toolkit.config.base import Section
from toolkit.config.common import GenerationConfig
from toolkit.engines import ENGINES


class LogBackendConfig(Section):
    paths: list[str] = Field(default_factory=list, description="Traffic logs to import (JSONL; globs allowed, e.g. "
                             "'traffic*.jsonl' for the gateway's rotated files, read in name order). Relative to the "
                             "recipe file. Default: data.path.")
    format: Literal["auto", "optkit", "openai"] = Field("auto", description="optkit = the gateway's traffic log "
                                                        "(serve.yaml traffic_log); openai = {request, response} "
                                                        "lines (an OpenAI-style proxy log); auto = per line.")
    prompts: Literal["log", "data"] = Field("log", description="log = every eligible logged request is a prompt "
                                            "(id = hash of its messages, split by hash as for data prompts); data = "
                                            "only data.path's prompts, answered from the log (the others go to "
                                            "failures.jsonl as not_in_log, not counted by max_failures).")
    routes: list[str] = Field(["teacher", "teacher-escalated"], min_length=1, description="x-optkit-route values "
                              "whose answers count (optkit format): the teacher's by default, routed or escalated "
                              "by a cascade; add student, exact-cache, semantic-cache to keep those too. "
                              "openai-format lines have no route and always count.")
    models: Optional[list[str]] = Field(None, description="Only answers served by these models (the backend's "
                                        "model name, or the response's model); null = any.")
    finish_reasons: list[str] = Field(["stop"], min_length=1, description="Only answers that ended this way: "
                                      "complete ones by default (add length to keep cut-off answers).")
    max_temperature: Optional[float] = Field(None, ge=0, description="Only requests sampled at or below this "
                                             "temperature (unset temperature = 1, the OpenAI default); null = any.")
    bad_lines: Literal["error", "skip"] = Field("error", description="A line that is not a valid log entry: "
                                                "error (one line naming file and line number) or skip (counted). A "
                                                "torn last line (a writer killed mid-line) is always skipped and "
                                                "counted.")


IMPORTERS = ("log",)  # backends that call no model
AUTO = "auto"


class CollectSettings(Section):
    """The section's settings shared by every backend; CollectConfig adds `backend` and one field per engine."""

    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Decoding settings.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Keep this many top log-probs per output token "
                              "(for logit KD); 0 = none.")
    splits: list[Literal["train", "val", "test"]] = Field(["train", "val", "test"], min_length=1,
                                                          description="Which splits to send to the teacher.")
    log: LogBackendConfig = Field(default_factory=LogBackendConfig, description="Settings of the log backend.")
    context: Literal["error", "skip", "truncate"] = Field(
        "error", description="A prompt whose tokens + generation.max_new_tokens exceed the model's context: error "
        "(stop, naming the prompt), skip (record it in failures.jsonl, not counted by max_failures) or truncate "
        "(cut the middle of its last message). Counts go to summary.json and the manifest.")
    max_failures: float = Field(0.0, ge=0, le=1, description="Fraction of prompts allowed to fail after retries "
                                "before the stage fails (failures are always recorded).")

    @model_validator(mode="after")
    def _backend_fits(self) -> "CollectSettings":
        backend = getattr(self, "backend", None)
        if backend == "log" and self.top_logprobs:
            raise ValueError("top_logprobs: a traffic log holds answers, not log-probs; set it to 0 for backend: log")
        if backend == "llamacpp" and self.top_logprobs:
            raise ValueError("top_logprobs: the llamacpp engine returns no log-probs; use backend hf or vllm")
        return self


def engine_settings(name: str, engine: type) -> Optional[type[BaseModel]]:
    return getattr(engine, "settings_class", None)


def collect_config(engines: dict) -> type[CollectSettings]:
    """The `collect` section: `backend` (auto | every registered engine | log) and one settings field per engine."""
    clash = [n for n in engines if n in IMPORTERS + (AUTO,) or n in CollectSettings.model_fields]
    if clash:
        raise TypeError(f"engine names {clash} clash with collect's own keys")
    names = (AUTO, *engines, *IMPORTERS)
    # Default auto: the fastest engine installed for this machine and collection (resolve_backend, measured in
    # eval/results/bench_collect*.md). The resolved engine keys the result store and is recorded in
    # collect/summary.json (backend.used), which evaluate and route read, so every stage sees one teacher engine.
    backend = Field("auto", description="Who generates the teacher outputs: auto (the default) = the fastest local "
                    "engine installed for this teacher, resolved at run time and recorded in summary.json and the "
                    "manifest (a GPU: vLLM where installed - in process, else a GPU build's server - else hf; a "
                    "CPU with native bf16: hf; a CPU without it: "
                    "vLLM (in process, or vllm-server from .venv-vllm) once the collection has >= 2048 output tokens "
                    "to generate, else hf; llamacpp when collect.llamacpp.gguf is set); or an engine of "
                    "toolkit.engines: hf = transformers, batched; vllm = vLLM in this process; vllm-server = a vLLM "
                    "server optkit starts from the vLLM environment (settings: collect.vllm); llamacpp = a GGUF "
                    "through llama.cpp; openai = any OpenAI-compatible endpoint; log = import answers the teacher "
                    "already gave (the gateway's traffic log or an OpenAI-style request/response log; no model is "
                    "called). Answers of different engines never share result-store entries.")
    fields = {"backend": (Literal[names], backend)}
    for name, engine in engines.items():
        cls = engine_settings(name, engine)
        if cls is not None:
            fields[name] = (cls, Field(default_factory=cls, description=f"Settings of the {name} backend."))
    return create_model("CollectConfig", __base__=CollectSettings, __module__=__name__,
                        __doc__="Collect teacher outputs: shared settings, the backend, one section per engine.",
                        **fields)


CollectConfig = collect_config(ENGINES)
