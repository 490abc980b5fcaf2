"""One real route run on the shipped MMLU routing extract (labels from a file), shared by the route tests."""

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXTRACT = ROOT / "recipes/data/routing/mmlu_routing_450.jsonl"
MODELS = {"mixtral_8x7b": "mixtral_8x7b_correct", "gpt4_1106": "gpt4_1106_correct"}


def file_recipe(tmp: Path, name: str = "route_test", **route) -> Path:
    """A route-only recipe over the extract; keyword arguments override the route section."""
    section = {"labels": {"source": "file", "path": str(EXTRACT), "score_columns": dict(MODELS)},
               "costs": {"mixtral_8x7b": 0.05, "gpt4_1106": 1.0}, "model": "logreg",
               "target": {"min_quality": 0.9}, "holdout": 0.25, "calibration": 0.35, "bootstrap": 200}
    section.update(route)
    recipe = {"name": name, "teacher": {"model": "smollm2-135m-instruct"}, "data": {"path": str(EXTRACT)},
              "route": section}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def mmlu_run(tmp_path_factory):
    """(route stage dir, outcomes) of a real run: MiniLM embeddings + logreg, MLflow in a private sqlite."""
    from toolkit.config import load_recipe
    from toolkit.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("route_run")
    old = os.getcwd()
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(tmp)
    try:
        outcomes = run_pipeline(load_recipe(file_recipe(tmp)))
    finally:
        os.chdir(old)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return tmp / "artifacts" / "route_test" / "route", outcomes
