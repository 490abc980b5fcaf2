"""Size honesty (issue 16): what a compressed-tensors artifact keeps unquantized is written in the model's
16-bit dtype, and every artifact reports bits per weight against the source's parameter count."""

from __future__ import annotations

import json

import pytest

from toolkit.quantize.dtype import bits_per_weight, cast_checkpoint, parameter_count, resolve_dtype


def _config(tmp_path, **fields):
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return tmp_path


@pytest.mark.parametrize("fields, choice, expected", [
    ({"dtype": "float32"}, "auto", "bfloat16"),  # a checkpoint converted to fp32 still serves in 16 bits
    ({"torch_dtype": "float16"}, "auto", "float16"),  # the model's own 16-bit dtype
    ({"dtype": "bfloat16"}, "auto", "bfloat16"),
    ({"dtype": "bfloat16"}, "float32", "float32"),  # asked otherwise
])
def test_resolve_dtype(tmp_path, fields, choice, expected):
    assert resolve_dtype(choice, _config(tmp_path, **fields)) == expected


def test_cast_checkpoint_casts_floats_and_keeps_ints(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = _config(tmp_path, torch_dtype="float32", model_type="llama")
    save_file({"embed.weight": torch.randn(8, 4), "q.weight": torch.randint(-8, 8, (4, 4), dtype=torch.int8),
               "q.weight_scale": torch.rand(4, 1), "q.weight_zero_point": torch.zeros(4, 1, dtype=torch.int32)},
              out / "model.safetensors")
    (out / "model.safetensors").chmod(0o644)
    cast_checkpoint(out, "bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {"embed.weight": torch.bfloat16, "q.weight": torch.int8, "q.weight_scale": torch.bfloat16,
                      "q.weight_zero_point": torch.int32}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_parameter_count_reads_headers_and_counts_a_tied_head_once(pruned_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert parameter_count(pruned_dir) == sum(unique.values())
    assert bits_per_weight(parameter_count(pruned_dir) * 2, parameter_count(pruned_dir)) == 16.0


@pytest.mark.slow
def test_stage_artifacts_keep_unquantized_tensors_in_16_bits(quantized_run, pruned_dir):
    """int8 / gptq / awq: embeddings, norms and scales in bfloat16 (the source config says float32), and
    every summary entry's bits per weight = size * 8 / the source's parameters."""
    from safetensors import safe_open

    run, _, _ = quantized_run
    q = run / "quantize"
    summary = json.loads((q / "summary.json").read_text())
    params = parameter_count(pruned_dir)
    for name in ("int8", "gptq", "awq"):
        with safe_open(q / name / "model.safetensors", "pt") as f:
            floats = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()
                      if str(f.get_slice(k).get_dtype()).startswith(("F", "BF"))}
        assert floats and set(floats.values()) == {"BF16"}, (name, {k: v for k, v in floats.items() if v != "BF16"})
        assert "model.embed_tokens.weight" in floats
        assert json.loads((q / name / "config.json").read_text())["dtype"] == "bfloat16"
    for name, entry in summary.items():
        assert entry["bits_per_weight"] == round(entry["size_bytes"] * 8 / params, 2), name
    # the 2-block model is mostly embeddings: in 16 bits they halve, so INT4 lands under 16 bits per weight
    assert summary["gptq"]["bits_per_weight"] < 16 < summary["fp32"]["bits_per_weight"]
