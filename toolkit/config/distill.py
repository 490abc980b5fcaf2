"""distill: the student, LoRA/KD settings, training and launcher."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import ConfigDict, Field, model_validator

from toolkit.config.base import Section
from toolkit.config.common import ModelSpec


class PruneConfig(Section):
    num_layers: int = Field(description="Decoder layers the student keeps.", ge=1)
    layers: Optional[list[int]] = Field(None, description="Exact teacher layer indices to keep; overrides selection.")
    selection: Literal["search", "first_last", "every_other", "first"] = Field(
        "search", description="How to choose layers: search = score candidate subsets on teacher outputs and "
        "keep the best (default).")
    score_batches: int = Field(4, ge=1, description="Batches of teacher outputs used to score each candidate.")

    @model_validator(mode="after")
    def _layers(self) -> "PruneConfig":
        if self.layers is not None:  # refused here, not after the teacher has loaded
            if len(self.layers) != self.num_layers:
                raise ValueError(f"layers: {len(self.layers)} indices for num_layers {self.num_layers}")
            if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ValueError("layers: teacher layer indices must be distinct and >= 0")
        return self


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
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1 = use epochs).")

    @model_validator(mode="after")
    def _steps(self) -> "TrainConfig":
        if self.max_steps == 0:
            raise ValueError("max_steps: 0 would train nothing; -1 = use epochs, or at least 1")
        return self
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
    eval_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Precision the trained student answers and is scored at: distill's val/test answers "
        "and NLL, route's label answers and cascade confidences, evaluate's student variants (unless "
        "evaluate.student_dtype says otherwise). auto = bfloat16 where the CPU/GPU computes it natively (the "
        "precision vLLM serves a float32 checkpoint at), else float32. The saved weights stay float32.")


class TrainSpec(Section):
    """What the distill stage hands the training code: in its own process, or as `work/train_spec.json` to the
    DDP / accelerate workers, which read it back with `TrainSpec.model_validate_json` (typed JSON, the
    llm-compressor way). Every fact sits here once, already resolved (no 'auto', no seed left to default), so
    the parent and the workers cannot read different values of it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    student_dir: str = Field(description="The untrained student (distill/base), an HF directory.")
    collect_dir: str = Field(description="collect's outputs: the teacher records (and top-k log-probs).")
    work_dir: str = Field(description="distill/work: checkpoints, final/, train_result.json.")
    method: Literal["lora", "qlora", "full"]
    lora: LoraSettings
    kd: KDConfig
    training: TrainConfig = Field(description="max_length, min_completion_tokens, max_examples, seed and bf16 "
                                  "live here and nowhere else.")
    chat_template: bool = Field(description="Render prompts with the tokenizer's chat template.")
    teacher: ModelSpec = Field(description="For online logit KD.")
    base_hash: str = Field("", description="Content hash of student_dir: ties checkpoints to this exact student.")
    data_hash: str = Field("", description="Content hash of the collect outputs trained on (teacher answers, "
                           "top-k): new teacher answers never resume old checkpoints.")
    world_size: int = Field(1, ge=1, description="Training processes: the effective batch is per-device batch x "
                            "accumulation x world_size, so checkpoints of another world size are not resumed.")

    @model_validator(mode="after")
    def _resolved(self) -> "TrainSpec":
        # The recipe may leave these to defaults; the spec may not, or each worker could resolve them its own way.
        if self.training.seed is None:
            raise ValueError("training.seed must be resolved (the recipe's seed) before training")
        if self.training.bf16 == "auto":
            raise ValueError("training.bf16 must be resolved to true/false before training")
        return self

    @property
    def seed(self) -> int:
        return int(self.training.seed)

    @property
    def bf16(self) -> bool:
        return bool(self.training.bf16)

    def result_hash(self) -> str:
        """What decides the trained weights (not where the run directory is): checkpoints and a finished
        training are reused only under the same hash."""
        from toolkit.config.recipe import config_hash

        return config_hash(self.model_dump(mode="json", exclude={"work_dir"}))
