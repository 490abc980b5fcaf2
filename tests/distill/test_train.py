"""Training mechanics on a tiny Llama (real SmolLM2 tokenizer, real Bitext prompts): the loss, guards,
kill -9 + resume, and a real 2-process DDP run over gloo through the toolkit's launcher."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pydantic import ValidationError

from tests.distill.helpers import (REPO, bitext_rows, build_tiny_llama, grow_disk, make_records, small_disk,
                                   write_collect)
from toolkit.config import KDConfig, LoraSettings, ModelSpec, TrainConfig
from toolkit.config.distill import TrainSpec
from toolkit.distill import launch
from toolkit.distill.data import build_examples
from toolkit.distill.train import (LeftPadCollator, NonFiniteLoss, avoid_cudnn_attention_backward, check_method,
                                   complete_checkpoints, make_trainer_class, read_spec, train)
from toolkit.errors import OptkitError


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("train")
    base = build_tiny_llama(root / "base", smollm2_dir, layers=2, hidden=64, seed=1)
    collect = write_collect(root / "run", make_records(bitext_rows(60)))
    return base, collect


def make_spec(base, collect, work, method="full", kd=None, seed=0, **training) -> TrainSpec:
    t = TrainConfig(**{"batch_size": 4, "max_steps": 8, "save_steps": 4, "logging_steps": 1, "learning_rate": 1e-3,
                       "warmup_ratio": 0.0, "max_length": 128, "seed": seed, "bf16": False, **training})
    return TrainSpec(student_dir=str(base), collect_dir=str(collect), work_dir=str(work), method=method,
                     lora=LoraSettings(dropout=0.0), kd=kd or KDConfig(), training=t, chat_template=True,
                     teacher=ModelSpec(model=str(base)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for CPU-only machines; this one has a GPU")
def test_qlora_is_refused_on_cpu_before_anything_loads():
    with pytest.raises(OptkitError, match="qlora needs a CUDA GPU.*zero LoRA gradients"):
        check_method("qlora")
    check_method("lora")
    check_method("full")


def test_training_on_cuda_turns_off_the_cudnn_attention_backend(monkeypatch):
    # A test double for the GPU (none here): torch.cuda.is_available is faked so the guard's CUDA branch runs on
    # the CPU. The bug it avoids (NaN gradients from cuDNN's SDPA backward on 64-token left-padded batches,
    # torch#196678) was seen on an H200 through eval/gpu_check.sh, which is where the real check runs.
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert avoid_cudnn_attention_backward() is False and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert avoid_cudnn_attention_backward() is True and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("twice", [{"max_length": 64}, {"min_completion_tokens": 3}, {"limit": 5},
                                   {"max_examples": 5}, {"seed": 1}, {"bf16": True}])
def test_a_spec_cannot_hold_a_training_value_twice(setup, tmp_path, twice):
    """Each value lives in spec.training only: a second copy beside it (the old spec had max_length, limit, ...
    twice and the worker read the other one) is refused when built and when a worker reads it back."""
    base, collect = setup
    good = make_spec(base, collect, tmp_path).model_dump(mode="json")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainSpec.model_validate({**good, **twice})
    path = tmp_path / "train_spec.json"
    path.write_text(json.dumps({**good, **twice}))
    key = next(iter(twice))
    with pytest.raises(OptkitError, match=rf"^{re.escape(str(path))}: {key}: unknown key.*another optkit version"):
        read_spec(path)
    path.write_text(json.dumps(good))
    assert read_spec(path) == make_spec(base, collect, tmp_path)


def test_a_spec_must_be_resolved(setup, tmp_path):
    """seed and bf16 may default in the recipe ('recipe seed', 'auto'), never in the spec: each worker would
    resolve them on its own."""
    base, collect = setup
    good = make_spec(base, collect, tmp_path).model_dump(mode="json")
    for key, value in (("seed", None), ("bf16", "auto")):
        with pytest.raises(ValidationError, match=f"training.{key} must be resolved"):
            TrainSpec.model_validate({**good, "training": {**good["training"], key: value}})


def test_completion_only_loss_equals_plain_cross_entropy_per_example(setup):
    """Left padding + position ids + logits_to_keep must give the same loss as an unpadded full forward."""
    base, collect = setup
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    examples, _ = build_examples(make_records(bitext_rows(3), outputs=["ORDER", "REFUND me now", "X"]), tok, 128)
    batch = LeftPadCollator(tok.pad_token_id, with_topk=False)(examples)
    trainer = make_trainer_class().__new__(make_trainer_class())  # compute_loss needs no Trainer state here
    trainer.kd = {"loss": "none"}
    trainer.model_accepts_loss_kwargs = True
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        total, count = 0.0, 0
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            logits = model(ids).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            mask = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            count += int(mask.sum())
    assert float(ours) == pytest.approx(total / count, rel=1e-4)


def test_a_shared_prompt_prefix_computed_once_gives_the_same_loss_and_gradients(setup):
    """collate lays the prompt head every row shares out once and forward runs it at batch 1, its KV cache
    repeated: loss and LoRA gradients must equal plain left padding's (float tolerance)."""
    from peft import LoraConfig, get_peft_model

    base, _ = setup
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    examples, _ = build_examples(make_records(bitext_rows(4), outputs=["ORDER", "REFUND me now", "X", "a b c"]),
                                 tok, 128)
    trainer = make_trainer_class().__new__(make_trainer_class())
    trainer.kd = {"loss": "none"}
    trainer.model_accepts_loss_kwargs = True
    results = []
    for share in (True, False):
        batch = LeftPadCollator(tok.pad_token_id, with_topk=False, share_prefix=share)(examples)
        assert (batch["shared_prefix"] > 0) == share
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.detach()), grads))
    (loss_shared, g_shared), (loss_plain, g_plain) = results
    assert loss_shared == pytest.approx(loss_plain, rel=1e-5)
    assert g_shared.keys() == g_plain.keys() and len(g_plain) > 0
    for name in g_plain:
        assert torch.allclose(g_shared[name], g_plain[name], rtol=1e-3, atol=1e-6), name
    assert any(float(g.abs().sum()) > 0 for g in g_plain.values())


