"""A router model is one module + one registry line (toolkit/route/routers/__init__.py).

A toy model (its own head name and tensors) is registered in ONE place -- one line added to the live ROUTERS
dict, in a fresh interpreter, before anything else of optkit is imported -- and then goes through everything a
router model must: the recipe accepts it (route.model / route.select), model selection cross-validates it, the
real route stage fits, calibrates and saves it, spec.py validates its tensors (and refuses a damaged copy), and
Router.load serves it with its own numpy predict. If any other table (a config Literal, a spec Literal, a head ->
predictor dict) still had to be edited, the recipe, the save or the load fails here.
"""

import json
import os
import subprocess
import sys
import textwrap
import pytest

from .conftest import ROOT, file_recipe

TOY = '''
"""toy: two centroids (prompts where the strong model is better, and the rest); P = softmax-weighted mean scores."""
import numpy as np

HEAD = "toy_centroid"
TENSORS = {"centroids": ("C", "E"), "values": ("C", "M")}


def check(w):
    if np.any((w["values"] < 0) | (w["values"] > 1)):
        raise ValueError("head.values: scores must lie in [0, 1]")


def fit(x, emb, S, cfg, seed):
    better = S[:, -1] > S[:, 0]
    groups = [better, ~better] if better.any() and (~better).any() else [np.ones(len(S), bool)] * 2
    return {"centroids": np.stack([emb[g].mean(0) for g in groups]).astype(np.float32),
            "values": np.stack([S[g].mean(0) for g in groups]).astype(np.float32)}


def predict(w, x, emb):
    z = 20.0 * (emb @ w["centroids"].T)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.clip(p @ w["values"], 0.0, 1.0)
'''

SCRIPT = r'''
import json, os, shutil, sys
from pathlib import Path
import numpy as np

tmp = Path(sys.argv[1])
sys.path.insert(0, str(tmp))
from toolkit.route import routers
routers.ROUTERS["toy"] = ("toy_router", "toy centroids")  # THE one registration

from toolkit.config import RouteConfig, load_recipe
from toolkit.errors import OptkitError
from toolkit.io import read_jsonl
from toolkit.pipeline import run_pipeline
from toolkit.route import Router
from toolkit.route.select import cross_validate
import toy_router

os.chdir(tmp)
outcomes = run_pipeline(load_recipe(tmp / "toy.yaml"))
route_dir = tmp / "artifacts" / "toy" / "route"
spec = json.loads((route_dir / "router.json").read_text())
rows = [r for r in read_jsonl(route_dir / "labels.jsonl") if r["part"] == "test"]
prompts = [r["prompt"] for r in rows][:40]  # the runtime embeds them three times below; 40 vary enough
router = Router.load(route_dir)
x, emb = router.features(prompts)
served = router.predict_quality(prompts)
own = toy_router.predict({k[5:]: v for k, v in router.weights.items() if k.startswith("head.")}, x, emb)
routed = router.route_batch(prompts)

# selectable: cross-validated beside logreg on cheap text features (no embedder needed)
cfg = RouteConfig(model="logreg", select=["toy", "constant"])
S = np.array([[r["scores"][m] for m in spec["models"]] for r in read_jsonl(route_dir / "labels.jsonl")])
feats = np.random.default_rng(0).normal(size=(len(S), 8)).astype(np.float32)
unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
cv = cross_validate(feats, unit, S, np.array([0.0, 1.0]), 1, cfg, 0)

# validated: a damaged copy (a toy tensor of the wrong shape) is refused with the tensor's name
bad = tmp / "bad"
shutil.copytree(route_dir, bad)
from safetensors.numpy import load_file, save_file
w = load_file(str(bad / "router.safetensors"))
w["head.values"] = w["head.values"][:, :1].copy()
save_file(w, str(bad / "router.safetensors"))
try:
    Router.load(bad)
    refused = None
except OptkitError as exc:
    refused = str(exc)

print(json.dumps({"status": outcomes[-1].status, "model": spec["model"], "head": spec["head"],
                  "tensors": sorted(spec["tensors"]), "same": bool(np.allclose(served, own)),
                  "varies": float(np.ptp(served[:, 1] - served[:, 0])), "routed": sorted(set(routed)),
                  "cv": sorted(cv["cv"]), "refused": refused}))
'''


def test_a_router_model_is_one_module_and_one_registry_line(tmp_path):
    (tmp_path / "toy_router.py").write_text(TOY)
    file_recipe(tmp_path, name="toy", model="toy", select=[], shift={"enabled": False}, bootstrap=0)
    (tmp_path / "run.py").write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the run's MLflow store stays under tmp_path (cwd)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "ran" and out["model"] == "toy" and out["head"] == "toy_centroid"
    assert out["tensors"] == ["feat.mean", "feat.scale", "head.centroids", "head.values"]
    assert out["same"] and out["varies"] > 0  # served by the toy's own predict, and it does route by prompt
    assert set(out["routed"]) <= {"mixtral_8x7b", "gpt4_1106"} and out["routed"]
    assert out["cv"] == ["constant", "logreg", "toy"]  # a selection candidate like the built-in ones
    assert out["refused"] is not None and "head.values" in out["refused"]


def test_an_unregistered_model_is_refused_by_the_recipe_and_by_router_json(tmp_path):
    """Without the registry line the same name is a clear error in both places (the registry is the gate)."""
    from toolkit.config import RouteConfig
    from toolkit.errors import OptkitError
    from toolkit.route import Router

    from .conftest import write_small_router

    with pytest.raises(Exception, match="toy"):
        RouteConfig(model="toy")
    spec = write_small_router(tmp_path)
    (tmp_path / "router.json").write_text(json.dumps({**spec, "model": "toy"}))
    with pytest.raises(OptkitError, match=r"model: unknown router model 'toy' \(known: logreg, mlp, knn, mf"):
        Router.load(tmp_path)
