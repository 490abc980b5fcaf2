"""distill stage: teacher records -> a small student (LoRA / QLoRA / full; sequence-level and logit KD).

Reads top to bottom: load records and teacher -> build the student (load it, or prune the teacher's layers
with a measured choice) -> check tokenizers -> save base/ -> train (this process or N workers) -> write
adapter/ and merged model/ -> student generations for val+test -> student vs teacher on test -> eval.json.

Outputs (contract): base/, adapter/ (absent for method=full), model/, student.json, student_outputs.jsonl,
eval.json. Resumable state lives in work/ (checkpoints, finished training).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger("optkit.distill")


# Recipe keys besides `distill` its outputs depend on; a change re-runs it (toolkit/pipeline.py). A stage
# name = that stage's outputs are consumed.
# Here: teacher records, the teacher (tokenizer, KD logits), data (chat template, system prompt), seed.
READS = ("collect", "teacher", "data", "seed")


def run(ctx) -> dict:
    from toolkit.distill.checkpoints import disk_full_is_user_error
    from toolkit.distill.train import CHECKPOINTS

    # ENOSPC anywhere in the stage: one line naming the place; complete checkpoints stay for the re-run
    with disk_full_is_user_error(ctx.dir, ctx.work_dir / CHECKPOINTS):
        return _run(ctx)


def _run(ctx) -> dict:
    from toolkit.distill.train import check_method

    cfg, recipe = ctx.config, ctx.recipe
    check_method(cfg.method)  # refuse QLoRA on CPU before loading anything
    records, prompts = _load_inputs(ctx)
    teacher, teacher_tok = _load_teacher(recipe)

    student_facts = _build_student(ctx, teacher, teacher_tok, records)
    facts = _train(ctx)
    _publish(ctx, cfg.method)

    student_rows = _generate(ctx, prompts)
    report = _evaluate(ctx, teacher, teacher_tok, records, student_rows)

    from toolkit.io import atomic_write_json

    # the spec stays in work/train_result.json: it holds this machine's absolute paths
    student_facts["training"] = {k: v for k, v in facts.items() if k not in ("log_history", "spec")}
    atomic_write_json(ctx.dir / "student.json", student_facts)
    atomic_write_json(ctx.dir / "eval.json", report)
    ctx.extra["world_size"] = facts.get("world_size")
    headline = {k: v for k, v in report["test"].items() if isinstance(v, (int, float))}
    headline.update({f"val_{k}": v for k, v in report.get("val", {}).items() if k.endswith("_nll")})
    headline.update(param_ratio=student_facts["param_ratio"], train_loss=facts.get("train_loss"))
    ctx.log_metrics({k: v for k, v in headline.items() if v is not None})
    return headline


# ----------------------------------------------------------------------------------------- inputs


def _load_inputs(ctx) -> tuple[list[dict], list[dict]]:
    from toolkit.errors import OptkitError
    from toolkit.io import read_jsonl
    from toolkit.records import load_records

    collect_dir = ctx.upstream("collect")
    records = load_records(collect_dir)
    if not any(r["split"] == "train" for r in records):
        raise OptkitError(f"distill: {collect_dir}/outputs.jsonl has no train-split records; add 'train' to "
                          "collect.splits")
    # Every val/test prompt (also those the teacher failed on) gets a student answer, for route/evaluate.
    prompts_file = collect_dir / "prompts.jsonl"
    prompts = read_jsonl(prompts_file) if prompts_file.is_file() else records
    prompts = [p for p in prompts if p["split"] in ("val", "test")]
    return records, prompts


def _load_teacher(recipe):
    from toolkit.models import load_causal_lm

    t = recipe.teacher
    teacher, tok = load_causal_lm(t.model, t.revision, t.trust_remote_code, dtype="float32")
    teacher.requires_grad_(False)
    return teacher, tok


def _chat_template(recipe) -> bool:
    return recipe.data.chat_template


# ----------------------------------------------------------------------------------------- student


def _build_student(ctx, teacher, teacher_tok, records: list[dict]) -> dict:
    """Write base/ (the untrained student, HF dir) and return the facts for student.json."""
    from toolkit.distill import student as st
    from toolkit.distill.data import batches, build_examples
    from toolkit.io import atomic_dir
    from toolkit.models import load_causal_lm, model_revision

    cfg, recipe = ctx.config, ctx.recipe
    facts: dict = {"teacher": recipe.teacher.model,
                   "teacher_revision": model_revision(recipe.teacher.model, recipe.teacher.revision),
                   "teacher_layers": len(st.decoder_layers(teacher)) if hasattr(teacher, "model") else None,
                   "method": cfg.method}
    if cfg.student.from_teacher is not None:
        prune = cfg.student.from_teacher
        train_recs = [r for r in records if r["split"] == "train"]

        def scoring_batches():
            n = prune.score_batches * cfg.training.batch_size
            ex, _ = build_examples(train_recs[:n], teacher_tok, cfg.training.max_length,
                                   cfg.training.min_completion_tokens, _chat_template(recipe), what="scoring")
            return batches(ex, teacher_tok.pad_token_id, cfg.training.batch_size)

        keep, how = st.choose_layers(teacher, prune, scoring_batches)
        student, tok = st.pruned_copy(teacher, keep), teacher_tok
        facts.update(source="from_teacher", kept_layers=keep, **how)
        log.info("distill: student keeps teacher layers %s (%s)", keep, how["selection"])
    else:
        s = cfg.student
        student, tok = load_causal_lm(s.model, s.revision, s.trust_remote_code, dtype="float32")
        facts.update(source="model", student=s.model, student_revision=model_revision(s.model, s.revision))
    facts["tokenizer_report"] = st.check_tokenizers(teacher_tok, tok, logit_kd=cfg.kd.loss != "none")
    t_params, s_params = st.count_params(teacher), st.count_params(student)
    facts.update(student_params=s_params, teacher_params=t_params, param_ratio=round(s_params / t_params, 4))
    if s_params > t_params:
        log.warning("distill: the student (%d params) is larger than the teacher (%d): nothing gets cheaper",
                    s_params, t_params)
    with atomic_dir(ctx.dir / "base") as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    del student
    return facts


# ----------------------------------------------------------------------------------------- training


def _train_spec(ctx):
    """The one typed spec training reads (here or in every worker): resolved now, each value once."""
    from toolkit.config.distill import TrainSpec
    from toolkit.models import bf16_supported, local_fingerprint

    cfg, recipe = ctx.config, ctx.recipe
    t = cfg.training
    resolved = type(t).model_validate({**t.model_dump(), "seed": recipe.seed if t.seed is None else t.seed,
                                       "bf16": bf16_supported() if t.bf16 == "auto" else bool(t.bf16)})
    return TrainSpec(
        student_dir=str((ctx.dir / "base").resolve()), collect_dir=str(ctx.upstream("collect").resolve()),
        work_dir=str(ctx.work_dir.resolve()), method=cfg.method, lora=cfg.lora, kd=cfg.kd, training=resolved,
        chat_template=_chat_template(recipe), teacher=recipe.teacher,
        # base/ is rebuilt on every run: its hash ties checkpoints to this exact student
        base_hash=local_fingerprint(ctx.dir / "base"), data_hash=_data_hash(ctx.upstream("collect")),
        world_size=cfg.launcher.num_processes)


def _data_hash(collect_dir: Path) -> str:
    """The collect outputs training reads (teacher answers, top-k log-probs), by content."""
    from toolkit.config import config_hash
    from toolkit.io import sha256_file
    from toolkit.records import OUTPUTS, TOPK

    files = {name: collect_dir / name for name in (OUTPUTS, TOPK)}
    return config_hash({name: sha256_file(f) if f.is_file() else None for name, f in files.items()})


def _train(ctx) -> dict:
    from toolkit.distill.launch import run_training
    from toolkit.distill.train import FINAL

    cfg = ctx.config
    spec = _train_spec(ctx)
    spec_hash = spec.result_hash()
    done = ctx.work_dir / "train_result.json"
    if done.is_file() and (ctx.work_dir / FINAL / "model").is_dir():
        facts = json.loads(done.read_text())
        if facts.get("spec_hash") == spec_hash:  # training finished before an interruption: reuse it
            log.info("distill: training already finished for this spec; reusing it")
            return facts
    acc = ctx.recipe.resolve_path(cfg.launcher.accelerate_config) if cfg.launcher.accelerate_config else None
    if acc is not None:
        ctx.add_input(acc)
    facts = run_training(spec, cfg.launcher.num_processes, acc, on_log=ctx.log_metrics)
    facts["spec_hash"] = spec_hash
    from toolkit.io import atomic_write_json

    atomic_write_json(done, facts)
    return facts


def _publish(ctx, method: str) -> None:
    """Publish the trained model (and adapter) from work/final into the stage outputs, atomically."""
    from toolkit.distill.train import FINAL
    from toolkit.io import atomic_dir, link_tree

    final = ctx.work_dir / FINAL
    parts = ["model"] + (["adapter"] if method in ("lora", "qlora") else [])
    for part in parts:
        # work/final stays (an interruption before the eval below must not retrain); hard links keep the
        # published weights from costing their size twice (~300 MB for the quickstart student).
        with atomic_dir(ctx.dir / part) as tmp:
            link_tree(final / part, tmp)
    if method == "full":
        shutil.rmtree(ctx.dir / "adapter", ignore_errors=True)  # a stale adapter from an earlier LoRA run


# ----------------------------------------------------------------------------------------- eval


def _generation_settings(recipe):
    from toolkit.config import GenerationConfig

    return recipe.collect.generation if recipe.collect is not None else GenerationConfig()


def _generate(ctx, prompts: list[dict]) -> list[dict]:
    from toolkit.distill.evaluate import generate
    from toolkit.io import write_jsonl
    from toolkit.models import load_causal_lm

    # At distill.eval_dtype: the precision route and evaluate score the student at (and vLLM serves it at).
    model, tok = load_causal_lm(str(ctx.dir / "model"), dtype=ctx.config.eval_dtype)
    with ctx.progress("student answers (val+test)", len(prompts)) as advance:
        rows = generate(model, tok, prompts, _generation_settings(ctx.recipe), _chat_template(ctx.recipe),
                        ctx.config.eval_batch_size, on_batch=advance)
    write_jsonl(ctx.dir / "student_outputs.jsonl", rows)
    return rows


def _evaluate(ctx, teacher, teacher_tok, records: list[dict], student_rows: list[dict]) -> dict:
    from toolkit.distill.evaluate import compare, nll_of_teacher_outputs
    from toolkit.models import load_causal_lm, torch_dtype

    cfg, recipe = ctx.config, ctx.recipe
    model, tok = load_causal_lm(str(ctx.dir / "model"), dtype=cfg.eval_dtype)
    # The teacher was loaded in float32 to build the student; its NLL is taken at teacher.dtype, the precision
    # collect generated its answers at (each model scored at the precision it answers at).
    teacher = teacher.to(torch_dtype(recipe.teacher.dtype))
    refs = [r.get("reference") for r in records]
    report, held = {}, {}
    for split in ("test", "val"):
        held[split] = [r for r in records if r["split"] == split and r.get("output")]
        if held[split]:
            report[split] = compare(student_rows, held[split], refs)
    # The NLL of the teacher's answers under both models (a forward pass of each) is the validation loss: on the
    # val split, held out from training like test but a third of its size here; the test split's quality is
    # evaluate's. Without a val split it is taken on test.
    nll_split = "val" if held["val"] else "test"
    if held[nll_split]:
        args = (cfg.training.max_length, _chat_template(recipe), cfg.eval_batch_size)
        report[nll_split].update(student_nll=nll_of_teacher_outputs(model, tok, held[nll_split], *args),
                                 teacher_nll=nll_of_teacher_outputs(teacher, teacher_tok, held[nll_split], *args))
    if "test" not in report:
        report["test"] = report.get("val", {})
    log.info("distill: test %s", {k: round(v, 4) for k, v in report["test"].items() if isinstance(v, float)})
    return report
