"""awq: W4A16 via llm-compressor's AWQ transform (activation-aware scales) + round-to-nearest int4."""

from __future__ import annotations

import contextlib
from pathlib import Path


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


def quantize(src: Path, out: Path, cfg, texts: list[str], max_length: int) -> dict:
    from toolkit.quantize.llmc import check_group_size, int_weight_scheme, require_llmcompressor, run_oneshot

    require_llmcompressor()
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    recipe = [AWQModifier(duo_scaling=cfg.duo_scaling),
              QuantizationModifier(config_groups=int_weight_scheme(4, cfg.group_size, cfg.symmetric),
                                   ignore=list(cfg.ignore))]
    with _no_pin_memory_without_accelerator():
        run_oneshot(src, out, recipe, texts, max_length,
                    check=lambda m: check_group_size(m, cfg.group_size, cfg.ignore, "quantize.awq.group_size"))
    return {"method": "awq", "format": "compressed-tensors",
            "scheme": f"W4A16 group {cfg.group_size} {'sym' if cfg.symmetric else 'asym'} (AWQ scales)"}
