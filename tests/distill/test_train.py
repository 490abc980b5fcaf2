"""Training mechanics on a tiny Llama (real SmolLM2 tokenizer, real Bitext prompts): the loss, guards,
kill -9 + resume, and a real 2-process DDP run over gloo through the toolkit's launcher."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.distill.helpers import REPO, bitext_rows, build_tiny_llama, make_records, write_collect
from toolkit.config import KDConfig, LoraSettings, TrainConfig
from toolkit.distill import launch
from toolkit.distill.data import build_examples
from toolkit.distill.train import (LeftPadCollator, NonFiniteLoss, check_method, complete_checkpoints,
                                   make_trainer_class, train)
from toolkit.errors import OptkitError


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("train")
    base = build_tiny_llama(root / "base", smollm2_dir, layers=2, hidden=64, seed=1)
    collect = write_collect(root / "run", make_records(bitext_rows(60)))
    return base, collect


def make_spec(base, collect, work, method="full", kd=None, **training) -> dict:
    t = TrainConfig(**{"batch_size": 4, "max_steps": 8, "save_steps": 4, "logging_steps": 1,
                       "learning_rate": 1e-3, "warmup_ratio": 0.0, **training})
    return {"student_dir": str(base), "collect_dir": str(collect), "work_dir": str(work), "method": method,
            "lora": LoraSettings(dropout=0.0).model_dump(), "kd": (kd or KDConfig()).model_dump(),
            "training": t.model_dump(), "seed": 0, "bf16": False, "max_length": 128,
            "min_completion_tokens": 1, "chat_template": True,
            "teacher": {"model": str(base), "revision": None, "trust_remote_code": False}}


def test_qlora_is_refused_on_cpu_before_anything_loads():
    assert not torch.cuda.is_available()  # this guard is what CPU users meet
    with pytest.raises(OptkitError, match="qlora needs a CUDA GPU.*zero LoRA gradients"):
        check_method("qlora")
    check_method("lora")
    check_method("full")


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


@pytest.mark.slow
def test_max_examples_trains_on_the_first_n_train_answers(setup):
    """training.max_examples (data-size curves) reaches the trainer as the spec's limit: the first N records."""
    from toolkit.config import DistillConfig
    from toolkit.distill.train import load_examples

    base, collect = setup
    tok = AutoTokenizer.from_pretrained(base)
    spec = make_spec(base, collect, collect)
    every, _ = load_examples(spec, tok)
    few, _ = load_examples({**spec, "limit": 5}, tok)
    assert len(every) > 5 and [e["input_ids"] for e in few] == [e["input_ids"] for e in every[:5]]
    cfg = DistillConfig(student={"model": "x"}, training={"max_examples": 5})
    assert cfg.training.max_examples == 5


def test_same_seed_same_lora_student(setup, tmp_path):
    # The LoRA matrices are initialised when peft wraps the model, before the Trainer seeds anything: unseeded,
    # two runs of one recipe gave different students (quickstart test gold 0.34 vs 0.38 from the same answers).
    # Both runs share this process, so the second starts from a different RNG state unless train() seeds it.
    base, collect = setup
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        spec = make_spec(base, collect, tmp_path / name, method="lora", max_steps=2, learning_rate=5e-3)
        train({**spec, "seed": seed})
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


def _run_spec(spec: dict, path: Path) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
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
    a = load_file(str(work / "final" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "final" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # and training really moved the weights (the comparison above is not between two untouched copies)
    start = load_file(str(base / "model.safetensors"))
    assert not torch.allclose(start["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
def test_two_process_ddp_over_gloo_through_the_launcher(setup, tmp_path):
    base, collect = setup
    spec = make_spec(base, collect, tmp_path, method="lora", max_steps=4, save_steps=2)
    facts = launch.run_training(spec, num_processes=2, accelerate_config=None)
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
    assert launch.worker_env(2)["OMP_NUM_THREADS"] != ""


def test_accelerate_config_is_validated_and_passed_through(tmp_path):
    field = "distill.launcher.accelerate_config"
    good = tmp_path / "ds.yaml"
    good.write_text("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n  zero_stage: 3\n")
    data = launch.validate_accelerate_config(good, 4, need_gpu_check=False)
    assert data["deepspeed_config"] == {"zero_stage": 3}
    with pytest.raises(OptkitError, match=f"{field}: distributed_type DEEPSPEED needs CUDA GPUs"):
        launch.validate_accelerate_config(good, 4)  # this machine has none
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
