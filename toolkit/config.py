"""The recipe schema: one pydantic model per recipe section, every field described, unknown keys refused.

The same models are used from Python and from YAML. Each stage section is optional; a recipe runs the
stages whose sections it has, in pipeline order. Stage owners extend only their own section's models.
Importing this module must stay cheap (pydantic + yaml only): `optkit validate` and `--help` depend on it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from toolkit.errors import OptkitError

STAGE_ORDER = ("collect", "distill", "quantize", "route", "cache", "evaluate", "export")


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------- shared


class ModelSpec(Section):
    model: str = Field(description="Hugging Face id, local directory, or built-in offline name "
                       "(smollm2-135m-instruct, minilm-l6).")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) for Hub ids.")
    trust_remote_code: bool = Field(False, description="Allow the model repo's own Python code to run. Off unless "
                                    "you trust the repo.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype for local inference; auto = bfloat16 where the CPU/GPU supports it, "
        "else float32.")


class RuntimeConfig(Section):
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads; default = physical cores.")
    offline: bool = Field(True, description="Set HF_HUB_OFFLINE so nothing is downloaded at run time.")


class TrackingConfig(Section):
    enabled: bool = Field(True, description="Log the run to MLflow.")
    uri: Optional[str] = Field(None, description="MLflow tracking URI. Default: sqlite file "
                               "<artifacts_dir>/mlflow.db. The MLFLOW_TRACKING_URI environment variable wins.")
    experiment: str = Field("optkit", description="MLflow experiment name.")


class SplitConfig(Section):
    train: float = Field(0.8, ge=0, le=1, description="Fraction of prompts for training.")
    val: float = Field(0.1, ge=0, le=1, description="Fraction for validation / calibration.")
    test: float = Field(0.1, ge=0, le=1, description="Fraction held out for evaluation.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class DataConfig(Section):
    path: str = Field(description="Prompts: a .jsonl, .csv or .parquet file, or a directory saved by "
                      "datasets.save_to_disk. Relative paths are relative to the recipe file.")
    format: Literal["auto", "jsonl", "csv", "parquet", "datasets"] = Field(
        "auto", description="File format; auto = from the extension (a directory = datasets).")
    split_name: Optional[str] = Field(None, description="For a datasets DatasetDict: which split to read.")
    prompt_column: str = Field("prompt", description="Column holding the user prompt (the records' `prompt` "
                               "field: the raw text routers and caches see).")
    prompt_template: Optional[str] = Field(
        None, description="Python format string over the row's columns that builds the user message, e.g. "
        "'Classify: {text}' (write literal braces as {{ }}). Default: the prompt column as is.")
    reference_column: Optional[str] = Field(None, description="Column with the gold answer, if the data has one.")
    id_column: Optional[str] = Field(None, description="Column with a stable id; default = hash of the prompt.")
    system_prompt: Optional[str] = Field(None, description="System message put before every prompt.")
    chat_template: bool = Field(True, description="Format prompts with the model's chat template.")
    dedupe: bool = Field(True, description="Drop repeated prompts (after templating), keeping the first.")
    limit: Optional[int] = Field(None, ge=1, description="Use at most this many prompts (after dedupe): a "
                                 "deterministic sample by hash of id and seed, not the first rows of the file.")
    splits: SplitConfig = Field(default_factory=SplitConfig, description="Deterministic train/val/test split "
                                "(by hash of prompt id and the recipe seed).")


class Price(Section):
    input_per_1m: float = Field(0.0, ge=0, description="USD per 1M input tokens (API models).")
    output_per_1m: float = Field(0.0, ge=0, description="USD per 1M output tokens (API models).")
    cached_input_per_1m: Optional[float] = Field(None, ge=0, description="USD per 1M cached input tokens.")
    per_hour: Optional[float] = Field(None, ge=0, description="USD per hour of the machine that serves a "
                                      "self-hosted variant; cost = per_hour / measured throughput.")


# --------------------------------------------------------------------------------------------- collect


class GenerationConfig(Section):
    max_new_tokens: int = Field(64, ge=1, description="Maximum tokens generated per prompt.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (ignored when greedy).")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")


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
    max_failures: float = Field(0.0, ge=0, le=1, description="Fraction of prompts allowed to fail after retries "
                                "before the stage fails (failures are always recorded).")


# --------------------------------------------------------------------------------------------- distill


class PruneConfig(Section):
    num_layers: int = Field(description="Decoder layers the student keeps.", ge=1)
    layers: Optional[list[int]] = Field(None, description="Exact teacher layer indices to keep; overrides selection.")
    selection: Literal["search", "first_last", "every_other", "first"] = Field(
        "search", description="How to choose layers: search = score candidate subsets on teacher outputs and "
        "keep the best (default).")
    score_batches: int = Field(4, ge=1, description="Batches of teacher outputs used to score each candidate.")


class StudentConfig(Section):
    model: Optional[str] = Field(None, description="A causal LM (HF id / dir / built-in) to use as the student.")
    from_teacher: Optional[PruneConfig] = Field(None, description="Build the student from the teacher by "
                                                "keeping a subset of its decoder layers.")
    revision: Optional[str] = Field(None, description="Hub revision of student.model.")
    trust_remote_code: bool = Field(False, description="Allow the student repo's own code to run.")

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        if (self.model is None) == (self.from_teacher is None):
            raise ValueError("set exactly one of 'model' or 'from_teacher'")
        return self


class LoraSettings(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(
        "all-linear", description="Modules to adapt.")


class KDConfig(Section):
    loss: Literal["none", "forward_kl", "reverse_kl", "jsd"] = Field(
        "none", description="Logit-KD divergence; none = sequence-level KD only (SFT on teacher outputs).")
    ratio: float = Field(0.5, ge=0, le=1, description="Weight of the KD loss; (1 - ratio) goes to the SFT loss.")
    beta: float = Field(0.5, gt=0, lt=1, description="Interpolation of the generalized JSD.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature for both distributions.")
    source: Literal["online", "precomputed"] = Field(
        "online", description="online = run the teacher during training; precomputed = top-k logprobs from collect.")


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training split.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1 = use epochs).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(256, ge=8, description="Prompt + completion tokens; longer examples are truncated.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warm-up fraction of steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (resume point).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    logging_steps: int = Field(10, ge=1, description="Log the loss every N steps.")
    seed: Optional[int] = Field(None, description="Training seed (LoRA initialisation, data order); default: the "
                                "recipe's seed. Change only this to measure run-to-run spread without moving the "
                                "splits.")
    max_examples: Optional[int] = Field(None, ge=1, description="Train on at most this many train-split teacher "
                                        "outputs (the first N in collect's order, a hash sample): for data-size "
                                        "curves.")
    min_completion_tokens: int = Field(1, ge=1, description="Teacher outputs shorter than this (in tokens) are "
                                       "skipped, with a count in the log.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass "
                                         "(less memory, ~30% slower).")
    bf16: Literal["auto", True, False] = Field("auto", description="bfloat16 training; auto = where supported.")


class LauncherConfig(Section):
    num_processes: int = Field(1, ge=1, description="Training processes (DDP through accelerate).")
    accelerate_config: Optional[str] = Field(None, description="An accelerate config file (FSDP / DeepSpeed "
                                             "settings are passed through as they are).")


class DistillConfig(Section):
    student: StudentConfig = Field(description="Where the student comes from.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="Which weights train.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA / QLoRA settings.")
    kd: KDConfig = Field(default_factory=KDConfig, description="Logit knowledge distillation.")
    training: TrainConfig = Field(default_factory=TrainConfig, description="Optimizer and schedule.")
    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="Multi-process settings.")
    eval_batch_size: int = Field(8, ge=1, description="Prompts per batch for the student's generations and "
                                 "the NLL evaluation.")


# --------------------------------------------------------------------------------------------- quantize


class CalibrationConfig(Section):
    num_samples: int = Field(64, ge=1, description="Calibration sequences (train-split prompts, with teacher "
                             "outputs when source = prompts+outputs).")
    min_samples: int = Field(16, ge=1, description="Fewer usable calibration texts than this is an error "
                             "(quantizing on a handful of sequences silently ruins the model).")
    max_length: int = Field(256, ge=8, description="Tokens per calibration / evaluation sequence.")
    source: Literal["prompts", "prompts+outputs"] = Field(
        "prompts+outputs", description="Calibrate on the recipe's prompts, optionally followed by teacher outputs "
        "(falls back to the prompts alone when there are no teacher outputs).")


class QuantMethodConfig(Section):
    enabled: bool = Field(True, description="Produce this artifact.")


class Int8Config(QuantMethodConfig):
    smoothing_strength: float = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength (0 = skip "
                                      "SmoothQuant). Measured on SmolLM2-135M (eval/bench_quantize.py): 0.5 "
                                      "-1.8% perplexity vs fp32, 0.8 +1.1%, 0 +1.8%.")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening (fraction of its mean "
                                  "diagonal).")
    ignore: list[str] = Field(["lm_head"], description="Modules left unquantized (names, or 're:<regex>').")


class GPTQConfig(QuantMethodConfig):
    group_size: int = Field(32, ge=1, description="Weights per quantization group (must divide every quantized "
                            "layer's input width; SmolLM2's 576 needs 32, 64 or 192, not 128). Measured on "
                            "SmolLM2-135M: group 32 asymmetric +0.5% perplexity vs group 64 symmetric +6.7%.")
    act_order: bool = Field(True, description="GPTQ rounds columns in order of activation magnitude ('weight' "
                            "act order: better accuracy, same saved format and speed).")
    symmetric: bool = Field(False, description="Symmetric (no zero point) or asymmetric weights (default: "
                            "asymmetric, measured better).")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening (fraction of its mean "
                                  "diagonal).")
    ignore: list[str] = Field(["lm_head"], description="Modules left unquantized (names, or 're:<regex>', e.g. "
                              "'re:.*layers\\.0\\..*' to keep the first block in full precision).")


class AWQConfig(QuantMethodConfig):
    group_size: int = Field(64, ge=1, description="Weights per quantization group (must divide layer input widths).")
    symmetric: bool = Field(False, description="Symmetric or asymmetric (AWQ default) weights.")
    duo_scaling: bool = Field(True, description="Search scales from activations and weights (AWQ's duo scaling).")
    ignore: list[str] = Field(["lm_head"], description="Modules left unquantized (names, or 're:<regex>').")


GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")


class GGUFConfig(QuantMethodConfig):
    types: list[Literal[GGUF_TYPES]] = Field(["Q8_0", "Q4_K_M"], min_length=1,
                                             description="llama.cpp quantization types to produce.")
    modelfile_type: Optional[Literal[GGUF_TYPES]] = Field(
        None, description="Which GGUF the Ollama Modelfile points at (default: the first of types).")
    converter_dir: Optional[str] = Field(
        None, description="A llama.cpp checkout holding convert_hf_to_gguf.py; default: fetched once from the "
        "llama-cpp-python sdist of the installed version into the optkit cache.")


class QuantizeConfig(Section):
    model: Optional[str] = Field(None, description="Model to quantize (local HF dir or built-in name); default: "
                                 "the distill stage's merged student (distill/model).")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="Calibration data.")
    eval_samples: int = Field(64, ge=1, description="Held-out texts (test split) for perplexity.")
    agreement_samples: int = Field(16, ge=0, description="Test prompts generated by every artifact to measure "
                                   "teacher agreement and gold accuracy (0 = skip).")
    max_new_tokens: int = Field(32, ge=1, description="Generation length for agreement and tokens/s.")
    int8: Optional[Int8Config] = Field(None, description="W8A8 (SmoothQuant + GPTQ) via llm-compressor.")
    gptq: Optional[GPTQConfig] = Field(None, description="W4A16 GPTQ via llm-compressor.")
    awq: Optional[AWQConfig] = Field(None, description="W4A16 AWQ via llm-compressor.")
    gguf: Optional[GGUFConfig] = Field(None, description="GGUF via llama.cpp (converter + llama-cpp-python).")


# --------------------------------------------------------------------------------------------- route


class RouteLabelsConfig(Section):
    source: Literal["pipeline", "file"] = Field(
        "pipeline", description="pipeline = label the val/test prompts by the distilled student's quality vs the "
        "teacher's (needs collect + distill); file = a labeled file with per-model scores.")
    path: Optional[str] = Field(None, description="Labeled file (jsonl/csv/parquet) when source = file; relative "
                                "to the recipe file.")
    prompt_column: str = Field("prompt", description="Prompt column of the labeled file.")
    score_columns: dict[str, str] = Field(default_factory=dict, description="source = file: model name -> column "
                                          "holding that model's correctness/score in [0, 1] per prompt (2 or more "
                                          "models; booleans count as 0/1).")
    metric: Literal["gold", "agreement_f1", "agreement_exact"] = Field(
        "gold", description="source = pipeline: how answers are scored. gold = names the reference label (label "
        "set = distinct references); agreement_* = the student's token F1 / exact match with the teacher "
        "(the teacher scores 1).")
    suffices_at: float = Field(1.0, ge=0, description="source = pipeline: the student 'suffices' on a prompt when "
                               "its score >= the teacher's score * this (reported as a label beside the gap).")


class RouteTargetConfig(Section):
    min_quality: Optional[float] = Field(None, gt=0, le=1, description="Keep at least this fraction of the "
                                         "strong model's quality: the cheapest threshold whose one-sided lower "
                                         "confidence bound on calibration data is >= this.")
    max_strong_fraction: Optional[float] = Field(None, ge=0, le=1, description="Send at most this fraction "
                                                 "of queries to the strong model (best quality within it).")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="One-sided confidence of the quality bound.")
    eval_size: Optional[int] = Field(None, ge=1, description="min_quality: the guarantee is for the quality "
                                     "REALIZED on a batch of this many prompts (a deployment window or an "
                                     "evaluation set), not only the long-run mean; smaller = stricter threshold. "
                                     "Default: the calibration size.")

    @model_validator(mode="after")
    def _one_goal(self) -> "RouteTargetConfig":
        if (self.min_quality is None) == (self.max_strong_fraction is None):
            raise ValueError("set exactly one of 'min_quality' or 'max_strong_fraction'")
        return self


class RouteConfig(Section):
    labels: RouteLabelsConfig = Field(default_factory=RouteLabelsConfig, description="Where labels come from.")
    embedder: str = Field("minilm-l6", description="sentence-transformers model for features (built-in name, "
                          "local dir or Hub id).")
    embedding: Literal["transformer", "static"] = Field(
        "transformer", description="transformer = run the embedder on every prompt; static = distill the embedder "
        "once into per-token vectors and average them (model2vec-style: ~100x faster, no torch when serving; "
        "the vectors ship in the route dir).")
    max_seq_length: int = Field(256, ge=8, description="Embedder truncation in tokens (shorter = faster routing).")
    text_features: bool = Field(True, description="Add cheap text features (length, digits, code, question words).")
    model: Literal["logreg", "mlp", "knn", "mf"] = Field(
        "logreg", description="Router model predicting each model's quality per prompt: logreg = one logistic "
        "regression per model; mlp = small multi-output MLP; knn = mean scores of the k nearest labeled prompts; "
        "mf = matrix factorization (prompt projection x learned model embeddings).")
    k: Optional[int] = Field(None, ge=1, description="model = knn: neighbours averaged (default: 5% of the "
                             "training prompts, between 5 and 100).")
    hidden: int = Field(64, ge=1, description="model = mlp: hidden units; model = mf: latent dimension.")
    l2: Optional[float] = Field(None, gt=0, description="L2 penalty on the mean training loss (logreg, mlp, mf); "
                                "default per model (logreg 1.0, mlp 1.5e-3, mf 0.01), tuned on MMLU routing labels.")
    costs: dict[str, float] = Field(default_factory=dict, description="Model name -> relative cost per query "
                                    "(every model must be listed). Default: from recipe pricing (input + output "
                                    "price per 1M tokens) when every model has one; else strong = 1, others 0 "
                                    "(two models only).")
    strong: Optional[str] = Field(None, description="Name of the strong model (default: the costliest; for "
                                  "source = pipeline: teacher).")
    target: RouteTargetConfig = Field(default_factory=lambda: RouteTargetConfig(min_quality=0.95),
                                      description="Calibration goal.")
    holdout: float = Field(0.2, gt=0, lt=1, description="source = file: fraction of labeled prompts held out for "
                           "the report (source = pipeline uses the test split).")
    calibration: float = Field(0.3, gt=0, lt=1, description="Fraction of the non-held-out prompts (pipeline: of "
                               "the val split) kept out of training to calibrate the threshold.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples of held-out data used to check the quality "
                           "guarantee in the report (0 = skip).")


# --------------------------------------------------------------------------------------------- cache


class CacheConfig(Section):
    pairs_path: Optional[str] = Field(None, description="Labeled pairs file (jsonl/csv/parquet: query, cached query, "
                                      "label). Default: nearest-neighbour pairs built from the recipe's data via "
                                      "group_column.")
    query_column: str = Field("query", description="Pairs file: column of the incoming query.")
    cached_column: str = Field("cached_query", description="Pairs file: column of the cached query.")
    label_column: str = Field("label", description="Pairs file: 1 = the cached answer may be reused, 0 = not.")
    group_column: Optional[str] = Field(None, description="When pairs_path is unset: column of the recipe's data "
                                        "whose equal values mean 'the same answer may be reused' (e.g. intent). "
                                        "Each prompt is paired with its nearest other prompt; label = same group.")
    text_column: Optional[str] = Field(None, description="With group_column: column holding the query text "
                                       "(default data.prompt_column).")
    max_pairs: Optional[int] = Field(None, ge=10, description="Use at most this many pairs (a deterministic "
                                     "sample), to bound embedding time.")
    embedder: str = Field("minilm-l6", description="sentence-transformers model id, local dir or built-in name.")
    epsilon: float = Field(0.05, gt=0, lt=1, description="Promised bound on the false-hit rate: among queries "
                           "served from the cache, the fraction whose cached answer is not reusable.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="One-sided confidence of the bound.")
    selection: Literal["scan", "fixed_sequence"] = Field(
        "scan", description="scan = lowest threshold whose upper bound <= epsilon (most hits; search not "
        "multiplicity-corrected, coverage measured in eval/bench_cache.py); fixed_sequence = test thresholds high "
        "to low and stop at the first failure (strict guarantee, fewer hits).")
    bound: Literal["rate", "realized", "audit"] = Field(
        "rate", description="rate = bound the long-run false-hit rate (Clopper-Pearson); realized = bound the rate "
        "realized on a batch of traffic as large as the held-out set (beta-binomial predictive: adds that batch's "
        "own noise; fewer hits); audit = bound the upper bound an audit of such a batch would itself state (the "
        "held-out check certifies epsilon at the stated confidence; fewest hits).")
    holdout: float = Field(0.3, gt=0, lt=1, description="Fraction of pairs held out to check the bound.")
    adaptive: Literal["none", "cluster"] = Field("none", description="cluster = also fit per-cluster thresholds and "
                                                 "export them only if they raise the held-out hit rate at the "
                                                 "same bound.")
    clusters: Optional[int] = Field(None, ge=2, le=256, description="Clusters for adaptive=cluster (default: one "
                                    "per ~150 calibration pairs, 2..32).")
    stress: bool = Field(True, description="Also report the built-in negation / small-edit stress set.")
    ttl_s: Optional[float] = Field(None, gt=0, description="Runtime: entry time-to-live in seconds.")
    max_entries: int = Field(100_000, ge=1, description="Runtime: maximum entries (oldest evicted).")
    ann: Literal["auto", "numpy", "faiss"] = Field(
        "auto", description="Runtime nearest-neighbour search: numpy = exact brute force; faiss = HNSW "
        "(optional extra optkit[faiss]); auto = numpy below ann_min_entries per namespace, faiss above if installed.")
    ann_min_entries: int = Field(20_000, ge=1, description="Runtime: namespace size from which ann=auto uses "
                                 "faiss HNSW.")
    batch_size: int = Field(64, ge=1, description="Texts per embedding batch.")


# --------------------------------------------------------------------------------------------- evaluate / export


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
    exact_cache: bool = Field(True, description="Serve exact repeats (after whitespace/case normalization) first.")
    semantic_cache: bool = Field(True, description="Use the tuned semantic cache (needs the cache stage).")


class EvaluateConfig(Section):
    variants: Union[Literal["all"], list[str]] = Field(
        "all", description="Variants to evaluate: teacher, student (merged), student_lora (adapter on its base), "
        "each quantized artifact by its name in quantize/summary.json (int8, gptq, awq, gguf-Q4_K_M, ...), "
        "system. all = every one whose upstream outputs exist.")
    split: Literal["val", "test"] = Field("test", description="Held-out split the variants are evaluated on.")
    max_samples: Optional[int] = Field(None, ge=1, description="Evaluate quality on at most this many held-out "
                                       "prompts (a deterministic subset: the first by id).")
    metric: Literal["gold", "exact", "f1", "rouge_l"] = Field(
        "gold", description="Task metric against the reference: gold = the answer names the reference label "
        "(label set = the distinct references, first label mentioned wins); exact / f1 / rouge_l = "
        "normalized exact match, token F1, ROUGE-L.")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Generation length cap; default = "
                                          "collect.generation.max_new_tokens (the same settings as the teacher).")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="Engine for HF-format variants (teacher, student, LoRA, compressed-tensors): auto = "
        "vLLM when it is importable in this environment, else transformers. GGUF variants always run on "
        "llama.cpp; API teachers are measured from collect's records.")
    latency_samples: int = Field(8, ge=1, description="Prompts timed one request at a time (batch 1) for TTFT, "
                                 "TPOT and end-to-end latency percentiles.")
    warmup: int = Field(1, ge=0, description="Untimed requests before timing each variant.")
    batch_sizes: list[int] = Field([1, 8], min_length=1, description="Batch sizes at which throughput (output "
                                   "tokens/s, requests/s) is measured; the largest sets the self-hosted cost.")
    perplexity: bool = Field(True, description="Perplexity of each local variant on the teacher's answers "
                             "(teacher-forced, answer tokens only).")
    prompt_cache_fraction: float = Field(0.0, ge=0, le=1, description="API variants: fraction of input tokens "
                                         "billed at pricing.<name>.cached_input_per_1m (provider prompt caching).")
    system: SystemEvalConfig = Field(default_factory=SystemEvalConfig, description="The composed-system replay.")
    judge: Optional[JudgeConfig] = Field(None, description="Optional LLM-as-judge through any OpenAI-compatible "
                                         "endpoint (score 1-10 per answer, reported as mean / 10).")


class ExportConfig(Section):
    include: list[Literal["student", "adapter", "quantized", "gguf", "route", "cache"]] = Field(
        ["student", "adapter", "quantized", "gguf", "route", "cache"],
        description="What goes into the bundle: student = merged student model dir; adapter = the LoRA adapter "
        "and its base; quantized = the compressed-tensors dirs; gguf = GGUF files + Ollama Modelfile; route = "
        "router weights; cache = cache.json. Parts whose stage did not run are left out with a note.")
    quantized: Optional[list[str]] = Field(None, description="Names of the quantized artifacts to include "
                                           "(default: every artifact in quantize/summary.json; GGUF ones go in with include gguf).")
    served_name: Optional[str] = Field(None, description="Prefix of the model names vLLM serves (default: the "
                                       "recipe name).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the first vllm serve command in serve.sh; each "
                      "further model gets the next port.")
    vllm_args: list[str] = Field(default_factory=list, description="Extra arguments appended to every vllm serve "
                                 "line (e.g. ['--max-model-len', '4096']).")
    register_model: bool = Field(False, description="Also register the bundle in the MLflow model registry "
                                 "(one registered model, a new version per export).")
    registry_name: Optional[str] = Field(None, description="Registered model name (default: the recipe name).")


# --------------------------------------------------------------------------------------------- recipe


class Recipe(Section):
    name: str = Field(description="Run name; artifacts go to <artifacts_dir>/<name>/.", pattern=r"^[A-Za-z0-9_.-]+$")
    description: Optional[str] = Field(None, description="Free text for the run's README and MLflow.")
    seed: int = Field(0, description="Seed for splits, sampling and training.")
    artifacts_dir: str = Field("artifacts", description="Where run directories go (relative to the working dir).")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Process-level settings.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow settings.")
    teacher: ModelSpec = Field(description="The big model whose outputs we learn from.")
    data: DataConfig = Field(description="The prompts.")
    pricing: dict[str, Price] = Field(default_factory=dict, description="Model/variant name -> prices "
                                      "(keys: teacher, student, or any variant name).")
    collect: Optional[CollectConfig] = Field(None, description="Collect teacher outputs.")
    distill: Optional[DistillConfig] = Field(None, description="Train a student on them.")
    quantize: Optional[QuantizeConfig] = Field(None, description="Quantize the student.")
    route: Optional[RouteConfig] = Field(None, description="Train and calibrate a router.")
    cache: Optional[CacheConfig] = Field(None, description="Tune a semantic-cache threshold.")
    evaluate: Optional[EvaluateConfig] = Field(None, description="Evaluate every variant and the system.")
    export: Optional[ExportConfig] = Field(None, description="Write the deployable bundle.")

    # Where the recipe file lives; relative data paths resolve against it. Not part of the schema.
    _base_dir: Path = Path(".")

    def stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if getattr(self, s) is not None]

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self._base_dir / path)

    def public_dict(self) -> dict[str, Any]:
        """The recipe as plain data with every secret field removed (for files, params and logs)."""
        return _strip_secrets(self)


# --------------------------------------------------------------------------------------------- loading


def _strip_secrets(model: BaseModel) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("secret"):
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = _strip_secrets(value)
        elif isinstance(value, dict):
            out[name] = {k: _strip_secrets(v) if isinstance(v, BaseModel) else v for k, v in value.items()}
        elif isinstance(value, SecretStr):
            continue
        else:
            out[name] = value
    return out


def config_hash(obj: Any) -> str:
    """Stable hash of plain data (dict/list/scalars), used to decide whether a stage can be skipped."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _model_at(cls: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model class found by walking `loc` (field names) down from `cls`."""
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part)
        if field is None:
            # dict keys and union tags: keep the current model only if the key names a field-less container
            continue
        cls = _first_model(field.annotation)
    return cls


