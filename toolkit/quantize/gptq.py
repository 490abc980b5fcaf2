"""gptq: W4A16 (int4 group-wise weights, 16-bit activations) via llm-compressor's GPTQModifier."""

from __future__ import annotations

from pathlib import Path


def quantize(src: Path, out: Path, cfg, texts: list[str], max_length: int) -> dict:
    from toolkit.quantize.llmc import check_group_size, int_weight_scheme, require_llmcompressor, run_oneshot

    require_llmcompressor()
    from llmcompressor.modifiers.gptq import GPTQModifier

    # "weight" act order changes the order GPTQ rounds columns in, not the saved format (no g_idx), so
    # every kernel serves it at normal speed.
    recipe = [GPTQModifier(config_groups=int_weight_scheme(4, cfg.group_size, cfg.symmetric),
                           actorder="weight" if cfg.act_order else None,
                           ignore=list(cfg.ignore), dampening_frac=cfg.dampening_frac)]
    run_oneshot(src, out, recipe, texts, max_length,
                check=lambda m: check_group_size(m, cfg.group_size, cfg.ignore, "quantize.gptq.group_size"))
    return {"method": "gptq", "format": "compressed-tensors",
            "scheme": f"W4A16 group {cfg.group_size} {'sym' if cfg.symmetric else 'asym'}"
                      f"{' act-order' if cfg.act_order else ''}"}
