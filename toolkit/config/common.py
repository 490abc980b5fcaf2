"""Sections shared by several stages: models, runtime, tracking, data, prices, generation."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, SecretStr, field_validator, model_validator

from toolkit.config.base import Section


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

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: Optional[str]) -> Optional[str]:
        from toolkit.collect.prompts import template_problem  # the loader's own rules, so validate == run

        if v is not None and (problem := template_problem(v)):
            raise ValueError(problem)
        return v


class Price(Section):
    input_per_1m: float = Field(0.0, ge=0, description="USD per 1M input tokens (API models).")
    output_per_1m: float = Field(0.0, ge=0, description="USD per 1M output tokens (API models).")
    cached_input_per_1m: Optional[float] = Field(None, ge=0, description="USD per 1M cached input tokens.")
    per_hour: Optional[float] = Field(None, ge=0, description="USD per hour of the machine that serves a "
                                      "self-hosted variant; cost = per_hour / measured throughput.")


class GenerationConfig(Section):
    max_new_tokens: int = Field(64, ge=1, description="Maximum tokens generated per prompt.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (ignored when greedy).")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, description="Stop strings "
                                                            "(non-empty: an empty one stops at the first token).")
