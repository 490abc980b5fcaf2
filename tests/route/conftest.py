"""One real route run on the shipped MMLU routing extract (labels from a file), shared by the route tests."""

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXTRACT = ROOT / "recipes/data/routing/mmlu_routing_450.jsonl"
MODELS = {"mixtral_8x7b": "mixtral_8x7b_correct", "gpt4_1106": "gpt4_1106_correct"}
GSM8K = Path(__file__).resolve().parent / "data/gsm8k_routing_120.jsonl"  # out-of-distribution set (SOURCE.md)


def file_recipe(tmp: Path, name: str = "route_test", **route) -> Path:
    """A route-only recipe over the extract; keyword arguments override the route section."""
    section = {"labels": {"source": "file", "path": str(EXTRACT), "score_columns": dict(MODELS)},
               "costs": {"mixtral_8x7b": 0.05, "gpt4_1106": 1.0}, "model": "logreg",
               "target": {"min_quality": 0.9}, "holdout": 0.25, "calibration": 0.35, "bootstrap": 200,
               "shift": {"eval_path": str(GSM8K), "eval_prompt_column": "question", "alpha": 0.02}}
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


def write_small_router(directory: Path, model: str = "logreg") -> dict:
    """A real router fit on the extract's cheap text features only (no embedder to load), saved with
    save_router into `directory`; returns its router.json. Loaders are tested on corrupted copies of it."""
    import json

    import numpy as np

    from toolkit.config import RouteConfig, RouteTargetConfig
    from toolkit.io import read_jsonl
    from toolkit.route.calibrate import calibrate
    from toolkit.route.labels import LabelTable
    from toolkit.route.models import FITTERS
    from toolkit.route.runtime import Router, text_features
    from toolkit.route.stage import router_spec, save_router, standardizer

    rows = read_jsonl(EXTRACT)
    prompts = [r["prompt"] for r in rows]
    S = np.array([[float(r[c]) for c in MODELS.values()] for r in rows])
    raw = text_features(prompts)
    mean, scale = standardizer(raw)
    x = ((raw - mean) / scale).astype(np.float32)
    cfg = RouteConfig(model=model, text_features=False, hidden=8)
    head, w = FITTERS[model](x, x, S, cfg, 0)
    models = list(MODELS)
    table = LabelTable([str(i) for i in range(len(rows))], prompts, S, models,
                       np.array(["fit"] * len(rows), dtype=object))
    cost_norm = np.array([0.0, 1.0])
    spec = router_spec(cfg, table, {"mixtral_8x7b": 0.05, "gpt4_1106": 1.0}, cost_norm, "gpt4_1106", head)
    weights = {"feat.mean": mean, "feat.scale": scale, **{f"head.{k}": v for k, v in w.items()}}
    P = Router(spec, weights).predict_from_features(x, x)
    spec["threshold"] = calibrate(P, S, cost_norm, 1, RouteTargetConfig(min_quality=0.9)).threshold
    save_router(Path(directory), spec, weights)
    return json.loads((Path(directory) / "router.json").read_text())
