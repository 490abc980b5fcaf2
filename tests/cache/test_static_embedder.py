"""cache.embedding = static: the threshold is tuned with the router's static (numpy + tokenizers) embedder, the
vectors ship beside cache.json, and the runtime loads and serves that cache in a process where torch cannot load."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from toolkit.cache.runtime import PROBES, STATIC_DIR
from toolkit.config import recipe_from_dict
from toolkit.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[2]
BITEXT = ROOT / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"


def recipe(name: str, embedding: str) -> object:
    return recipe_from_dict({
        "name": name, "teacher": {"model": "smollm2-135m-instruct"},
        "data": {"path": str(BITEXT), "prompt_column": "instruction", "limit": 300},
        "cache": {"group_column": "category", "embedding": embedding, "epsilon": 0.3, "stress": False}})


@pytest.fixture
def partial_static(tmp_path, monkeypatch):
    """Static vectors for just the tokens of the data and the probes (the full 30k-token build takes minutes),
    standing in for toolkit.route.static.cached_vectors."""
    from toolkit.models import load_embedder
    from toolkit.route import static

    tok = load_embedder("minilm-l6").tokenizer
    texts = [json.loads(line)["instruction"] for line in BITEXT.read_text().splitlines() if line.strip()]
    ids = sorted({i for t in [*texts, *PROBES] for i in tok(t, add_special_tokens=False)["input_ids"]})
    vectors, tok_json = static.build_vectors("minilm-l6", token_ids=ids)
    directory = tmp_path / "static-build"
    directory.mkdir()
    (directory / static.VECTORS).write_bytes(save({"vectors": vectors.astype(np.float16)}))
    shutil.copy(tok_json, directory / static.TOKENIZER)
    monkeypatch.setattr(static, "cached_vectors", lambda ref: directory)
    return directory


def test_static_cache_stage_serves_without_torch(workdir, partial_static):
    [outcome] = run_pipeline(recipe("staticcache", "static"))
    assert outcome.status == "ran"
    out = workdir / "artifacts" / "staticcache" / "cache"
    cfg = json.loads((out / "cache.json").read_text())
    assert cfg["embedder"]["embedding"] == "static" and cfg["embedder"]["files"] == STATIC_DIR
    assert (out / STATIC_DIR / "static_embedder.safetensors").is_file() and (out / STATIC_DIR / "tokenizer.json").is_file()
    assert cfg["feasible"] and cfg["bound"] <= cfg["epsilon"]

    [outcome] = run_pipeline(recipe("transformercache", "transformer"))
    ref = json.loads((workdir / "artifacts" / "transformercache" / "cache" / "cache.json").read_text())
    assert ref["embedder"]["embedding"] == "transformer" and "files" not in ref["embedder"]
    # A different embedder: its own similarities, its own threshold and probe vectors.
    assert cfg["threshold"] != ref["threshold"]
    assert not np.allclose(cfg["embedder"]["probe_vectors"], ref["embedder"]["probe_vectors"], atol=1e-3)

    code = f"""
import sys
for name in ('torch', 'sentence_transformers', 'transformers', 'sklearn'):
    sys.modules[name] = None  # `import torch` raises ImportError from here on
from toolkit.cache import SemanticCache
cache = SemanticCache.load({str(out / 'cache.json')!r})
cache.insert('I want to cancel my order', 'CANCELLATION')
exact = cache.lookup('I want to cancel my order')
near = cache.lookup('i want to cancel my order please')
print(type(cache.embedder).__name__, exact.exact, exact.answer, near.exact, near.similarity >= cache.threshold,
      [m for m in ('torch', 'sentence_transformers') if sys.modules.get(m) is not None])
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workdir, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["StaticEmbedder", "True", "CANCELLATION", "False", "True", "[]"]

    # Without its vectors the cache refuses to load (never a silent fall-back to another embedder).
    shutil.rmtree(out / STATIC_DIR)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=workdir, timeout=120)
    assert run.returncode != 0 and "embedding static needs" in run.stderr
