"""gptq: W4A16 (int4 group-wise weights, 16-bit activations) via llm-compressor's GPTQModifier."""

from __future__ import annotations

from pydantic import Field

from toolkit.quantize.method import QuantMethodConfig


class GPTQConfig(QuantMethodConfig):
    """W4A16 GPTQ via llm-compressor."""

    group_size: int = Field(32, ge=1, description="Weights per quantization group (must divide every quantized "
                            "layer's input width; SmolLM2's 576 needs 32, 64 or 192, not 128). On SmolLM2-135M "
                            "group 32 asymmetric beat group 64 symmetric (+0.5% vs +6.7% perplexity, one split); "
                            "on held-out rows g32 asym lands at +0.8..+1.5% (eval/bench_quantize.md).")
    act_order: bool = Field(True, description="GPTQ rounds columns in order of activation magnitude ('weight' "
                            "act order: better accuracy, same saved format and speed).")
    symmetric: bool = Field(False, description="Symmetric (no zero point) or asymmetric weights (default: "
                            "asymmetric, measured better).")
    dampening_frac: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening (fraction of its mean "
                                  "diagonal).")
    ignore: list[str] = Field(["lm_head"], description="Modules left unquantized, in quantize.unquantized_dtype "
                              "(names, or 're:<regex>', e.g. 're:.*layers\\.0\\..*' to keep the first block).")


def run(cfg: GPTQConfig, job) -> list:
    from toolkit.quantize.llmc import (artifact, check_group_size, int_weight_scheme, require_llmcompressor,
                                       run_oneshot)

    require_llmcompressor()
    from llmcompressor.modifiers.gptq import GPTQModifier

    # "weight" act order changes the order GPTQ rounds columns in, not the saved format (no g_idx), so
    # every kernel serves it at normal speed.
    recipe = [GPTQModifier(config_groups=int_weight_scheme(4, cfg.group_size, cfg.symmetric),
                           actorder="weight" if cfg.act_order else None,
                           ignore=list(cfg.ignore), dampening_frac=cfg.dampening_frac)]
    run_oneshot(job.src, job.out, recipe, job.texts, job.max_length, dtype=job.unquantized_dtype,
                ignore=(cfg.ignore, "quantize.gptq.ignore"),
                check=lambda m: check_group_size(m, cfg.group_size, cfg.ignore, "quantize.gptq.group_size"))
    scheme = (f"W4A16 group {cfg.group_size} {'sym' if cfg.symmetric else 'asym'}"
              f"{' act-order' if cfg.act_order else ''}")
    return [artifact("gptq", scheme, job)]