def test_max_examples_trains_on_the_first_n_train_answers(setup):
    """training.max_examples (data-size curves) keeps the first N train records (collect's order); the stage
    test checks the recipe → stage → worker path and the examples actually trained on."""
    from toolkit.distill.train import load_examples

    base, collect = setup
    tok = AutoTokenizer.from_pretrained(base)
    every, every_stats = load_examples(make_spec(base, collect, collect), tok)
    few, few_stats = load_examples(make_spec(base, collect, collect, max_examples=5), tok)
    assert every_stats["examples"] == len(every) > 5 and few_stats["examples"] == 5
    assert [e["input_ids"] for e in few] == [e["input_ids"] for e in every[:5]]


def test_same_seed_same_lora_student(setup, tmp_path):
    # The LoRA matrices are initialised when peft wraps the model, before the Trainer seeds anything: unseeded,
    # two runs of one recipe gave different students (quickstart test gold 0.34 vs 0.38 from the same answers).
    # Both runs share this process, so the second starts from a different RNG state unless train() seeds it.
    base, collect = setup
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        train(make_spec(base, collect, tmp_path / name, method="lora", seed=seed, max_steps=2, learning_rate=5e-3))
        runs.append(load_file(str(tmp_path / name / "final" / "adapter" / "adapter_model.safetensors")))
    a, b, c = runs
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not all(torch.equal(a[k], c[k]) for k in a), "another seed gave the same student: the seed is unused"