def _first_model(tp: Any) -> Optional[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel] = None) -> str:
    """One readable line per problem: `file: key.path: message (did you mean 'x'?)`."""
    root = root or Recipe
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            options = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), options, n=1, cutoff=0.6)
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else
                                   (f"; allowed: {', '.join(options)}" if options else ""))
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], yaml-parsed value)."""
    import yaml

    if "=" not in text:
        raise OptkitError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise OptkitError(f"override '{text}': empty key path")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise OptkitError(f"override '{text}': value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise OptkitError(f"override '{text}': '{k}' is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file. Every problem is an OptkitError naming file, line or key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise OptkitError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise OptkitError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        raise OptkitError(f"{path}: the recipe is empty")
    if not isinstance(data, dict):
        raise OptkitError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    recipe = recipe_from_dict(data, source=str(path))
    recipe._base_dir = path.resolve().parent
    return recipe


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise OptkitError(format_validation_error(err, source)) from None


# --------------------------------------------------------------------------------------------- reference docs


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        return " | ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def schema_reference(cls: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Markdown table rows `| key | type | default | description |` for every field, depth first."""
    rows = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        default = "required" if field.is_required() else (
            "{…}" if field.default_factory is not None else repr(field.default))
        rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {field.description or ''} |")
        sub = _first_model(field.annotation)
        if sub is not None and get_origin(field.annotation) is not dict:
            rows.extend(schema_reference(sub, prefix=key + "."))
        elif get_origin(field.annotation) is dict and sub is not None:
            rows.extend(schema_reference(sub, prefix=key + ".<name>."))
    return rows
