"""The serving-side Router: safetensors round trip, cheap import, numpy-only classification."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from toolkit.config import RouteConfig
from toolkit.io import read_jsonl
from toolkit.route import Router
from toolkit.route.models import FITTERS
from toolkit.route.runtime import ROUTER_JSON, text_features

from .conftest import EXTRACT

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_is_cheap_in_a_fresh_process():
    heavy = ("sklearn", "torch", "scipy", "matplotlib", "mlflow", "transformers", "sentence_transformers", "pandas")
    loaded = _run(f"import sys, toolkit.route; print([m for m in {heavy!r} if m in sys.modules])")
    assert loaded == "[]"


def test_fortran_ordered_weights_round_trip(tmp_path):
    """sklearn can hand back Fortran-ordered arrays and safetensors writes raw memory: save_router makes every
    array C-contiguous, and a reloaded router predicts exactly what the in-memory one did."""
    from toolkit.route.stage import router_spec, save_router, standardizer
    from toolkit.route.labels import LabelTable

    rows = read_jsonl(EXTRACT)
    prompts = [r["prompt"] for r in rows]
    S = np.array([[float(r["mixtral_8x7b_correct"]), float(r["gpt4_1106_correct"])] for r in rows])
    raw = text_features(prompts)  # text features only: no embedder needed for this check
    mean, scale = standardizer(raw)
    x = (raw - mean) / scale
    cfg = RouteConfig(model="logreg", text_features=False)
    head, w = FITTERS["logreg"](x, x, S, cfg, seed=0)
    w = {k: np.asfortranarray(v) if v.ndim == 2 else v for k, v in w.items()}
    assert not w["coef"].flags.c_contiguous and w["coef"].shape == (x.shape[1], 2)
    table = LabelTable([str(i) for i in range(len(rows))], prompts, S, ["mixtral_8x7b", "gpt4_1106"],
                       np.array(["fit"] * len(rows), dtype=object))
    spec = router_spec(cfg, table, {"mixtral_8x7b": 0.05, "gpt4_1106": 1.0}, np.array([0.0, 1.0]), "gpt4_1106", head)
    spec["threshold"] = 0.1
    weights = {"feat.mean": mean, "feat.scale": scale, **{f"head.{k}": v for k, v in w.items()}}
    before = Router(spec, weights).predict_from_features(x, x)
    save_router(tmp_path, spec, weights)
    loaded = Router.load(tmp_path)
    np.testing.assert_array_equal(loaded.weights["head.coef"], w["coef"])
    np.testing.assert_allclose(loaded.predict_from_features(x, x), before, rtol=0, atol=0)
    assert json.loads((tmp_path / ROUTER_JSON).read_text())["tensors"]["head.coef"]["shape"] == [x.shape[1], 2]
    assert loaded.models == ["mixtral_8x7b", "gpt4_1106"] and loaded.threshold == 0.1


def test_runtime_in_fresh_process_needs_only_numpy_and_the_embedder(mmlu_run):
    route_dir, _ = mmlu_run
    code = f"""
import sys, numpy as np
import toolkit.route
r = toolkit.route.Router.load({str(route_dir)!r})
x = np.zeros((1, r.weights['feat.mean'].shape[0]), np.float32)
r.predict_from_features(x, x[:, :384])   # classification alone: numpy only
assert not any(m in sys.modules for m in ('sklearn', 'torch', 'scipy', 'mlflow', 'matplotlib')), 'heavy import'
from toolkit.models import load_embedder
emb = load_embedder('minilm-l6')   # what the embedder itself imports is allowed
before = set(sys.modules)
names = r.route_batch(['What is 2 + 2?\\nA. 3\\nB. 4\\nC. 5\\nD. 6\\nAnswer:'] * 3)
r2 = toolkit.route.Router.load({str(route_dir)!r}, embedder=emb)
name = r2.route('Which treaty ended the Thirty Years War?')
new = sorted(m for m in set(sys.modules) - before if not m.startswith(('toolkit.', 'encodings.')))
print(names, name, new)
"""
    line = _run(code)
    assert "'mixtral_8x7b'" in line or "'gpt4_1106'" in line
    assert line.endswith("[]"), line  # routing imported nothing beyond the embedder's own modules


def test_truncation_beyond_the_embedders_positions_is_refused_before_a_long_prompt_arrives(tmp_path):
    """MiniLM has 512 positions: route.max_seq_length 1024 used to embed every short prompt and then crash (a
    torch size mismatch) on the first long one, in the stage or in the gateway."""
    import uuid

    import pytest

    from toolkit.errors import OptkitError
    from toolkit.route.stage import embed_cached

    cfg = RouteConfig(max_seq_length=1024)
    with pytest.raises(OptkitError, match=r"route.max_seq_length=1024: the embedder takes at most 512 tokens"):
        embed_cached(cfg, [f"a short prompt {uuid.uuid4()}"])
    spec = {"models": ["weak", "strong"], "strong": "strong", "costs": {"weak": 0.0, "strong": 1.0},
            "cost_norm": [0.0, 1.0], "threshold": 0.0, "head": "linear", "model": "logreg",
            "features": {"embedding": "transformer", "embedder": cfg.embedder, "max_seq_length": 1024}}
    router = Router(spec, {})
    with pytest.raises(OptkitError, match=r"features.max_seq_length=1024"):
        router.embedder
    assert embed_cached(RouteConfig(max_seq_length=512), ["word " * 900]).shape == (1, 384)
