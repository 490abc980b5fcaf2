"""export: what goes into the bundle."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, SecretStr, model_validator

from toolkit.config.base import Section


class ExportConfig(Section):
    include: list[Literal["student", "adapter", "quantized", "gguf", "route", "cache"]] = Field(
        ["student", "adapter", "quantized", "gguf", "route", "cache"], min_length=1,
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
