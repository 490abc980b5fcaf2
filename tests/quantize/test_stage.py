"""The quantize stage end to end on real weights: llm-compressor and llama.cpp produce the contract's
artifacts, each reloads in its engine, summary.json holds the measurements, and a re-run resumes."""

from __future__ import annotations

import json
import math

import pytest

from toolkit.pipeline import run_pipeline

from .conftest import fake_run, recipe


@pytest.mark.slow
def test_every_method_on_a_pruned_smollm2(quantized_run):
    run, rec, outcome = quantized_run
    assert outcome.status == "ran"
    q = run / "quantize"
    summary = json.loads((q / "summary.json").read_text())
    assert set(summary) == {"fp32", "int8", "gptq", "awq", "gguf-Q8_0", "gguf-Q4_K_M"}

    # compressed-tensors dirs with what vLLM needs next to the weights
    formats = {"int8": "int-quantized", "gptq": "pack-quantized", "awq": "pack-quantized"}
    for name, fmt in formats.items():
        d = q / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
            assert (d / f).is_file(), f"{name}/{f}"
        qc = json.loads((d / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
        weights = qc["config_groups"]["group_0"]["weights"]
        assert weights["num_bits"] == (8 if name == "int8" else 4)
        assert summary[name]["path"] == name and summary[name]["calibration_samples"] == 16
    gptq_w = json.loads((q / "gptq/config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert gptq_w["weights"]["group_size"] == 32 and gptq_w["weights"]["symmetric"] is False
    assert gptq_w["weights"]["actorder"] == "weight"

    # GGUF files + a Modelfile pointing at the first type
    assert (q / "gguf/model-Q8_0.gguf").is_file() and (q / "gguf/model-Q4_K_M.gguf").is_file()
    modelfile = (q / "gguf/Modelfile").read_text()
    assert modelfile.splitlines()[1] == "FROM ./model-Q8_0.gguf"
    # Ollama runs no Jinja: SmolLM2's ChatML template and the system turn it adds by itself are spelled out
    assert 'TEMPLATE """{{ if .System }}<|im_start|>system' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "<|im_start|>"' in modelfile
    assert summary["gguf-Q4_K_M"]["size_bytes"] < summary["gguf-Q8_0"]["size_bytes"]

    # one interface for every method (GGUF included): each artifact carries its method and its build time
    for name, entry in summary.items():
        if name != "fp32":
            assert entry["method"] == name.split("-")[0] and entry["quantize_seconds"] > 0, name

    base = math.log(summary["fp32"]["perplexity"])
    for name, entry in summary.items():
        assert math.isfinite(entry["perplexity"]) and entry["eval_tokens"] > 50, name
        # the teacher's answers alone: a few tokens per text, scored inside the same forward pass
        assert math.isfinite(entry["answer_perplexity"]) and 0 < entry["answer_tokens"] < entry["eval_tokens"], name
        assert entry["tokens_per_s"] > 0, name
        assert entry["engine"].startswith("llama.cpp" if name.startswith("gguf") else "transformers"), name
        if name != "fp32":
            assert entry["size_bytes"] < summary["fp32"]["size_bytes"], name
            assert "ppl_increase_pct" in entry and "answer_ppl_increase_pct" in entry
            # The pruned model is a poor LM (log-perplexity ~58 nats), so quantization noise moves it by up
            # to ~2.6 nats (AWQ's rescaling, measured); broken scales, random weights or a wrong vocab land
            # near log(vocab) ~ 11 nats or beyond 100, tens of nats away. Quality on a real model: the bench.
            assert abs(math.log(entry["perplexity"]) - base) < 4.0, (name, entry["perplexity"])
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["status"] == "done" and "gptq/model.safetensors" in manifest["outputs"]
    assert not any(k.startswith("work/") for k in manifest["outputs"])
    assert manifest["metrics"]["gguf_Q4_K_M_ppl_increase_pct"] == summary["gguf-Q4_K_M"]["ppl_increase_pct"]

    # unchanged re-run: skipped; a re-run after an interruption reuses finished artifacts
    assert run_pipeline(rec, only="quantize")[0].status == "skipped"
    before = (q / "gptq/model.safetensors").stat().st_mtime_ns
    (q / "manifest.json").unlink()  # as if the run died after the artifacts were verified ...
    (q / ".gguf.tmp-killed").mkdir()  # ... while a method's half-built directory was being written
    (q / ".gguf.tmp-killed/model-Q8_0.gguf").write_bytes(b"GGUF half")
    assert run_pipeline(rec, only="quantize")[0].status == "ran"
    assert not (q / ".gguf.tmp-killed").exists()
    assert (q / "gptq/model.safetensors").stat().st_mtime_ns == before
    assert json.loads((q / "summary.json").read_text())["gptq"] == summary["gptq"]


@pytest.mark.slow
def test_gguf_vocab_matches_the_hf_tokenizer(quantized_run, pruned_dir):
    """The stage's GGUF tokenizes and decodes text exactly as the HF tokenizer (a byte-level BPE must not
    become a sentencepiece vocab, which would print 'Ġ' in every answer)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    run, _, _ = quantized_run
    tok = AutoTokenizer.from_pretrained(pruned_dir)
    llm = Llama(model_path=str(run / "quantize/gguf/model-Q8_0.gguf"), vocab_only=True, verbose=False)
    text = "I want to cancel order 732201349959, it's too late?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == text


def test_calibration_falls_back_to_prompts(pruned_dir, workdir):
    from transformers import AutoTokenizer

    from toolkit.config import CalibrationConfig
    from toolkit.pipeline import StageContext
    from toolkit.quantize.calibration import calibration_texts, load_examples, renderer_for
    from toolkit.tracking import NullTracker

    run = fake_run(workdir, pruned_dir, outputs=False)
    ctx = StageContext("quantize", recipe({"gptq": {}}), run, run / "quantize", NullTracker())
    examples = load_examples(ctx)
    assert len(examples) == 52 and all(e.teacher is None for e in examples)
    tok = renderer_for(ctx, AutoTokenizer.from_pretrained(pruned_dir))  # as the stage renders
    texts = calibration_texts(examples, tok, CalibrationConfig(num_samples=64))
    assert len(texts) == 40  # the whole train split; no test prompt leaks into calibration
    assert texts[0].endswith("<|im_start|>assistant\n")


def test_settings_changed_and_back_or_new_data_rebuild_and_rescore(pruned_dir, workdir):
    """quantize/<method>/ is shared by every settings key: W8A8 -> W8A16 -> W8A8 reused the first run's record
    and scores for the W8A16 files on disk. And the key ignored the data: a new split was scored (and calibrated)
    with the old artifact's numbers."""
    run = fake_run(workdir, pruned_dir, n_train=16, n_test=4)
    base = {"calibration": {"num_samples": 16, "max_length": 64}, "eval_samples": 4, "agreement_samples": 1,
            "max_new_tokens": 2}
    q = run / "quantize"

    def once(scheme, force=False):
        outcome, = run_pipeline(recipe({**base, "int8": {"scheme": scheme}}, artifacts_dir=str(workdir / "artifacts")),
                                only="quantize", force=force)
        group = json.loads((q / "int8" / "config.json").read_text())["quantization_config"]["config_groups"]
        on_disk = "W8A8" if group["group_0"].get("input_activations") else "W8A16"
        return outcome.status, json.loads((q / "summary.json").read_text()), on_disk

    _, first, _ = once("W8A8")
    assert once("W8A16")[2] == "W8A16"
    status, summary, on_disk = once("W8A8")
    assert status == "ran" and summary["int8"]["scheme"].startswith("W8A8") and on_disk == "W8A8"
    assert summary["int8"]["perplexity"] == pytest.approx(first["int8"]["perplexity"])
    assert len(list((q / "work" / "verified").iterdir())) == 1  # older keys (and their F16 GGUFs) go

    outputs = run / "collect" / "outputs.jsonl"  # collect ran again: the held-out prompts are other ones now
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    for r in rows[-4:]:
        r["messages"][-1]["content"] = r["prompt"] = r["prompt"][::-1]
    outputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, summary, _ = once("W8A8", force=True)  # (no collect section here: the pipeline cannot see collect change)
    assert summary["fp32"]["perplexity"] != pytest.approx(first["fp32"]["perplexity"])
    assert summary["int8"]["perplexity"] != pytest.approx(first["int8"]["perplexity"])


def test_a_plain_text_recipe_gets_a_modelfile_without_a_chat_wrapper(pruned_dir, tmp_path):
    """data.chat_template: false means the student was trained and scored on raw prompts; the Modelfile still
    wrapped them in ChatML with SmolLM's system turn, a conversation it never saw."""
    pytest.importorskip("llama_cpp")
    from toolkit.quantize.gguf import GGUFConfig, run
    from toolkit.quantize.method import Job

    job = Job(src=pruned_dir, out=tmp_path / "out", work=tmp_path / "work", children=tmp_path / "children",
              chat_template=False)
    run(GGUFConfig(types=["Q8_0"]), job)
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile
    assert "<|im_start|>system" not in modelfile and "SYSTEM" not in modelfile
