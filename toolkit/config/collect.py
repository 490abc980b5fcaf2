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


class CollectConfig(Section):
    backend: Literal["hf", "openai", "vllm"] = Field("hf", description="Who generates the teacher outputs.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Decoding settings.")
    top_logprobs: int = Field(0, ge=0, le=20, description="Keep this many top log-probs per output token "
                              "(for logit KD); 0 = none.")
    splits: list[Literal["train", "val", "test"]] = Field(["train", "val", "test"],
                                                          description="Which splits to send to the teacher.")
    hf: HFBackendConfig = Field(default_factory=HFBackendConfig, description="Settings of the hf backend.")
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig,
                                        description="Settings of the openai backend.")
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig, description="Settings of the vllm backend.")
    context: Literal["error", "skip", "truncate"] = Field(
        "error", description="A prompt whose tokens + generation.max_new_tokens exceed the model's context: error "
        "(stop, naming the prompt), skip (record it in failures.jsonl, not counted by max_failures) or truncate "
        "(cut the middle of its last message). Counts go to summary.json and the manifest.")
    max_failures: float = Field(0.0, ge=0, le=1, description="Fraction of prompts allowed to fail after retries "
                                "before the stage fails (failures are always recorded).")
