"""Training the student with the transformers Trainer: SFT on teacher outputs (completion-only loss),
optionally mixed with a logit-KD divergence, with LoRA / QLoRA / full fine-tuning.

The same `train(spec)` runs in the stage's own process (one process) or in every worker started by the
launcher (`python -m toolkit.distill.train SPEC.json`). The spec is a `TrainSpec` (toolkit.config.distill): the
parent writes it as JSON, each worker validates it back, so both read the same typed values, each once.

Three choices that matter for speed on CPU: batches are LEFT-padded (with explicit position ids), so every
row's completion ends at the right edge and the LM head runs only on the last K positions
(`logits_to_keep`); the prompt part, usually most of the tokens, never goes through the 49k-wide vocabulary
projection; and the prompt tokens all rows of a batch start with (system prompt, template head) go through the
model once per batch, not once per row (toolkit.engines.hf.collate / forward).

Resume: checkpoints go to `work/checkpoints/checkpoint-N` (see checkpoints.py: which ones count, the loss total
they carry, a full disk).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from toolkit.config.distill import LoraSettings, TrainSpec
from toolkit.distill.checkpoints import (TrainingAlreadyDone, complete_checkpoints, disk_full_is_user_error,
                                         make_loss_total, make_stop_when_done, prepare_checkpoint_dir)
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
    from toolkit.engines.hf import forward

    class DistillTrainer(Trainer):
        """Trainer whose loss is completion-only cross-entropy, optionally mixed with logit KD against
        an online teacher or the teacher's precomputed top-k log-probs."""

        def __init__(self, *args, kd: Optional[dict] = None, teacher=None, loss_total=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd = kd or {"loss": "none"}
            self.teacher = teacher
            self.loss_total = loss_total  # run-wide loss sum that survives a resume (checkpoints.py)
            self.model_accepts_loss_kwargs = True  # we normalize by num_items_in_batch ourselves

        def _load_optimizer_and_scheduler(self, checkpoint):
            # transformers maps the optimizer state to args.device, which a gloo (CPU) worker names "cpu:0", and
            # torch cannot restore storage to that: every resumed multi-process CPU run crashed here
            cpu_ddp = self.args.device.type == "cpu" and self.args.world_size > 1
            if checkpoint is None or not cpu_ddp or self.is_fsdp_enabled or self.is_deepspeed_enabled:
                return super()._load_optimizer_and_scheduler(checkpoint)
            from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

            optimizer, scheduler = Path(checkpoint) / OPTIMIZER_NAME, Path(checkpoint) / SCHEDULER_NAME
            if optimizer.is_file() and scheduler.is_file():
                self.optimizer.load_state_dict(torch.load(optimizer, map_location="cpu", weights_only=True))
                self.lr_scheduler.load_state_dict(torch.load(scheduler, map_location="cpu", weights_only=True))

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.loss_total is not None:
                self.loss_total.add(loss)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            topk = {k: inputs.pop(k) for k in ("topk_ids", "topk_logprobs", "topk_mask") if k in inputs}
            keep = int(inputs.pop("logits_to_keep"))
            out = forward(model, inputs, keep)
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
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # n_tokens counts every rank's tokens and DDP averages the ranks' gradients: scale back, as the
                # Trainer's own compute_loss does, or N processes train (and log) at 1/N of the loss
                loss = loss * self.accelerator.num_processes
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
                t_out = forward(self.teacher, inputs, keep)
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


def avoid_cudnn_attention_backward() -> bool:
    """Turn off PyTorch's cuDNN attention backend for training on CUDA; True when it was turned off.

    Why: since torch 2.11 the default SDPA backend on Hopper (H100/H200) is cuDNN, whose backward returns NaN
    gradients for a masked attention of length 64 mod 128 when a query row's logsumexp is very negative, as a
    fully masked left-padding row's is, and our batches are left-padded (pytorch/pytorch#196678,
    huggingface/trl#7181). Measured on an H200 (eval/gpu_check.sh): LoRA, full and QLoRA all went NaN right after
    the first 64-token batch. Flash / memory-efficient attention take over at the same speed; forward passes
    (generation, scoring) are not affected."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


def shares_prefix(args) -> bool:
    """Whether a batch's shared prompt prefix goes through the model once per step (toolkit.engines.hf.forward).
    Not with gradient checkpointing (it turns the KV cache off) and not across several processes: DDP and FSDP
    expect one forward call per backward."""
    return not args.gradient_checkpointing and args.world_size == 1


# ----------------------------------------------------------------------------------------- model setup


def load_student_for_training(student_dir: str, method: str, lora: LoraSettings, bf16: bool):
    import torch
    from transformers import AutoModelForCausalLM

    check_method(method)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16)
    model = AutoModelForCausalLM.from_pretrained(student_dir, **kwargs)
    model.config.use_cache = False
    if method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_teacher_for_kd(spec: TrainSpec, device=None):
    """The online-KD teacher on the training device (the Trainer moves only the student and the batches)."""
    if spec.kd.loss == "none" or spec.kd.source != "online":
        return None
    from toolkit.models import load_causal_lm

    t = spec.teacher
    teacher, _ = load_causal_lm(t.model, t.revision, t.trust_remote_code, dtype="float32")
    teacher.requires_grad_(False)
    return teacher if device is None else teacher.to(device)


def load_examples(spec: TrainSpec, tok) -> tuple[list[dict], dict]:
    from toolkit.distill.data import build_examples
    from toolkit.records import load_records, load_topk

    t = spec.training
    records = load_records(Path(spec.collect_dir), ["train"])
    if t.max_examples:
        records = records[: t.max_examples]
    topk = None
    if spec.kd.loss != "none" and spec.kd.source == "precomputed":
        topk = load_topk(Path(spec.collect_dir))
        if not topk:
            raise OptkitError("distill.kd.source: precomputed needs collect/topk.safetensors; set "
                              "collect.top_logprobs > 0 or use kd.source: online")
    examples, stats = build_examples(records, tok, t.max_length, t.min_completion_tokens, spec.chat_template,
                                     topk=topk)
    return examples, stats.as_dict()


def training_args(spec: TrainSpec, out_dir: Path):
    import torch
    from transformers import TrainingArguments

    t = spec.training
    cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.learning_rate, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler, max_grad_norm=t.max_grad_norm,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps, logging_first_step=True, seed=spec.seed, data_seed=spec.seed,
        # gloo only when launched as several workers: a single process with a backend set asks for a process group
        bf16=spec.bf16, use_cpu=cpu, ddp_backend="gloo" if cpu and distributed else None,
        dataloader_num_workers=0, remove_unused_columns=False, report_to="none", disable_tqdm=True,
        gradient_checkpointing=t.gradient_checkpointing,
    )


# ----------------------------------------------------------------------------------------- entry point


def _resume_point(spec: TrainSpec, args) -> Optional[Path]:
    """Rank 0 cleans the checkpoint dir (other spec, half-written), then every rank picks the newest one."""
    ckpt_dir = Path(spec.work_dir) / CHECKPOINTS
    resume = prepare_checkpoint_dir(ckpt_dir, spec.result_hash()) if args.process_index == 0 else None
    if args.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has cleaned the checkpoint dir before anyone reads it
        last = complete_checkpoints(ckpt_dir)
        resume = last[-1] if last else None
    return resume


def train(spec: TrainSpec, on_log: Optional[Callable[[dict, int], None]] = None) -> dict:
    """Train per the spec; rank 0 saves `<work>/final/{model,adapter}`. Returns facts for student.json."""
    import torch
    from transformers import AutoTokenizer, set_seed

    from toolkit.io import atomic_dir, atomic_write_json

    work = Path(spec.work_dir)
    tok = AutoTokenizer.from_pretrained(spec.student_dir)
    examples, data_stats = load_examples(spec, tok)
    args = training_args(spec, work / CHECKPOINTS)
    resume = _resume_point(spec, args)
    # Seed before peft draws the LoRA matrices: the Trainer only seeds once it is built, after that draw.
    set_seed(spec.seed)
    if avoid_cudnn_attention_backward():
        log.info("distill: cuDNN attention off for training (NaN backward on left-padded batches, torch#196678)")
    model = load_student_for_training(spec.student_dir, spec.method, spec.lora, spec.bf16)
    loss_total = make_loss_total()()
    if resume:
        log.info("distill: resuming from %s", resume)
        loss_total.restore(resume)
    trainer = make_trainer_class()(
        model=model, args=args, train_dataset=ListDataset(examples),
        data_collator=LeftPadCollator(tok.pad_token_id, with_topk="topk_ids" in examples[0],
                                      share_prefix=shares_prefix(args)),
        kd=spec.kd.model_dump(), teacher=load_teacher_for_kd(spec, args.device), loss_total=loss_total,
        callbacks=[loss_total, make_stop_when_done()] + ([_curve_callback(on_log)] if on_log else []))
    metrics = _run_trainer(trainer, resume, work / CHECKPOINTS)
    loss_total.fold(args.device)  # no-op unless steps ran after the last fold
    facts = _facts(spec, args, trainer, metrics, resume, data_stats, loss_total.total)
    if trainer.is_world_process_zero():
        check_finite_weights(trainer.model, work / CHECKPOINTS)
        with disk_full_is_user_error(work / FINAL, work / CHECKPOINTS):
            save_final(trainer.model, tok, spec, work / FINAL, atomic_dir)
            atomic_write_json(work / "train_result.json", facts)
    if args.world_size > 1:
        torch.distributed.barrier()
    return facts


def _run_trainer(trainer, resume: Optional[Path], ckpt_dir: Path) -> dict:
    """Train (or resume); the Trainer's metrics ({} when the checkpoint was already at the last step)."""
    with disk_full_is_user_error(ckpt_dir, ckpt_dir):
        try:
            return trainer.train(resume_from_checkpoint=str(resume) if resume else None).metrics
        except TrainingAlreadyDone:
            log.info("distill: %s is at the last step; nothing left to train", resume.name)
            return {}


def _facts(spec: TrainSpec, args, trainer, metrics: dict, resume, data_stats: dict, loss_total: float) -> dict:
    dist_ws, backend = _process_group()
    steps = trainer.state.global_step
    return {"world_size": args.world_size, "dist_world_size": dist_ws, "dist_backend": backend,
            "resumed_from": resume.name if resume else None, "global_step": steps,
            # the mean over every step of the run, also those run before a resume (checkpoints.LossTotal)
            "train_loss": loss_total / steps if steps else None,
            "train_runtime_s": metrics.get("train_runtime"),
            "train_samples_per_s": metrics.get("train_samples_per_second"),
            "data": data_stats, "log_history": trainer.state.log_history,
            "spec": spec.model_dump(mode="json")}  # what this process read: tests compare it to what was written


def _process_group() -> tuple[int, Optional[str]]:
    """World size and backend as torch.distributed sees them (1, None without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), str(dist.get_backend())
    return 1, None


def check_finite_weights(model, ckpt_dir: Path) -> None:
    """The loss is checked each step, but a non-finite gradient on the last step ruins the weights after the last
    loss was computed: never publish such a model as the student."""
    import torch

    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        last = [p.name for p in complete_checkpoints(ckpt_dir)]
        raise NonFiniteLoss(f"distill: {len(bad)} weight tensors are not finite after training (first: {bad[0]}); "
                            f"not saved. Last checkpoint: {last[-1] if last else 'none'} in {ckpt_dir}. Lower "
                            "distill.training.learning_rate or distill.training.max_grad_norm")


def save_final(model, tok, spec: TrainSpec, final: Path, atomic_dir) -> None:
    """Adapter (peft format, vLLM --enable-lora) and the merged full model, both safetensors."""
    from transformers import GenerationConfig

    gen_file = Path(spec.student_dir) / "generation_config.json"
    gen = GenerationConfig.from_pretrained(spec.student_dir) if gen_file.is_file() else None
    with atomic_dir(final) as tmp:
        if spec.method in ("lora", "qlora"):
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            merged = model.merge_and_unload()
        else:
            merged = model
        merged.config.use_cache = True
        merged.save_pretrained(tmp / "model", safe_serialization=True)
        tok.save_pretrained(tmp / "model")
        if gen is not None:
            gen.save_pretrained(tmp / "model")


def read_spec(path: Path) -> TrainSpec:
    """The spec the parent wrote, validated: a stale or hand-edited file is one line, not a KeyError later."""
    from pydantic import ValidationError

    from toolkit.config.loading import format_validation_error

    try:
        return TrainSpec.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except ValidationError as exc:
        first = format_validation_error(exc, str(path), TrainSpec).splitlines()[0]
        raise OptkitError(f"{first} (a training spec written by another optkit version?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OptkitError(f"{path}: cannot read the training spec ({exc})") from None


def _report_worker_error(path: Path, exc: OptkitError) -> None:
    """Rank 0 leaves the reason for the launcher (which shows it as the stage's error). On a full disk this
    small write can fail too: the message still reaches stderr."""
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            (path.parent / "worker_error.txt").write_text(str(exc))
        except OSError:
            pass
    print(f"error: {exc}", file=sys.stderr)


def main(argv: list[str]) -> int:
    """Worker entry: python -m toolkit.distill.train SPEC.json"""
    from toolkit import runtime

    runtime.setup_logging()
    spec_path = Path(argv[0])
    try:
        spec = read_spec(spec_path)
        train(spec)
    except OptkitError as exc:
        _report_worker_error(spec_path, exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
