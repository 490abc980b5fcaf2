"""Re-run correctness (issue 13): change each top-level recipe key in turn; exactly the stages whose outputs depend
on it re-run. The expected table below is the specification, written from reading each stage's code (not from
the READS declarations it checks): e.g. collect's records carry token counts, not prices, so `pricing` re-runs
only the stages that price (route's default costs, evaluate, export) and never re-trains the student; quantize
reads `data` for calibration; the cache stage reads the prompts itself and no other stage's outputs.

The full matrix runs at the hash level (what run_pipeline decides with); a real run of route + cache + export
checks a few rows end to end, and the issue's integrity case on real files (an edited cache.json)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from toolkit import pipeline
from toolkit.config import STAGE_ORDER, Recipe, recipe_from_dict
from toolkit.errors import OptkitError

REPO = Path(__file__).resolve().parents[2]
ALL = set(STAGE_ORDER)
AFTER_COLLECT = ALL - {"cache"}


def _bump(section: dict, key: str) -> None:
    section[key] = (section[key] or 100) + 1  # null (= all) becomes a number: a change either way


# top-level key -> (how to change it, the stages that must re-run)
MATRIX = {
    "description": (lambda d: d.update(description="other words"), {"export"}),
    "seed": (lambda d: d.update(seed=1), ALL),
    "runtime": (lambda d: d.update(runtime={"threads": 3, "offline": False}), set()),
    "tracking": (lambda d: d.update(tracking={"experiment": "elsewhere"}), set()),
    "teacher": (lambda d: d["teacher"].update(dtype="float32"), AFTER_COLLECT),
    "data": (lambda d: d["data"].update(limit=499), ALL),
    "pricing": (lambda d: d["pricing"]["teacher"].update(input_per_1m=0.2), {"route", "evaluate", "export"}),
    "collect": (lambda d: d["collect"]["generation"].update(max_new_tokens=13), AFTER_COLLECT),
    "distill": (lambda d: d["distill"]["lora"].update(r=8), {"distill", "quantize", "route", "evaluate", "export"}),
    "quantize": (lambda d: _bump(d["quantize"], "eval_samples"), {"quantize", "evaluate", "export"}),
    "route": (lambda d: d["route"].update(calibration=0.4), {"route", "evaluate", "export"}),
    "cache": (lambda d: d["cache"].update(epsilon=0.1), {"cache", "evaluate", "export"}),
    "evaluate": (lambda d: _bump(d["evaluate"], "max_samples"), {"evaluate", "export"}),
    "export": (lambda d: d["export"].update(port=9000), {"export"}),
}
# These choose the run directory itself: a change is a different run, not a re-run.
RUN_DIR_KEYS = {"name", "artifacts_dir"}


def rerun_set(before: Recipe, after: Recipe) -> set[str]:
    """The stages run_pipeline would re-run: own config hash changed, or an upstream re-ran."""
    reran: set[str] = set()
    for stage in after.stages():
        ups = pipeline.upstream_stages(after, stage)
        if pipeline.stage_config_hash(before, stage) != pipeline.stage_config_hash(after, stage) or reran & set(ups):
            reran.add(stage)
    return reran


def test_the_matrix_covers_every_top_level_key():
    assert set(MATRIX) | RUN_DIR_KEYS == set(Recipe.model_fields)


@pytest.mark.parametrize("key", sorted(MATRIX))
def test_changing_a_section_reruns_exactly_its_dependants(key):
    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    changed = copy.deepcopy(base)
    change, expected = MATRIX[key]
    change(changed)
    assert changed != base
    before, after = recipe_from_dict(base), recipe_from_dict(changed)
    assert rerun_set(before, after) == expected


def test_quantize_without_collect_reruns_when_the_prompts_change():
    """Without a collect stage, quantize calibrates on `data` itself (the old GLOBALS table missed it)."""
    base = {"name": "q", "teacher": {"model": "x/y"}, "data": {"path": "d.jsonl"},
            "quantize": {"model": "smollm2-135m-instruct", "int8": {}}, "export": {}}
    changed = copy.deepcopy(base)
    changed["data"]["prompt_column"] = "text"
    assert rerun_set(recipe_from_dict(base), recipe_from_dict(changed)) == {"quantize", "export"}


def test_every_stage_package_exposes_run_and_reads():
    """One contract for every stage: `run(ctx)` and READS (recipe keys; stage names only of earlier stages)."""
    import inspect

    for stage in STAGE_ORDER:
        module = pipeline.stage_module(stage)
        assert list(inspect.signature(module.run).parameters) == ["ctx"], stage
        reads = pipeline.stage_reads(stage)  # raises on an unknown key or a later stage
        assert len(set(reads)) == len(reads), stage


def test_reads_declarations_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; from toolkit import pipeline\n"
            "for s in pipeline.STAGES: pipeline.stage_reads(s)\n"
            "print([m for m in ('torch', 'transformers', 'sklearn', 'mlflow', 'scipy') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip() == "[]", p.stderr


# ------------------------------------------------------------------------------------------ a real run

ROUTING = REPO / "recipes" / "data" / "routing" / "mmlu_routing_450.jsonl"
BITEXT = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"


def real_recipe(workdir: Path, *overrides: str) -> Recipe:
    from toolkit.config import load_recipe

    (workdir / "r.yaml").write_text(yaml.safe_dump({
        "name": "rr", "tracking": {"enabled": False}, "teacher": {"model": "smollm2-135m-instruct"},
        "data": {"path": str(BITEXT), "prompt_column": "instruction", "limit": 200},
        "pricing": {"mixtral_8x7b": {"input_per_1m": 0.5}, "gpt4_1106": {"input_per_1m": 10.0}},
        "route": {"labels": {"source": "file", "path": str(ROUTING), "score_columns": {
            "mixtral_8x7b": "mixtral_8x7b_correct", "gpt4_1106": "gpt4_1106_correct"}},
            "model": "logreg", "target": {"min_quality": 0.9}, "bootstrap": 50},
        "cache": {"group_column": "intent", "max_pairs": 300},
        "export": {"include": ["route", "cache"]},
    }))
    return load_recipe(workdir / "r.yaml", list(overrides))


def same_size_edit(text: str, key: str) -> str:
    """Flip the last digit of the number after `key`: same length, different value."""
    i = text.index(key) + len(key)
    j = i
    while j < len(text) and (text[j].isdigit() or text[j] in ".-e"):
        j += 1
    assert j > i, text[i:i + 20]
    last = text[j - 1]
    return text[:j - 1] + str((int(last) + 1) % 10) + text[j:]


def statuses(recipe, **kw) -> dict[str, str]:
    return {o.stage: o.status for o in pipeline.run_pipeline(recipe, **kw)}


@pytest.mark.slow
def test_real_pipeline_reruns_only_dependants_and_never_ships_an_edited_file(workdir):
    from toolkit.bundle import verify_bundle

    assert statuses(real_recipe(workdir)) == {"route": "ran", "cache": "ran", "export": "ran"}
    # pricing: the router's relative costs; the cache never reads prices
    assert statuses(real_recipe(workdir, "pricing.gpt4_1106.input_per_1m=11")) == {
        "route": "ran", "cache": "skipped", "export": "ran"}
    # data: the cache reads the prompts; the router's labels come from its own file
    r = real_recipe(workdir, "pricing.gpt4_1106.input_per_1m=11", "data.limit=150")
    assert statuses(r) == {"route": "skipped", "cache": "ran", "export": "ran"}

    # Issue 12.3: edit the cache config in place, keeping its size (a threshold 0.84 -> 0.14 in the report).
    cache_json = workdir / "artifacts" / "rr" / "cache" / "cache.json"
    text = cache_json.read_text()
    edited = same_size_edit(text, '"epsilon": ')
    cache_json.write_text(edited)
    with pytest.raises(OptkitError, match="outputs of stage 'cache', which changed since it finished"):
        pipeline.run_pipeline(r, only="export", force=True)
    assert statuses(r)["cache"] == "ran"
    bundle = workdir / "artifacts" / "rr" / "export" / "bundle"
    assert (bundle / "cache.json").read_text() == cache_json.read_text() == text
    assert verify_bundle(bundle) == []
