"""int8: W8A8 (int8 weights per channel, dynamic per-token int8 activations) via SmoothQuant + GPTQ.

SmoothQuant first moves activation outliers into the weights (so per-token int8 activations lose little),
then GPTQ rounds the weights with second-order error correction. Strength 0.5 (the default) measured best on
SmolLM2-135M: perplexity -1.8% vs fp32, against +1.1% at 0.8 and +1.8% without SmoothQuant
(eval/results/bench_quantize.md).
"""

from __future__ import annotations

from pydantic import Field

from toolkit.quantize.method import QuantMethodConfig


class Int8Config(QuantMethodConfig):
    """W8A8 (SmoothQuant + GPTQ) via llm-compressor."""

    smoothing_strength: float = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength (0 = skip "
                                      "SmoothQuant). Measured on SmolLM2-135M (eval/bench_quantize.py): 0.5 "
                                      "-1.8% perplexity vs fp32, 0.8 +1.1%, 0 +1.8%.")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening (fraction of its mean "
                                  "diagonal).")
    ignore: list[str] = Field(["lm_head"], description="Modules left unquantized (names, or 're:<regex>').")


def run(cfg: Int8Config, job) -> list:
    from toolkit.quantize.llmc import artifact, require_llmcompressor, run_oneshot

    require_llmcompressor()
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    recipe = []
    if cfg.smoothing_strength > 0:
        recipe.append(SmoothQuantModifier(smoothing_strength=cfg.smoothing_strength))
    recipe.append(GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=list(cfg.ignore),
                               dampening_frac=cfg.dampening_frac))
    run_oneshot(job.src, job.out, recipe, job.texts, job.max_length)
    return [artifact("int8", "W8A8 (int8 per-channel weights, dynamic per-token int8 activations)", job)]
