"""Training the student with the transformers Trainer: SFT on teacher outputs (completion-only loss),
optionally mixed with a logit-KD divergence, with LoRA / QLoRA / full fine-tuning.

The same `train(spec)` runs in the stage's own process (one process) or in every worker started by the
launcher (`python -m toolkit.distill.train SPEC.json`). The spec is plain JSON so workers need nothing else.

Two choices that matter for speed on CPU: batches are LEFT-padded (with explicit position ids), so every
row's completion ends at the right edge and the LM head runs only on the last K positions
(`logits_to_keep`); the prompt part, usually most of the tokens, never goes through the 49k-wide vocabulary
projection.

Resume: checkpoints go to `work/checkpoints/checkpoint-N`; a checkpoint counts only once its
trainer_state.json (written last by the Trainer) exists. A rerun with the same spec resumes from the newest
complete one; a changed spec discards them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from toolkit.distill.data import LeftPadCollator  # noqa: F401  (re-exported: workers and tests use it here)
from toolkit.errors import MissingExtraError, OptkitError

log = logging.getLogger("optkit.distill")

CHECKPOINTS = "checkpoints"
FINAL = "final"


class NonFiniteLoss(OptkitError):
    pass


# ----------------------------------------------------------------------------------------- guards


def check_method(method: str) -> None:
    """QLoRA needs a CUDA GPU. bitsandbytes has CPU kernels, but there a no-grad forward (our eval, the
    Trainer's) repacks the NF4 weights and afterwards LoRA gradients are silently zero, so the run
    'trains' and learns nothing. Refuse instead."""
    if method != "qlora":
        return
    import torch

    if not torch.cuda.is_available():
        raise OptkitError("distill.method: qlora needs a CUDA GPU (bitsandbytes NF4 on CPU silently yields zero "
                          "LoRA gradients); use method: lora or full on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingExtraError("distill.method: qlora", "bitsandbytes", "gpu") from None


# ----------------------------------------------------------------------------------------- checkpoints


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N dirs whose trainer state was written (the Trainer writes it last), oldest first."""
    found = []
    for p in Path(ckpt_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prepare_checkpoint_dir(ckpt_dir: Path, spec_hash: str) -> Optional[Path]:
    """The checkpoint to resume from (None = start fresh). Drops checkpoints of a different spec and
    half-written ones left by a kill."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / "spec_hash"
    if ckpt_dir.exists() and (not marker.is_file() or marker.read_text().strip() != spec_hash):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(spec_hash)
    complete = set(complete_checkpoints(ckpt_dir))
    for p in ckpt_dir.glob("checkpoint-*"):
        if p not in complete:
            log.warning("distill: removing incomplete checkpoint %s (interrupted while saving)", p.name)
            shutil.rmtree(p, ignore_errors=True)
    last = complete_checkpoints(ckpt_dir)
    return last[-1] if last else None


# ----------------------------------------------------------------------------------------- data


class ListDataset:
    """A map-style dataset over a list (torch's Dataset protocol; the Trainer needs __len__)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


# ----------------------------------------------------------------------------------------- trainer


def make_trainer_class():
    """Built lazily: subclassing Trainer imports transformers, which module import must not do."""
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    from toolkit.distill.losses import LOSSES, mix

    class DistillTrainer(Trainer):
        """Trainer whose loss is completion-only cross-entropy, optionally mixed with logit KD against
        an online teacher or the teacher's precomputed top-k log-probs."""

        def __init__(self, *args, kd: Optional[dict] = None, teacher=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd = kd or {"loss": "none"}
            self.teacher = teacher
            self.model_accepts_loss_kwargs = True  # we normalize by num_items_in_batch ourselves

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            topk = {k: inputs.pop(k) for k in ("topk_ids", "topk_logprobs", "topk_mask") if k in inputs}
            keep = int(inputs.pop("logits_to_keep"))
            out = model(**inputs, logits_to_keep=keep, use_cache=False)
            logits = out.logits[:, :-1]  # position j predicts token j + 1
            target = labels[:, -keep + 1:] if keep > 1 else labels[:, :0]
            mask = target != -100
            n_tokens = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
            sel_logits = logits[mask].float()
            sft = F.cross_entropy(sel_logits, target[mask], reduction="sum") / n_tokens
            loss = sft
            kind = self.kd.get("loss", "none")
            if kind != "none":
                kd_sum = self._kd_sum(kind, sel_logits, inputs, keep, mask, topk)
                loss = mix(kd_sum / n_tokens, sft, self.kd["ratio"])
            if not torch.isfinite(loss.detach()).all():
                last = [p.name for p in complete_checkpoints(Path(self.args.output_dir))]
                raise NonFiniteLoss(
                    f"distill: training loss became {float(loss.detach())} at step {self.state.global_step}; "
                    f"stopped. Last good checkpoint: {last[-1] if last else 'none yet'} in "
                    f"{self.args.output_dir}. Lower distill.training.learning_rate or check the data.")
            return (loss, out) if return_outputs else loss

        def _kd_sum(self, kind, sel_logits, inputs, keep, mask, topk):
            fn = LOSSES[kind]
            t, beta = self.kd["temperature"], self.kd["beta"]
            if topk:  # precomputed: both distributions over the teacher's top-k ids at each position
                t_mask = topk["topk_mask"][:, -keep + 1:] & mask
                if not t_mask.any():
                    return sel_logits.sum() * 0.0
                # positions with top-k are a subset of `mask`: index the selected rows by that subset
                rows = t_mask[mask]
                ids = topk["topk_ids"][:, -keep + 1:][t_mask]
                s = sel_logits[rows].gather(-1, ids)
                tl = topk["topk_logprobs"][:, -keep + 1:][t_mask]
                return fn(s, tl, t, beta) * rows.sum()
            with torch.no_grad():
                t_out = self.teacher(**inputs, logits_to_keep=keep, use_cache=False)
            t_logits = t_out.logits[:, :-1][mask].float()
            v = min(t_logits.shape[-1], sel_logits.shape[-1])  # embedding padding rows differ, tokens do not
            return fn(sel_logits[:, :v], t_logits[:, :v], t, beta) * mask.sum()

    return DistillTrainer


def _curve_callback(on_log: Callable[[dict, int], None]):
    from transformers import TrainerCallback

    class Curves(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                on_log({f"train.{k}": v for k, v in logs.items() if isinstance(v, (int, float))},
                       state.global_step)

    return Curves()


# ----------------------------------------------------------------------------------------- model setup


def load_student_for_training(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    method = spec["method"]
    check_method(method)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if spec["bf16"] else torch.float16)
    model = AutoModelForCausalLM.from_pretrained(spec["student_dir"], **kwargs)
    model.config.use_cache = False
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    lora = spec["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_teacher_for_kd(spec: dict):
    if spec["kd"]["loss"] == "none" or spec["kd"]["source"] != "online":
        return None
    from toolkit.models import load_causal_lm

    t = spec["teacher"]
    teacher, _ = load_causal_lm(t["model"], t.get("revision"), t.get("trust_remote_code", False), dtype="float32")
    teacher.requires_grad_(False)
    return teacher


def load_examples(spec: dict, tok) -> tuple[list[dict], dict]:
    from toolkit.distill.data import build_examples
    from toolkit.records import load_records, load_topk

    records = load_records(Path(spec["collect_dir"]), ["train"])
    if spec.get("limit"):
        records = records[: spec["limit"]]
    topk = None
    if spec["kd"]["loss"] != "none" and spec["kd"]["source"] == "precomputed":
        topk = load_topk(Path(spec["collect_dir"]))
        if not topk:
            raise OptkitError("distill.kd.source: precomputed needs collect/topk.safetensors; set "
                              "collect.top_logprobs > 0 or use kd.source: online")
    examples, stats = build_examples(records, tok, spec["max_length"], spec["min_completion_tokens"],
                                     spec["chat_template"], topk=topk)
    return examples, stats.as_dict()


def training_args(spec: dict, out_dir: Path):
    import torch
    from transformers import TrainingArguments

    t = spec["training"]
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=t["epochs"], max_steps=t["max_steps"],
        learning_rate=t["learning_rate"], per_device_train_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["grad_accum"], warmup_steps=t["warmup_ratio"],
        weight_decay=t["weight_decay"], lr_scheduler_type=t["lr_scheduler"], max_grad_norm=t["max_grad_norm"],
        save_strategy="steps", save_steps=t["save_steps"], save_total_limit=t["save_total_limit"],
        logging_steps=t["logging_steps"], logging_first_step=True, seed=spec["seed"], data_seed=spec["seed"],
        # gloo only when launched as several workers: a single process with a backend set asks for a process group
        bf16=spec["bf16"], use_cpu=cpu, ddp_backend="gloo" if cpu and distributed else None,
        dataloader_num_workers=0, remove_unused_columns=False, report_to="none", disable_tqdm=True,
        gradient_checkpointing=t["gradient_checkpointing"],
    )


# ----------------------------------------------------------------------------------------- entry point


def train(spec: dict, on_log: Optional[Callable[[dict, int], None]] = None) -> dict:
    """Train per the spec; rank 0 saves `<work>/final/{model,adapter}`. Returns facts for student.json."""
    import torch
    from transformers import AutoTokenizer, set_seed

    from toolkit.config import config_hash
    from toolkit.io import atomic_dir, atomic_write_json

    work = Path(spec["work_dir"])
    tok = AutoTokenizer.from_pretrained(spec["student_dir"])
    examples, data_stats = load_examples(spec, tok)
    args = training_args(spec, work / CHECKPOINTS)
    resume = None
    if args.process_index == 0:
        resume = prepare_checkpoint_dir(work / CHECKPOINTS, config_hash(spec_for_hash(spec)))
    if args.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has cleaned the checkpoint dir before anyone reads it
        last = complete_checkpoints(work / CHECKPOINTS)
        resume = last[-1] if last else None
    # Seed before peft draws the LoRA matrices: the Trainer only seeds once it is built, after that draw.
    set_seed(spec["seed"])
    model = load_student_for_training(spec)
    teacher = load_teacher_for_kd(spec)
    callbacks = [_curve_callback(on_log)] if on_log else []
    trainer = make_trainer_class()(
        model=model, args=args, train_dataset=ListDataset(examples),
        data_collator=LeftPadCollator(tok.pad_token_id, with_topk="topk_ids" in examples[0]),
        kd=spec["kd"], teacher=teacher, callbacks=callbacks)
    if resume:
        log.info("distill: resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    dist_ws, backend = _process_group()
    facts = {"world_size": args.world_size, "dist_world_size": dist_ws, "dist_backend": backend,
             "resumed_from": resume.name if resume else None,
             "global_step": trainer.state.global_step, "train_loss": result.training_loss,
             "train_runtime_s": result.metrics.get("train_runtime"),
             "train_samples_per_s": result.metrics.get("train_samples_per_second"),
             "data": data_stats, "log_history": trainer.state.log_history}
    if trainer.is_world_process_zero():
        save_final(trainer.model, tok, spec, work / FINAL, atomic_dir)
        atomic_write_json(work / "train_result.json", facts)
    if args.world_size > 1:
        torch.distributed.barrier()
    return facts


def _process_group() -> tuple[int, Optional[str]]:
    """World size and backend as torch.distributed sees them (1, None without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), str(dist.get_backend())
    return 1, None


def spec_for_hash(spec: dict) -> dict:
    """What decides the training result (not where things are or how they are launched)."""
    return {k: v for k, v in spec.items() if k not in ("work_dir", "num_processes")}


def save_final(model, tok, spec: dict, final: Path, atomic_dir) -> None:
    """Adapter (peft format, vLLM --enable-lora) and the merged full model, both safetensors."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(spec["student_dir"]) if (
        Path(spec["student_dir"]) / "generation_config.json").is_file() else None
    with atomic_dir(final) as tmp:
        if spec["method"] in ("lora", "qlora"):
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            merged = model.merge_and_unload()
        else:
            merged = model
        merged.config.use_cache = True
        merged.save_pretrained(tmp / "model", safe_serialization=True)
        tok.save_pretrained(tmp / "model")
        if gen is not None:
            gen.save_pretrained(tmp / "model")


def main(argv: list[str]) -> int:
    """Worker entry: python -m toolkit.distill.train SPEC.json"""
    from toolkit import runtime

    runtime.setup_logging()
    spec = json.loads(Path(argv[0]).read_text())
    try:
        train(spec)
    except OptkitError as exc:
        # The launcher shows this file's last line as the reason: one line, like the CLI.
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            (Path(spec["work_dir"]) / "worker_error.txt").write_text(str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
