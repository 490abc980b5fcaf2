"""The distill stage through the real pipeline: contract outputs, MLflow curves, KD variants, bad input."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.distill.helpers import (bitext_rows, build_tiny_llama, grow_disk, make_records, recipe_dict, small_disk,
                                   write_collect)
from toolkit.config import recipe_from_dict
from toolkit.errors import OptkitError
from toolkit.pipeline import run_dir_for, run_pipeline

pytestmark = pytest.mark.slow  # every test here trains (tiny model, seconds each)

TRAIN = {"max_steps": 6, "batch_size": 4, "save_steps": 3, "logging_steps": 1, "learning_rate": 2e-3}


def run_distill(workdir, teacher, distill, records=None, topk=None, tracking=False):
    data = recipe_dict(workdir, str(teacher), distill)
    data["tracking"] = {"enabled": tracking}
    recipe = recipe_from_dict(data)
    write_collect(run_dir_for(recipe), records if records is not None else make_records(bitext_rows(40)), topk)
    outcome, = run_pipeline(recipe, only="distill")
    return recipe, outcome, run_dir_for(recipe) / "distill"


def test_lora_stage_writes_the_contract_outputs_and_logs_curves(workdir, tiny_teacher):
    records = make_records(bitext_rows(40))
    recipe, outcome, d = run_distill(workdir, tiny_teacher, {
        "student": {"from_teacher": {"num_layers": 2, "score_batches": 1}}, "method": "lora",
        "lora": {"dropout": 0.0}, "training": TRAIN}, records, tracking=True)
    assert outcome.status == "ran"
    # base/: the untrained pruned student; adapter/: peft; model/: merged, vLLM-ready files
    for f in ("base/config.json", "base/model.safetensors", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors", "model/config.json", "model/model.safetensors",
              "model/tokenizer.json", "model/generation_config.json"):
        assert (d / f).is_file(), f
    assert json.loads((d / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    # published as hard links to work/final, not a second copy of the weights
    assert os.path.samefile(d / "model" / "model.safetensors", d / "work" / "final" / "model" / "model.safetensors")
    adapter_cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 16
    # the merged model is base + adapter: same logits either way
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(d / "model")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d / "base"), d / "adapter")
    ids = torch.tensor([[1, 200, 300, 400]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, AutoModelForCausalLM.from_pretrained(d / "base")(ids).logits)

    student = json.loads((d / "student.json").read_text())
    assert student["source"] == "from_teacher" and len(student["kept_layers"]) == 2
    assert student["selection"] == "search" and len(student["candidates"]) >= 3
    assert student["param_ratio"] < 1 and student["training"]["global_step"] == 6
    assert student["training"]["data"]["examples"] == sum(r["split"] == "train" for r in records)

    rows = [json.loads(x) for x in (d / "student_outputs.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == {r["id"] for r in records if r["split"] in ("val", "test")}
    assert all(set(r) == {"id", "split", "output", "output_tokens", "latency_s"} for r in rows)
    assert all(1 <= r["output_tokens"] <= 6 for r in rows)  # collect.generation.max_new_tokens

    report = json.loads((d / "eval.json").read_text())
    test, val = report["test"], report["val"]
    for key in ("agreement_exact", "agreement_f1", "agreement_rouge_l", "agreement_label",
                "student_gold_accuracy", "teacher_gold_accuracy"):
        assert key in test and key in val
    assert test["teacher_gold_accuracy"] == 1.0  # these records' teacher answered the gold label
    assert test["n"] == sum(r["split"] == "test" for r in records)
    # the validation loss (teacher's answers under each model) on val; the test split's quality is evaluate's
    assert "student_nll" not in test and 0 < val["teacher_nll"] and 0 < val["student_nll"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["val_student_nll"] == val["student_nll"]
    assert not any(k.startswith("work/") for k in manifest["outputs"])

    # training curves reached MLflow with their steps
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'artifacts' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`optkit.stage` = 'distill'")
    history = client.get_metric_history(runs[0].info.run_id, "train.loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]

    # unchanged config: skipped; the pipeline does not retrain
    outcome2, = run_pipeline(recipe, only="distill")
    assert outcome2.status == "skipped"

    # another answer precision (distill.eval_dtype) re-answers and re-scores, but reuses the finished training
    trained = (d / "work" / "train_result.json").read_bytes()
    other = "float32" if recipe.distill.eval_dtype != "float32" else "bfloat16"
    recipe3 = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"eval_dtype": other})})
    outcome3, = run_pipeline(recipe3, only="distill")
    assert outcome3.status == "ran" and (d / "work" / "train_result.json").read_bytes() == trained
    assert {r["id"] for r in map(json.loads, (d / "student_outputs.jsonl").read_text().splitlines())} == \
        {r["id"] for r in records if r["split"] in ("val", "test")}


def test_max_examples_goes_from_the_recipe_through_the_stage_to_the_workers(workdir, tiny_teacher):
    """distill.training.max_examples in the recipe → the stage's typed spec (work/train_spec.json) → two DDP
    workers started by the launcher → the number of examples they actually trained on."""
    records = make_records(bitext_rows(40))
    n_train = sum(r["split"] == "train" for r in records)
    _, outcome, d = run_distill(workdir, tiny_teacher, {
        "student": {"from_teacher": {"num_layers": 2, "selection": "first"}}, "method": "lora",
        "launcher": {"num_processes": 2},
        "training": {"max_examples": 6, "batch_size": 1, "epochs": 1, "save_steps": 50, "logging_steps": 1}},
        records)
    assert outcome.status == "ran"
    written = json.loads((d / "work" / "train_spec.json").read_text())
    # each value once, under training: no top-level copy a worker could read instead
    assert written["training"]["max_examples"] == 6 and not {"limit", "max_length", "seed"} & set(written)
    result = json.loads((d / "work" / "train_result.json").read_text())
    assert result["spec"] == written  # the workers read exactly what the stage wrote
    assert result["world_size"] == 2 and result["data"]["examples"] == 6 < n_train
    # 6 examples / (2 workers x batch 1) = 3 optimizer steps in the one epoch; all 24 answers would take 12
    assert result["global_step"] == 3
    training = json.loads((d / "student.json").read_text())["training"]
    assert training["global_step"] == 3 and "spec" not in training


def test_disk_full_fails_the_stage_in_one_line_keeps_the_checkpoints_and_a_rerun_resumes(workdir, tiny_teacher):
    """ENOSPC while saving the trained student: `disk full: <path>`, the stage is not done, the checkpoints stay;
    with space again the same command resumes from them instead of retraining."""
    spec = {"student": {"from_teacher": {"num_layers": 2, "selection": "first"}}, "method": "lora",
            "lora": {"dropout": 0.0}, "training": TRAIN}
    # 24 MiB: records, base/ (~17 MiB) and the small LoRA checkpoints fit; work/final (as big as base/) does not
    with small_disk(workdir / "artifacts", 24) as disk:
        with pytest.raises(OptkitError, match=r"^disk full: \S+/distill/work/final \(.*resumes from checkpoint-6\)$"):
            run_distill(workdir, tiny_teacher, spec)
        d = disk / "t" / "distill"
        assert json.loads((d / "manifest.json").read_text())["status"] == "failed"
        assert sorted(p.name for p in (d / "work" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3",
                                                                                           "checkpoint-6"]
        assert not (d / "model").exists() and not (d / "work" / "train_result.json").exists()
        grow_disk(disk, 256)
        recipe = recipe_from_dict({**recipe_dict(workdir, str(tiny_teacher), spec), "tracking": {"enabled": False}})
        outcome, = run_pipeline(recipe, only="distill")
        assert outcome.status == "ran"
        training = json.loads((d / "student.json").read_text())["training"]
        assert training["resumed_from"] == "checkpoint-6" and training["global_step"] == 6


def test_full_finetune_with_precomputed_topk_kd(workdir, tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    records = make_records(bitext_rows(24))
    topk = {}
    for r in records:  # teacher top-5 per output token, with the output's own token first
        ids = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        t_ids = torch.tensor([[t, 10, 11, 12, 13] for t in ids], dtype=torch.int32)
        t_lps = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.5, 0.2, 0.1]] * len(ids)), -1).half()
        topk[r["id"]] = (t_ids, t_lps)
    _, outcome, d = run_distill(workdir, tiny_teacher, {
        "student": {"from_teacher": {"num_layers": 2, "selection": "first_last"}}, "method": "full",
        "kd": {"loss": "forward_kl", "source": "precomputed", "ratio": 0.5}, "training": TRAIN}, records, topk)
    assert outcome.status == "ran"
    assert not (d / "adapter").exists() and (d / "model" / "model.safetensors").is_file()
    student = json.loads((d / "student.json").read_text())
    assert student["kept_layers"] == [0, 3] and student["training"]["data"]["topk_misaligned"] == 0


def test_online_jsd_kd_changes_training_versus_plain_sft(workdir, tiny_teacher):
    common = {"student": {"from_teacher": {"num_layers": 2, "selection": "first"}}, "method": "full",
              "training": TRAIN}
    _, _, d_sft = run_distill(workdir / "a", tiny_teacher, common)
    _, _, d_kd = run_distill(workdir / "b", tiny_teacher, {**common, "kd": {"loss": "jsd", "ratio": 0.7}})
    loss = lambda d: json.loads((d / "student.json").read_text())["training"]["train_loss"]  # noqa: E731
    assert loss(d_sft) != pytest.approx(loss(d_kd), rel=1e-3)
    w_sft = load_file(str(d_sft / "model" / "model.safetensors"))
    w_kd = load_file(str(d_kd / "model" / "model.safetensors"))
    assert not torch.allclose(w_sft["model.layers.0.mlp.up_proj.weight"], w_kd["model.layers.0.mlp.up_proj.weight"])


def test_incompatible_tokenizer_for_logit_kd_fails_before_training(workdir, tiny_teacher):
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    from toolkit.models import resolve

    other = workdir / "bert_student"
    tok = BertTokenizerFast.from_pretrained(resolve("minilm-l6"))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(OptkitError, match="distill.kd.loss: logit KD needs the same vocabulary"):
        run_distill(workdir, tiny_teacher, {"student": {"model": str(other)}, "kd": {"loss": "forward_kl"},
                                            "training": TRAIN})
    assert not (workdir / "artifacts" / "t" / "distill" / "work" / "checkpoints").exists()


def test_student_larger_than_teacher_warns(workdir, tiny_teacher, smollm2_dir, caplog):
    big = build_tiny_llama(workdir / "big", smollm2_dir, layers=6, hidden=64)
    with caplog.at_level(logging.WARNING, logger="optkit.distill"):
        _, outcome, d = run_distill(workdir, tiny_teacher, {"student": {"model": str(big)}, "method": "full",
                                                            "training": {**TRAIN, "max_steps": 1}})
    assert "larger than the teacher" in caplog.text
    assert json.loads((d / "student.json").read_text())["param_ratio"] > 1


def test_all_teacher_outputs_empty_is_an_error(workdir, tiny_teacher):
    records = make_records(bitext_rows(10), outputs=[""] * 10)
    with pytest.raises(OptkitError, match="no usable (scoring|training) examples"):
        run_distill(workdir, tiny_teacher, {"student": {"from_teacher": {"num_layers": 2}}, "training": TRAIN},
                    records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines; this one has a GPU")
def test_qlora_on_cpu_fails_the_stage_with_the_reason(workdir, tiny_teacher):
    with pytest.raises(OptkitError, match="qlora needs a CUDA GPU"):
        run_distill(workdir, tiny_teacher, {"student": {"from_teacher": {"num_layers": 2}}, "method": "qlora",
                                            "training": TRAIN})


def test_new_teacher_answers_train_a_new_student_instead_of_reusing_the_finished_one(workdir, tiny_teacher):
    """collect re-ran with other answers (new teacher, new data): distill said "training already finished for this
    spec; reusing it" and published a student trained on the old answers (the spec named collect by its path)."""
    spec = {"student": {"from_teacher": {"num_layers": 2, "selection": "first"}}, "method": "lora",
            "training": {"max_steps": 2, "batch_size": 4, "save_steps": 1, "logging_steps": 1}}
    rows = bitext_rows(20)
    recipe, outcome, d = run_distill(workdir, tiny_teacher, spec, make_records(rows))
    first = json.loads((d / "work" / "train_result.json").read_text())
    c = write_collect(run_dir_for(recipe), make_records(rows, outputs=["I cannot help with that."] * len(rows)))
    manifest = json.loads((c / "manifest.json").read_text())
    (c / "manifest.json").write_text(json.dumps({**manifest, "config_hash": "collect-ran-again"}))
    outcome, = run_pipeline(recipe, only="distill")
    second = json.loads((d / "work" / "train_result.json").read_text())
    assert outcome.status == "ran" and second["spec_hash"] != first["spec_hash"]
    assert second["spec"]["data_hash"] != first["spec"]["data_hash"] and second["train_loss"] != first["train_loss"]


