"""Shared parts of the llm-compressor methods (int8, gptq, awq): scheme building, shape checks, oneshot.

Every method loads the source model in fp32, runs `llmcompressor.oneshot` with its own modifiers on the
pre-tokenized calibration texts, and saves a compressed-tensors directory (vLLM's native quantized format)
with the tokenizer and generation config next to it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from toolkit.errors import MissingExtraError, OptkitError
from toolkit.quantize.dtype import cast_checkpoint, resolve_dtype

log = logging.getLogger("optkit.quantize")


def require_llmcompressor() -> None:
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        raise MissingExtraError("int8/gptq/awq quantization", "llmcompressor", "quant") from None


def int_weight_scheme(bits: int, group_size: Optional[int], symmetric: bool):
    """A W<bits>A16 scheme with our group size, or per output channel when group_size is None (the stock presets
    fix group 128, which does not divide SmolLM2's 576-wide rows)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    grouping = {"strategy": "channel"} if group_size is None else {"strategy": "group", "group_size": group_size}
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, **grouping)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def check_ignore(model, ignore: list[str], field: str) -> None:
    """Every ignore entry must name a module the way llm-compressor matches it (a full name, a class name or a
    're:' pattern): a short name such as 'down_proj' matched nothing there, and those layers were quantized."""
    from compressed_tensors.utils.match import is_match

    modules = list(model.named_modules())
    for entry in ignore:
        if not any(is_match(name, module, entry) for name, module in modules):
            raise OptkitError(f"{field}: '{entry}' matches no module of the model; give full module names (e.g. "
                              "model.layers.0.mlp.down_proj), a class name, or a 're:' pattern (e.g. "
                              "'re:.*down_proj$')")


def check_group_size(model, group_size: int, ignore: list[str], field: str) -> None:
    """Fail before calibration, naming the layer, when a group does not divide a layer's input width."""
    import torch
    from compressed_tensors.utils.match import is_match

    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (ignore and is_match(name, module, ignore)):
            continue
        if module.in_features % group_size:
            raise OptkitError(f"{field} = {group_size} does not divide layer '{name}' (input width "
                              f"{module.in_features}); choose a divisor of {module.in_features} or add the layer "
                              f"to the ignore list")


def load_source(src: Path):
    """The model to quantize, in fp32 (the quantizers' statistics are computed in the model's dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def calibration_dataset(texts: list[str], tokenizer, max_length: int):
    """Pre-tokenized so llm-compressor uses exactly our texts and truncation (no template, no shuffle)."""
    from datasets import Dataset

    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def artifact(name: str, scheme: str, job):
    """The summary entry of a compressed-tensors method (one artifact: the whole directory)."""
    from toolkit.quantize.method import Artifact

    return Artifact(name, "compressed-tensors", facts={"scheme": scheme, "calibration_samples": len(job.texts)})


def run_oneshot(src: Path, out: Path, recipe, texts: list[str], max_length: int, check=None,
                dtype: str = "auto", ignore: tuple[list[str], str] = ((), "")) -> None:
    """Quantize src with the given modifiers and write a compressed-tensors dir to out; every floating tensor
    it writes (embeddings, norms, the ignored layers, quantization scales) in `dtype` (toolkit.quantize.dtype).
    ignore: (the modifiers' ignore list, its recipe field), checked against the model before calibration."""
    require_llmcompressor()
    from llmcompressor import oneshot

    model, tok = load_source(src)
    check_ignore(model, list(ignore[0]), ignore[1])
    if check is not None:
        check(model)
    ds = calibration_dataset(texts, tok, max_length)
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=max_length,
            num_calibration_samples=len(texts), shuffle_calibration_samples=False, pipeline="sequential")
    model.save_pretrained(out, save_compressed=True)
    cast_checkpoint(out, resolve_dtype(dtype, src))  # after compression: the int weights come from fp32 values
    tok.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
