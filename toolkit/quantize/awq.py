"""awq: W4A16 via llm-compressor's AWQ transform (activation-aware scales) + round-to-nearest int4."""

from __future__ import annotations

import contextlib

from pydantic import Field

from toolkit.quantize.method import QuantMethodConfig


class AWQConfig(QuantMethodConfig):
    """W4A16 AWQ via llm-compressor."""

    group_size: int = Field(64, ge=1, description="Weights per quantization group (must divide layer input widths).")
    symmetric: bool = Field(False, description="Symmetric or asymmetric (AWQ default) weights.")
    duo_scaling: bool = Field(True, description="Search scales from activations and weights (AWQ's duo scaling).")
    ignore: list[str] = Field(["lm_head"], description="Modules left unquantized, in quantize.unquantized_dtype "
                              "(names, or 're:<regex>').")


@contextlib.contextmanager
def _no_pin_memory_without_accelerator():
    """llm-compressor's AWQ pins its activation cache unconditionally (to speed host->GPU copies); on a
    CPU-only torch pin_memory() raises. While AWQ runs on such a torch, pinning is skipped: it only ever
    was a transfer optimisation. Scoped, so nothing else in the process is affected."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def run(cfg: AWQConfig, job) -> list:
    from toolkit.quantize.llmc import (artifact, check_group_size, int_weight_scheme, require_llmcompressor,
                                       run_oneshot)

    require_llmcompressor()
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    recipe = [AWQModifier(duo_scaling=cfg.duo_scaling),
              QuantizationModifier(config_groups=int_weight_scheme(4, cfg.group_size, cfg.symmetric),
                                   ignore=list(cfg.ignore))]
    with _no_pin_memory_without_accelerator():
        run_oneshot(job.src, job.out, recipe, job.texts, job.max_length, dtype=job.unquantized_dtype,
                    ignore=(cfg.ignore, "quantize.awq.ignore"),
                    check=lambda m: check_group_size(m, cfg.group_size, cfg.ignore, "quantize.awq.group_size"))
    return [artifact("awq", f"W4A16 group {cfg.group_size} {'sym' if cfg.symmetric else 'asym'} (AWQ scales)", job)]
