"""int8: W8A8 (int8 weights per channel, dynamic per-token int8 activations) via SmoothQuant + GPTQ.

SmoothQuant first moves activation outliers into the weights (so per-token int8 activations lose little),
then GPTQ rounds the weights with second-order error correction. Strength 0.5 (the default) measured best on
SmolLM2-135M: perplexity -1.8% vs fp32, against +1.1% at 0.8 and +1.8% without SmoothQuant
(eval/results/bench_quantize.md).
"""

from __future__ import annotations

from pathlib import Path


def quantize(src: Path, out: Path, cfg, texts: list[str], max_length: int) -> dict:
    from toolkit.quantize.llmc import require_llmcompressor, run_oneshot

    require_llmcompressor()
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    recipe = []
    if cfg.smoothing_strength > 0:
        recipe.append(SmoothQuantModifier(smoothing_strength=cfg.smoothing_strength))
    recipe.append(GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=list(cfg.ignore),
                               dampening_frac=cfg.dampening_frac))
    run_oneshot(src, out, recipe, texts, max_length)
    return {"method": "int8", "format": "compressed-tensors", "scheme": "W8A8 (int8 per-channel weights, "
            "dynamic per-token int8 activations)"}
