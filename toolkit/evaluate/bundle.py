"""`optkit evaluate BUNDLE --data FILE`: score an exported bundle's variants and its system (cache -> router ->
student/teacher) on a new labeled file, with the same code as the evaluate stage (toolkit/evaluate/stage.py).

The bundle's recipe snapshot (manifest.json) says how a row becomes a prompt (columns, template, chat template),
the generation settings, the prices and the evaluate settings; `key.path=value` overrides change any of them
(e.g. data.prompt_column=text). Every row of FILE is evaluated (it is all held-out: nothing in the bundle saw it),
or a hash sample of data.limit rows. The teacher is re-run from the recipe (hf teachers only: an API teacher's
answers to a new file would cost money and are not fetched here). Every bundle file is checked against the
manifest before anything loads.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from toolkit.errors import OptkitError


class BundleContext:
    """What the evaluate stage's functions read from a StageContext, backed by a bundle and an output dir."""

    name = "evaluate"

    def __init__(self, bundle, recipe, out: Path):
        self.bundle, self.recipe, self.config = bundle, recipe, recipe.evaluate
        self.dir = self.run_dir = Path(out)

    @property
    def work_dir(self) -> Path:
        return self.dir / "work"

    def upstream(self, stage: str) -> Path:
        # system.load_parts reads route/ and cache/cache.json: the bundle holds route/ and cache.json at its root
        return self.bundle.root / "route" if stage == "route" else self.bundle.root

    def has_upstream(self, stage: str) -> bool:
        return bool(self.bundle.manifest.get({"route": "router"}.get(stage, stage)))

    @contextlib.contextmanager
    def progress(self, description: str, total: Optional[int]):
        from toolkit.ui import progress_bar

        with progress_bar(f"evaluate: {description}", total) as advance:
            yield advance


# What a finished evaluation writes into --out; an earlier one's are removed first, so a failed run never leaves
# a report that reads as this data's (work/ stays: answers already made are reused when the command is re-run).
RESULTS = ("report.md", "variants.json", "variants.csv", "pareto.json", "quality_vs_cost.png", "latency.png")


def prepare_out(out: Path) -> None:
    try:
        (out / "work").mkdir(parents=True, exist_ok=True)
        for name in RESULTS:
            (out / name).unlink(missing_ok=True)
    except OSError as exc:
        raise OptkitError(f"--out: cannot write results to {out} ({exc.strerror or type(exc).__name__})") from None


def bundle_recipe(bundle, data_file: Path, out: Path, overrides: list[str]):
    """The bundle's recipe with data.path = FILE, every row kept, in-process engines, no warm-up traffic (the
    cache starts empty: there are no earlier requests for a new file), then the user's overrides."""
    from toolkit.config import apply_overrides, recipe_from_dict

    data = dict(bundle.manifest.get("recipe") or {})
    if not data.get("teacher") or not data.get("data"):
        raise OptkitError(f"{bundle.root}: the manifest carries no recipe snapshot (teacher, data); re-export it")
    data["data"] = {**data["data"], "path": str(data_file), "limit": None}
    ev = dict(data.get("evaluate") or {})
    ev.update(engine="transformers", system={**(ev.get("system") or {}), "warm_split": None})
    ev.pop("split", None)  # every row of FILE is held out
    data.update(evaluate=ev, artifacts_dir=str(out), tracking={"enabled": False})
    return recipe_from_dict(apply_overrides(data, list(overrides)), source=f"{bundle.root}/manifest.json recipe",
                            overrides=list(overrides))


