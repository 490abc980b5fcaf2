"""GPU-scale recipes cannot run here, but they must stay valid against the schema (and show the features they
exist to show)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolkit.cli import main
from toolkit.config import load_recipe

GPU_RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("gpu-*.yaml"))


def test_there_are_gpu_recipes():
    assert len(GPU_RECIPES) >= 2


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "ok" in capsys.readouterr().out
    recipe = load_recipe(path)
    assert recipe.stages() == ["collect", "distill", "quantize", "route", "cache", "evaluate", "export"]
    assert recipe.resolve_path(recipe.data.path).is_file()  # the shipped data extract


def test_gpu_recipes_cover_vllm_teacher_awq_and_an_8b_to_1b_student():
    recipes = {p.name: load_recipe(p) for p in GPU_RECIPES}
    big = recipes["gpu-8b-to-1b.yaml"]
    assert big.collect.backend == "vllm" and "8B" in big.teacher.model and "1B" in big.distill.student.model
    assert big.quantize.awq is not None and big.evaluate.system.student == "awq"
    assert big.distill.launcher.num_processes > 1
    api = recipes["gpu-api-teacher.yaml"]
    assert api.collect.backend == "openai" and api.distill.method == "qlora" and api.evaluate.judge is not None


def test_a_broken_gpu_recipe_is_refused(tmp_path, capsys):
    data = yaml.safe_load(GPU_RECIPES[0].read_text())
    data["evaluate"]["sytem"] = data["evaluate"].pop("system")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["validate", str(bad)]) == 2
    assert "evaluate.sytem: unknown key (did you mean 'system'?)" in capsys.readouterr().err
