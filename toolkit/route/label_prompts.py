"""route.label_prompts: label more prompts for the router than the val split holds.

A router learns where the student falls short from labeled prompts, and its threshold is calibrated on a held-out
part of them; the val split of a small recipe leaves ~100 (the quickstart's ~55 calibration prompts cannot
certify much, nor calibrate the shift guard). With `rows: unsampled` the stage asks the teacher and the student
for answers on the recipe's data rows that data.limit left out of the collected sample, and labels them like the
val prompts (the same metric, split into fit / cal the same way).

Which rows, and why:
- never a test-split row: the split of every row, sampled or not, is computed as collect does (seed, id), so a
  row that would be a test prompt under a larger data.limit is left out too;
- never a train-split row of the sample: the student was trained on the teacher's answers to those prompts, so
  its answers there look better than on unseen prompts, and a router would learn to trust it too much;
- the unsampled train/val-split rows: unseen by the student, drawn from the same file (the same distribution as
  the test prompts) -- exchangeable with val, so fit for calibration as well as for fitting.

Teacher answers go through the collect backend (toolkit.collect.backends: the recipe's teacher, backend and
collect.generation, the same context guard), student answers through the hf engine on distill's merged model with
the settings of distill's own val/test generations (greedy, collect.generation's length and stops, the data's chat
template, distill.eval_dtype). Each answer is appended (fsync'd) to a result store in the stage's work/ folder as
soon as it exists, keyed by model identity + messages + settings: a re-run or an interrupted run generates only what
is missing, and a changed teacher, student or setting never reuses an old answer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.route")

TEACHER_STORE, STUDENT_STORE = "label_prompts_teacher.jsonl", "label_prompts_student.jsonl"


def extra_records(ctx) -> list[dict]:
    """Collect-style records (id, split, messages, prompt, reference, output = the teacher's answer) plus
    `student_output`, for the extra prompts route.label_prompts asks for; [] when it is off."""
    cfg = ctx.config.label_prompts
    if cfg.rows == "none":
        return []
    recipe = ctx.recipe
    if ctx.config.labels.source != "pipeline":
        raise OptkitError("route.label_prompts: needs route.labels.source=pipeline (teacher and student answer "
                          "the extra prompts)")
    if recipe.collect.backend == "log":
        raise OptkitError("route.label_prompts: collect.backend=log has no teacher to ask; set "
                          "route.label_prompts.rows: none")
    prompts = candidate_prompts(ctx)
    if not prompts:
        log.warning("route.label_prompts: no data row outside the collected sample and the test split")
        return []
    teacher = teacher_answers(ctx, prompts)
    student = student_answers(ctx, [p for p in prompts if p.id in teacher])
    out = [{**p.to_dict(), "output": teacher[p.id], "student_output": student[p.id]}
           for p in prompts if p.id in teacher and p.id in student]
    log.info("route.label_prompts: %d extra labeled prompts (%d candidates)", len(out), len(prompts))
    return out


def candidate_prompts(ctx) -> list:
    """The data rows outside the collected sample whose split is train or val (see the module doc), at most
    label_prompts.max of them (a hash sample, stable when the file grows)."""
    from toolkit.collect import PROMPTS
    from toolkit.collect.prompts import load_prompts, unit_hash
    from toolkit.io import read_jsonl

    recipe, cfg = ctx.recipe, ctx.config.label_prompts
    data_path = ctx.add_input(recipe.resolve_path(recipe.data.path))
    sampled = {r["id"] for r in read_jsonl(Path(ctx.upstream("collect")) / PROMPTS)}
    every = load_prompts(recipe.data.model_copy(update={"limit": None}), data_path, recipe.seed)
    out = [p for p in every if p.id not in sampled and p.split != "test"]
    if cfg.max is not None and len(out) > cfg.max:
        keep = set(sorted((p.id for p in out), key=lambda i: unit_hash(recipe.seed, "route-label", i))[:cfg.max])
        out = [p for p in out if p.id in keep]
    return out


def teacher_answers(ctx, prompts: list) -> dict[str, str]:
    """id -> the teacher's answer, through collect's backend and result-store key (identity, messages, params)."""
    from toolkit.collect import Collector, apply_context_guard
    from toolkit.collect.backends import Request, generation_params, make_backend, resolve_backend, used_backend
    from toolkit.collect.store import ResultStore, result_key

    recipe = ctx.recipe
    # The engine collect ran (`auto` resolved there), so the teacher answers alike; without a collect run, auto's own
    # choice for these prompts.
    name = used_backend(ctx) or resolve_backend(recipe, len(prompts))[0]
    backend = make_backend(name, recipe)
    identity, params = backend.identity(), generation_params(recipe, name)
    sent = {p.id: p.messages for p in prompts}

    def key(pid: str) -> str:
        return result_key(identity, sent[pid], params)

    with ResultStore(ctx.work_dir / TEACHER_STORE) as store:
        todo = [p.id for p in prompts if key(p.id) not in store]
        try:
            if todo:  # the context guard loads the teacher: only when something is left to ask
                _, skipped = apply_context_guard(backend, recipe, todo, sent)
                todo = [i for i in todo if i not in skipped and key(i) not in store]
            requests = list({key(i): Request(key(i), i, sent[i]) for i in todo}.values())
            log.info("route.label_prompts: teacher: %d prompts, %d to ask", len(prompts), len(requests))
            with ctx.progress("teacher answers (label_prompts)", len(requests)) as advance:
                backend.generate(requests, Collector(store, advance))
        finally:
            backend.close()
        return {p.id: store.get(key(p.id))["output"] for p in prompts if key(p.id) in store}


def student_answers(ctx, prompts: list) -> dict[str, str]:
    """id -> the distilled student's greedy answer (as distill/student_outputs.jsonl: stripped)."""
    from toolkit.collect.store import ResultStore, result_key
    from toolkit.engines import HFEngine, Settings
    from toolkit.models import dtype_name

    recipe = ctx.recipe
    distill = Path(ctx.upstream("distill"))
    # distill's own val/test generations (toolkit.distill.evaluate.generate): greedy, collect.generation's rest
    settings = Settings.of(recipe.collect.generation, temperature=0.0, top_p=1.0)
    identity = {"student": student_digest(distill)}
    dtype = recipe.distill.eval_dtype  # the precision distill's own answers are at
    params = {"max_new_tokens": settings.max_new_tokens, "stop": list(settings.stop),
              "chat_template": recipe.data.chat_template, "dtype": dtype_name(dtype)}

    def key(p) -> str:
        return result_key(identity, p.messages, params)

    with ResultStore(ctx.work_dir / STUDENT_STORE) as store:
        todo = list({key(p): p for p in prompts if key(p) not in store}.values())
        log.info("route.label_prompts: student: %d prompts, %d to generate", len(prompts), len(todo))
        if todo:
            engine = HFEngine.load(distill / "model", chat_template=recipe.data.chat_template, dtype=dtype,
                                   device="cpu")
            try:
                with ctx.progress("student answers (label_prompts)", len(todo)) as advance:
                    def done(i: int, row: dict) -> None:
                        store.put(key(todo[i]), row)
                        advance(1)

                    engine.generate([p.messages for p in todo], settings, recipe.distill.eval_batch_size,
                                    on_result=done)
            finally:
                engine.close()
        return {p.id: store.get(key(p))["output"].strip() for p in prompts if key(p) in store}


def student_digest(distill_dir: Path) -> str:
    """A digest of the merged model's files (the sha256 distill's manifest records, else hashed here): a
    retrained student is another model, whose answers are generated anew."""
    from toolkit.config import config_hash
    from toolkit.io import sha256_file
    from toolkit.stagedir import read_manifest

    manifest = read_manifest(distill_dir) or {}
    files = {rel: m.get("sha256") for rel, m in (manifest.get("outputs") or {}).items() if rel.startswith("model/")}
    if not files:
        model = Path(distill_dir) / "model"
        files = {p.relative_to(model).as_posix(): sha256_file(p) for p in sorted(model.rglob("*")) if p.is_file()}
    return config_hash(files)
