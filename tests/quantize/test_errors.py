"""Bad input gets a one-line OptkitError naming the field, layer or file; nothing is half-written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from toolkit.errors import MissingExtraError, OptkitError
from toolkit.pipeline import run_pipeline

from .conftest import fake_run, recipe


def test_indivisible_group_size_names_the_layer(pruned_dir, workdir):
    # 576-wide layers (SmolLM2's hidden size) are not divisible by the stock group size 128.
    fake_run(workdir, pruned_dir)
    with pytest.raises(OptkitError, match=r"quantize\.gptq\.group_size = 128 does not divide layer "
                                          r"'model\.layers\.0\.self_attn\.q_proj' \(input width 576\)"):
        run_pipeline(recipe({"gptq": {"group_size": 128}}), only="quantize")
    assert not (workdir / "artifacts/qtest/quantize/gptq").exists()
    manifest = json.loads((workdir / "artifacts/qtest/quantize/manifest.json").read_text())
    assert manifest["status"] == "failed"


def test_an_ignore_entry_llm_compressor_would_not_match_is_refused(pruned_dir, workdir):
    """'down_proj' passed our group-size check as ignored but llm-compressor matches full names only: those
    layers were quantized anyway (and group 72, which does not divide them, failed inside llm-compressor)."""
    fake_run(workdir, pruned_dir)
    with pytest.raises(OptkitError, match=r"quantize\.gptq\.ignore: 'down_proj' matches no module"):
        run_pipeline(recipe({"gptq": {"group_size": 72, "ignore": ["lm_head", "down_proj"]}}), only="quantize")
    assert not (workdir / "artifacts/qtest/quantize/gptq").exists()


def test_an_ignore_pattern_keeps_those_layers_out_of_the_check_and_the_artifact(pruned_dir, workdir):
    # group 72 divides the 576-wide inputs, not down_proj's 1536: leaving down_proj unquantized makes it valid
    fake_run(workdir, pruned_dir, n_train=16, n_test=4)
    run_pipeline(recipe({"calibration": {"num_samples": 16, "max_length": 64}, "eval_samples": 4,
                         "agreement_samples": 1, "max_new_tokens": 2,
                         "gptq": {"group_size": 72, "ignore": ["lm_head", "re:.*down_proj$"]}}), only="quantize")
    config = json.loads((workdir / "artifacts/qtest/quantize/gptq/config.json").read_text())
    assert set(config["quantization_config"]["ignore"]) == {"lm_head", "model.layers.0.mlp.down_proj",
                                                             "model.layers.1.mlp.down_proj"}


def test_min_samples_above_num_samples_is_refused_with_the_recipe(workdir):
    with pytest.raises(OptkitError, match=r"quantize\.calibration: min_samples \(16\) is more than "
                                          r"calibration\.num_samples \(8\)"):
        recipe({"gptq": {}, "calibration": {"num_samples": 8}})


def test_too_little_calibration_data(pruned_dir, workdir):
    fake_run(workdir, pruned_dir, n_train=5)
    with pytest.raises(OptkitError, match=r"only 5 calibration texts.*quantize\.calibration\.min_samples = 16"):
        run_pipeline(recipe({"gptq": {}}), only="quantize")


def test_quantized_model_fed_back_in(pruned_dir, workdir):
    run = fake_run(workdir, pruned_dir)
    cfg_path = run / "distill/model/config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(OptkitError, match="already quantized \\(compressed-tensors\\)"):
        run_pipeline(recipe({"gguf": {}}), only="quantize")


def test_unsupported_architecture_for_gguf(workdir, tmp_path):
    """A real (tiny, randomly initialised) architecture that llama.cpp's converter does not know."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from toolkit.models import resolve
    from toolkit.quantize import gguf

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    cfg = GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=len(tok), n_positions=128)
    cfg.architectures = ["GPT2LMHeadModelX"]  # a name no converter class is registered for
    src = tmp_path / "odd"
    GPT2LMHeadModel(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    with pytest.raises(OptkitError, match="converter failed.*unsupported architecture"):
        gguf.convert(src, tmp_path / "out.gguf", gguf.converter_dir())
    assert not (tmp_path / "out.gguf").exists()


def test_missing_extra_is_named(monkeypatch):
    from toolkit.quantize import gguf, llmc

    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # what an absent package looks like to import
    with pytest.raises(MissingExtraError, match=r"llmcompressor.*pip install 'optkit\[quant\]'"):
        llmc.require_llmcompressor()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(MissingExtraError, match=r"llama-cpp-python.*pip install 'optkit\[gguf\]'"):
        gguf.llama_cpp_version()


def test_no_method_enabled():
    """Refused by the recipe itself (so `optkit validate` says it), not after collect and distill have run."""
    for section in ({"gptq": {"enabled": False}}, {}):
        with pytest.raises(OptkitError, match="quantize: no method enabled; add one of .*gptq"):
            recipe(section)


def test_schema_refuses_unknown_gguf_type():
    from pydantic import ValidationError

    from toolkit.config import QuantizeConfig

    with pytest.raises(ValidationError):
        QuantizeConfig(gguf={"types": ["Q4_K_XL"]})


def test_import_is_cheap():
    import subprocess

    code = ("import sys, toolkit.quantize; heavy = [m for m in ('torch', 'transformers', 'llmcompressor', "
            "'llama_cpp') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_recipe_section_is_built_from_the_method_registry():
    """Every method (GGUF included) is one registry entry: its settings class and its run, and the recipe's
    quantize section has exactly one field per entry, described by the class."""
    import inspect
    from typing import Optional

    from toolkit.config import QuantizeConfig, QuantMethodConfig
    from toolkit.quantize.registry import METHODS

    assert set(METHODS) == {"int8", "gptq", "awq", "gguf"}
    for name, (cls, run) in METHODS.items():
        assert issubclass(cls, QuantMethodConfig) and callable(run), name
        assert inspect.signature(run).parameters.keys() == {"cfg", "job"}, name  # one interface for all
        field = QuantizeConfig.model_fields[name]
        assert field.annotation == Optional[cls] and field.default is None
        assert field.description == inspect.cleandoc(cls.__doc__)


def test_a_new_method_is_one_class_and_one_registry_line():
    from pydantic import Field, ValidationError

    from toolkit.config import schema_reference
    from toolkit.config.quantize import quantize_config
    from toolkit.quantize.method import QuantMethodConfig
    from toolkit.quantize.registry import METHODS

    class HQQConfig(QuantMethodConfig):
        """Half-quadratic quantization."""

        nbits: int = Field(4, ge=1, le=8, description="Bits per weight.")

    cfg_cls = quantize_config({**METHODS, "hqq": (HQQConfig, lambda cfg, job: [])})
    assert cfg_cls(hqq={"nbits": 3}).hqq.nbits == 3
    assert cfg_cls(gguf={"types": ["Q8_0"]}).gguf.types == ["Q8_0"]
    with pytest.raises(ValidationError):
        cfg_cls(hqq={"nbits": 3, "typo": 1})  # unknown keys stay refused
    rows = schema_reference(cfg_cls, prefix="quantize.")
    assert "| `quantize.hqq` | HQQConfig | None | Half-quadratic quantization. |" in rows
    assert "| `quantize.hqq.nbits` | int | 4 | Bits per weight. |" in rows


def test_modelfile_type_is_checked_by_validate():
    """Caught with the recipe (optkit validate), not after the conversion has run."""
    from pydantic import ValidationError

    from toolkit.config import QuantizeConfig

    with pytest.raises(ValidationError, match="modelfile_type Q4_K_M is not one of types"):
        QuantizeConfig(gguf={"types": ["Q8_0"], "modelfile_type": "Q4_K_M"})


@pytest.mark.parametrize("first", ["toolkit.config", "toolkit.quantize", "toolkit.quantize.gguf",
                                   "toolkit.quantize.registry", "toolkit.config.quantize", "toolkit.pipeline"])
def test_any_import_order_works(first):
    """The schema imports the registry, whose methods import the schema's base: whichever comes first."""
    import subprocess

    code = f"import {first}; from toolkit.config import QuantizeConfig; assert 'gguf' in QuantizeConfig.model_fields"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