def test_two_training_processes_report_and_train_at_the_loss_one_process_does(workdir, tiny_teacher):
    """The token count behind the loss is summed over the ranks, and DDP averages gradients across them: without
    scaling back (as transformers' own compute_loss does) 2 processes logged half the loss and took half-size
    steps. Same 24 examples, one epoch, a learning rate too small to move the weights: 1 x 4 vs 2 x 2 per step."""
    records = make_records(bitext_rows(30), val_every=10)
    losses = {}
    for n, batch in ((1, 4), (2, 2)):
        run = workdir / f"p{n}"
        run.mkdir()
        os.chdir(run)
        _, outcome, d = run_distill(run, tiny_teacher, {
            "student": {"from_teacher": {"num_layers": 2, "selection": "first"}}, "method": "lora",
            "launcher": {"num_processes": n},
            "training": {"epochs": 1, "batch_size": batch, "learning_rate": 1e-9, "save_steps": 100,
                         "logging_steps": 1}}, records)
        result = json.loads((d / "work" / "train_result.json").read_text())
        assert outcome.status == "ran" and result["world_size"] == n
        losses[n] = result["train_loss"]
    assert losses[2] == pytest.approx(losses[1], rel=0.02)


def test_a_two_process_cpu_run_resumes_from_its_checkpoint(workdir, tiny_teacher):
    """transformers restores the optimizer state to args.device, which a gloo worker names "cpu:0": torch could not
    restore to it, so every interrupted multi-process CPU training failed on the re-run."""
    spec = {"student": {"from_teacher": {"num_layers": 2, "selection": "first"}}, "method": "lora",
            "launcher": {"num_processes": 2},
            "training": {"max_steps": 4, "batch_size": 2, "save_steps": 2, "logging_steps": 1}}
    recipe, outcome, d = run_distill(workdir, tiny_teacher, spec)
    ckpts = d / "work" / "checkpoints"
    assert outcome.status == "ran" and sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2",
                                                                                            "checkpoint-4"]
    import shutil

    shutil.rmtree(ckpts / "checkpoint-4")  # as if killed between the two saves
    shutil.rmtree(d / "work" / "final")
    (d / "work" / "train_result.json").unlink()
    outcome, = run_pipeline(recipe, only="distill", force=True)
    training = json.loads((d / "student.json").read_text())["training"]
    assert outcome.status == "ran" and training["resumed_from"] == "checkpoint-2" and training["global_step"] == 4


def test_weights_that_are_not_finite_are_never_published(tmp_path):
    from toolkit.distill.train import NonFiniteLoss, check_finite_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check_finite_weights(model, tmp_path)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"1 weight tensors are not finite after training \(first: 1\.weight\)"):
        check_finite_weights(model, tmp_path)
