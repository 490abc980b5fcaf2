"""collect: teacher backends and their settings."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, SecretStr, model_validator

from toolkit.config.base import Section
from toolkit.config.common import GenerationConfig


class HFBackendConfig(Section):
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call (left-padded; prompts are "
                            "sorted by length first so a batch pads little).")
    device: str = Field("auto", description="torch device: auto = cuda when available, else cpu.")


class OpenAIBackendConfig(Section):
    base_url: str = Field("https://api.openai.com/v1", description="Endpoint root of any OpenAI-compatible "
                          "server (OpenAI, vLLM serve, TGI, llama.cpp server).")
    model: Optional[str] = Field(None, description="Model name sent to the endpoint; default = teacher.model.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    api_key: Optional[SecretStr] = Field(None, json_schema_extra={"secret": True},
                                         description="API key inline (prefer api_key_env). Never logged.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(5, ge=0, description="Retries on 429 / 5xx / timeouts / malformed replies.")
    backoff_base_s: float = Field(0.5, ge=0, description="First retry wait; doubles each try (Retry-After wins).")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest single wait between retries.")
    api: Literal["chat", "completions"] = Field("chat", description="/chat/completions or /completions.")
    context_length: Optional[int] = Field(None, ge=1, description="The served model's context in tokens, for "
                                          "collect.context (prompts counted with the teacher's tokenizer); "
                                          "null = not checked.")


class VLLMBackendConfig(Section):
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model (vLLM tensor parallelism).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    max_model_len: Optional[int] = Field(None, ge=1, description="Context length cap passed to vLLM.")
    dtype: str = Field("auto", description="vLLM dtype.")
    quantization: Optional[str] = Field(None, description="vLLM quantization method, if the teacher is quantized.")


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
    routes: list[str] = Field(["teacher"], min_length=1, description="x-optkit-route values whose answers count "
                              "(optkit format): teacher by default; add student, exact-cache, semantic-cache to "
                              "keep those too. openai-format lines have no route and always count.")
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


class CollectConfig(Section):
    backend: Literal["hf", "openai", "vllm", "log"] = Field(
        "hf", description="Who generates the teacher outputs; log = import answers the teacher already gave "
        "(the gateway's traffic log or an OpenAI-style request/response log; no model is called).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Decoding settings.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Keep this many top log-probs per output token "
                              "(for logit KD); 0 = none.")
    splits: list[Literal["train", "val", "test"]] = Field(["train", "val", "test"],
                                                          description="Which splits to send to the teacher.")
    hf: HFBackendConfig = Field(default_factory=HFBackendConfig, description="Settings of the hf backend.")
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig,
                                        description="Settings of the openai backend.")
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig, description="Settings of the vllm backend.")
    log: LogBackendConfig = Field(default_factory=LogBackendConfig, description="Settings of the log backend.")
    context: Literal["error", "skip", "truncate"] = Field(
        "error", description="A prompt whose tokens + generation.max_new_tokens exceed the model's context: error "
        "(stop, naming the prompt), skip (record it in failures.jsonl, not counted by max_failures) or truncate "
        "(cut the middle of its last message). Counts go to summary.json and the manifest.")
    max_failures: float = Field(0.0, ge=0, le=1, description="Fraction of prompts allowed to fail after retries "
                                "before the stage fails (failures are always recorded).")

    @model_validator(mode="after")
    def _log_backend(self) -> "CollectConfig":
        if self.backend == "log" and self.top_logprobs:
            raise ValueError("top_logprobs: a traffic log holds answers, not log-probs; set it to 0 for backend: log")
        return self