def bundle_variants(bundle, recipe) -> list:
    """The bundle's models as evaluate variants (the names the stage uses), then the teacher from the recipe."""
    from toolkit.evaluate.variants import Variant, disk_bytes

    models = {m["name"]: m for m in bundle.models}
    student = bundle.model_path("student") if "student" in models else None
    # auto runs the recipe's own weights locally (hf, or vLLM where faster): re-answered here with transformers.
    if recipe.collect is not None and recipe.collect.backend not in ("hf", "auto"):
        raise OptkitError(f"collect.backend {recipe.collect.backend}: optkit evaluate re-runs only a local (hf) "
                          "teacher; score the bundle with a recipe run instead")
    from toolkit.models import resolve

    found = [Variant("teacher", "teacher", "transformers", model_dir=Path(str(resolve(recipe.teacher.model))),
                     price_keys=("teacher",))]
    for m in bundle.models:
        path = bundle.model_path(m["name"])
        facts = {k: m[k] for k in ("method",) if m.get(k)} | {"size_bytes": disk_bytes(path)}
        if m["kind"] == "hf" and m.get("role") == "lora base":
            continue  # the adapter's base: evaluated as student_lora
        if m["kind"] == "hf":
            source = "student" if m["name"] == "student" else "quantized"
            found.append(Variant(m["name"], source, "transformers", model_dir=path, facts=facts,
                                 price_keys=(m["name"],) if source == "student" else (m["name"], "student")))
        elif m["kind"] == "lora":
            base = bundle.root / m["base"]
            bundle.path(m["base"])
            found.append(Variant("student_lora", "student_lora", "transformers", model_dir=base, adapter_dir=path,
                                 price_keys=("student_lora", "student"), facts=facts))
        elif m["kind"] == "gguf":
            if student is None:
                raise OptkitError(f"{bundle.root}: {m['name']} needs the student's tokenizer (models/student)")
            found.append(Variant(m["name"], "quantized", "llama.cpp", gguf=path, tokenizer_dir=student,
                                 price_keys=(m["name"], "student"), facts=facts))
    return found


def load_rows(recipe, data_file: Path) -> list[dict]:
    """FILE's rows as records in the stage's format, without the teacher's answer yet (first by id when
    evaluate.max_samples caps them)."""
    from toolkit.collect.prompts import load_prompts

    if not data_file.is_file():
        raise OptkitError(f"--data: file not found: {data_file}")
    prompts = load_prompts(recipe.data, data_file, recipe.seed)
    records = sorted(({"id": p.id, "split": "eval", "messages": p.messages, "prompt": p.prompt,
                       "reference": p.reference} for p in prompts), key=lambda r: r["id"])
    cap = recipe.evaluate.max_samples
    return records[:cap] if cap else records


def teacher_answers(ctx, teacher, records: list[dict]) -> None:
    """The teacher answers every prompt (its answers are what agreement and the system's teacher branch use)."""
    from toolkit.evaluate.stage import answer_all, make_engine

    cfg = ctx.config
    max_new = cfg.max_new_tokens or (ctx.recipe.collect.generation.max_new_tokens if ctx.recipe.collect else 64)
    engine = make_engine(ctx, teacher, max_new)
    try:
        rows = answer_all(ctx, engine, teacher, records)
    finally:
        engine.close()
    for rec, row in zip(records, rows):
        rec.update(output=row["output"], output_tokens=row.get("output_tokens"), input_tokens=row.get("input_tokens"))


def evaluate_bundle(bundle_dir: str, data_file: str, out: str, overrides: list[str] = ()) -> Path:
    """Score the bundle on FILE; write report.md, variants.json/.csv, pareto.json, plots and per-variant answers
    to `out`. Returns the report's path."""
    from toolkit.bundle import Bundle

    data_path, out_dir = Path(data_file).resolve(), Path(out).resolve()
    bundle = Bundle.open(bundle_dir, verify=True)  # a tampered or incomplete bundle stops here, before any load
    recipe = bundle_recipe(bundle, data_path, out_dir, list(overrides))
    records = load_rows(recipe, data_path)  # bad input (file, column) is refused before a model loads
    prepare_out(out_dir)
    from toolkit.evaluate import measure
    from toolkit.evaluate.stage import score_all, write_all
    from toolkit.evaluate.variants import select

    ctx = BundleContext(bundle, recipe, out_dir)
    found = bundle_variants(bundle, recipe)
    variants, do_system = select(ctx, found)
    teacher_answers(ctx, found[0], records)  # found[0] is the teacher: every variant's agreement needs its answers
    labels = measure.label_set(records) if ctx.config.metric == "gold" else None
    fps = {"bundle": bundle.manifest_sha256(), "data": data_path.as_posix()}
    rows, notes = score_all(ctx, records, labels, variants, do_system, fps, cascade=False)
    if bundle.manifest.get("cascade"):
        notes.append("the bundle's cascade is not replayed: it needs the student's confidence on each new prompt")
    notes.append(f"bundle {bundle.root} (manifest sha256 {bundle.manifest_sha256()[:16]}...), data {data_path}: "
                 "every row held out; the teacher re-answered every prompt at teacher.dtype")
    write_all(ctx, rows, notes, {"run": f"{recipe.name} bundle on {data_path.name}", "n": len(records),
                                 "split": data_path.name})
    return out_dir / "report.md"