def test_lora_training_lowers_the_loss_and_saves_adapter_and_merged_model(setup, tmp_path):
    base, collect = setup
    facts = train(make_spec(base, collect, tmp_path, method="lora", max_steps=12, learning_rate=5e-3))
    losses = [e["loss"] for e in facts["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]
    final = tmp_path / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    assert (final / "model" / "model.safetensors").is_file() and (final / "model" / "tokenizer.json").is_file()
    assert facts["world_size"] == 1 and facts["resumed_from"] is None


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    base, collect = setup
    # lr 1e30 blows the weights up after the first step: step 1 is finite (and checkpointed), later ones not.
    spec = make_spec(base, collect, tmp_path, method="full", learning_rate=1e30, save_steps=1,
                     max_grad_norm=1e9, lr_scheduler="constant")
    with pytest.raises(NonFiniteLoss, match=r"training loss became (nan|inf).*Last good checkpoint: checkpoint-\d"):
        train(spec)
    kept = complete_checkpoints(tmp_path / "checkpoints")
    assert kept, "the last good checkpoint must stay on disk"
    state = json.loads((kept[-1] / "trainer_state.json").read_text())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in state["log_history"] if "loss" in e)
    assert not (tmp_path / "final").exists()


def _worker(spec_path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "toolkit.distill.train", str(spec_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _run_spec(spec: TrainSpec, path: Path) -> subprocess.Popen:
    path.write_text(spec.model_dump_json())
    return _worker(path)


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_then_resume_gives_the_uninterrupted_result(setup, tmp_path):
    base, collect = setup
    steps = 40
    ref_spec = make_spec(base, collect, tmp_path / "ref", max_steps=steps, save_steps=5, logging_steps=5)
    (tmp_path / "ref").mkdir()
    ref = _run_spec(ref_spec, tmp_path / "ref.json")

    work = tmp_path / "killed"
    work.mkdir()
    spec = make_spec(base, collect, work, max_steps=steps, save_steps=5, logging_steps=5)
    proc = _run_spec(spec, tmp_path / "killed.json")
    deadline = time.time() + 240
    while not complete_checkpoints(work / "checkpoints") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = complete_checkpoints(work / "checkpoints")
    assert killed_at, "no checkpoint before the kill"
    assert not (work / "train_result.json").exists(), "the run finished before the kill: test proves nothing"
    assert int(killed_at[-1].name.split("-")[1]) < steps

    resumed = _worker(tmp_path / "killed.json")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    facts = json.loads((work / "train_result.json").read_text())
    assert facts["resumed_from"] is not None and facts["global_step"] == steps
    ref_facts = json.loads((tmp_path / "ref" / "train_result.json").read_text())
    last = lambda f: [e["loss"] for e in f["log_history"] if "loss" in e][-1]  # noqa: E731
    assert last(facts) == pytest.approx(last(ref_facts), rel=1e-5)
    # the reported mean covers the steps before the kill too (the Trainer's own figure restarts at the resume)
    assert facts["train_loss"] == pytest.approx(ref_facts["train_loss"], rel=1e-5)
    a = load_file(str(work / "final" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "final" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # and training really moved the weights (the comparison above is not between two untouched copies)
    start = load_file(str(base / "model.safetensors"))
    assert not torch.allclose(start["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])


def test_a_resumed_run_reports_the_train_loss_of_an_uninterrupted_one(setup, tmp_path):
    base, collect = setup
    spec = make_spec(base, collect, tmp_path, max_steps=10, save_steps=5)
    whole = train(spec)
    per_step = [e["loss"] for e in whole["log_history"] if "loss" in e]  # logging_steps=1: every step's loss
    assert len(per_step) == 10 and whole["train_loss"] == pytest.approx(sum(per_step) / 10, rel=1e-6)
    # What an interruption right after checkpoint-5 leaves: no later checkpoint, no final/, no result.
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-10")
    shutil.rmtree(tmp_path / "final")
    (tmp_path / "train_result.json").unlink()
    resumed = train(spec)
    assert resumed["resumed_from"] == "checkpoint-5" and resumed["global_step"] == 10
    # the Trainer's own figure would be (sum of steps 6-10) / 10: about half
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)


def test_disk_full_at_the_final_save_keeps_the_checkpoints_and_a_rerun_resumes(setup, tmp_path):
    base, collect = setup
    # 6 MiB: the LoRA checkpoints fit (< 1 MiB each), the merged model (12 MiB of embeddings) does not
    with small_disk(tmp_path / "disk", 6) as disk:
        work = disk / "work"
        spec = make_spec(base, collect, work, method="lora", max_steps=4, save_steps=2, learning_rate=5e-3)
        with pytest.raises(OptkitError, match=rf"^disk full: {work / 'final'} .*re-run resumes from checkpoint-4\)$"):
            train(spec)
        assert [p.name for p in complete_checkpoints(work / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
        assert not (work / "final").exists() and not (work / "train_result.json").exists()  # nothing marked done
        assert not [p.name for p in work.iterdir() if p.name.startswith(".final")]  # the half-written final is gone
        grow_disk(disk, 64)
        facts = train(spec)
    # checkpoint-4 is the last step: the re-run saves its weights, it does not train a 5th step
    assert facts["resumed_from"] == "checkpoint-4" and facts["global_step"] == 4
    per_step = [e["loss"] for e in facts["log_history"] if "loss" in e]
    assert len(per_step) == 4 and facts["train_loss"] == pytest.approx(sum(per_step) / 4, rel=1e-6)


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_is_one_line_and_exit_2_in_a_worker(setup, tmp_path):
    base, collect = setup
    # 50 MiB: the first full fine-tuning checkpoint (weights + Adam moments, ~38 MiB) fits, the second does not
    with small_disk(tmp_path / "disk", 50) as disk:
        work = disk / "work"
        proc = _run_spec(make_spec(base, collect, work, max_steps=8, save_steps=4), tmp_path / "spec.json")
        _, err = proc.communicate(timeout=600)
        last_line = err.decode().strip().splitlines()[-1]
        assert proc.returncode == 2, last_line
        assert last_line == (f"error: disk full: {work / 'checkpoints'} (free some space and run again; a re-run "
                             "resumes from checkpoint-4)")
        assert (tmp_path / "worker_error.txt").read_text() == last_line.removeprefix("error: ")
        assert [p.name for p in (work / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]  # partial one gone
        assert complete_checkpoints(work / "checkpoints") and not (work / "train_result.json").exists()


@pytest.mark.slow
def test_two_process_ddp_over_gloo_through_the_launcher(setup, tmp_path):
    base, collect = setup
    spec = make_spec(base, collect, tmp_path, method="lora", max_steps=4, save_steps=2)
    facts = launch.run_training(spec, num_processes=2, accelerate_config=None)
    # the workers read exactly the typed spec the parent wrote, every field
    assert facts["spec"] == spec.model_dump(mode="json")
    assert read_spec(tmp_path / launch.SPEC_FILE) == spec
    assert facts["world_size"] == 2  # reported by rank 0 from inside the process group
    assert facts["dist_world_size"] == 2 and facts["dist_backend"] == "gloo"
    assert facts["global_step"] == 4
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_launch_command_never_uses_accelerate_cpu_single_process(tmp_path):
    cmd = launch.launch_command(tmp_path / "s.json", 2, None)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node" in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and "--cpu" not in cmd
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n")
    cmd = launch.launch_command(tmp_path / "s.json", 2, cfg)
    assert "accelerate.commands.launch" in cmd and cmd[cmd.index("--config_file") + 1] == str(cfg)


def test_workers_split_the_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert launch.worker_env(2)["OMP_NUM_THREADS"] == "4"
    assert launch.worker_env(3)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.worker_env(4)["OMP_NUM_THREADS"] == "1"  # never 0: at least one thread each


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_only_accelerate_config_is_refused_without_cuda(tmp_path):
    cfg = tmp_path / "ds.yaml"
    cfg.write_text("distributed_type: DEEPSPEED\nnum_processes: 4\n")
    with pytest.raises(OptkitError, match="distill.launcher.accelerate_config: distributed_type DEEPSPEED needs CUDA"):
        launch.validate_accelerate_config(cfg, 4)


def test_accelerate_config_is_validated_and_passed_through(tmp_path):
    field = "distill.launcher.accelerate_config"
    good = tmp_path / "ds.yaml"
    good.write_text("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n  zero_stage: 3\n")
    data = launch.validate_accelerate_config(good, 4, need_gpu_check=False)
    assert data["deepspeed_config"] == {"zero_stage": 3}
    with pytest.raises(OptkitError, match="num_processes=4 but distill.launcher.num_processes=2"):
        launch.validate_accelerate_config(good, 2, need_gpu_check=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: [unclosed\n")
    with pytest.raises(OptkitError, match=f"{field}: .* is not valid YAML"):
        launch.validate_accelerate_config(bad, 2)
    odd = tmp_path / "odd.yaml"
    odd.write_text("distributed_type: WARP_DRIVE\n")
    with pytest.raises(OptkitError, match="unknown distributed_type 'WARP_DRIVE'"):
        launch.validate_accelerate_config(odd, 2)
    with pytest.raises(OptkitError, match="file not found"):
        launch.validate_accelerate_config(tmp_path / "missing.yaml", 2)
