"""Static (model2vec-style) embeddings: token vectors distilled from MiniLM, served with numpy + tokenizers."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from toolkit.route.runtime import StaticEmbedder
from toolkit.route.static import TOKENIZER, VECTORS, build_vectors

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["How do I reset my account password?", "What is the derivative of x squared?"]


def _partial_build(directory: Path) -> np.ndarray:
    """Vectors for just the tokens of PROMPTS (the full 30k-token build takes minutes)."""
    from toolkit.models import load_embedder

    tok = load_embedder("minilm-l6").tokenizer
    ids = sorted({i for p in PROMPTS for i in tok(p, add_special_tokens=False)["input_ids"]})
    vectors, tok_json = build_vectors("minilm-l6", token_ids=ids)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / VECTORS).write_bytes(save({"vectors": vectors.astype(np.float16)}))
    shutil.copy(tok_json, directory / TOKENIZER)
    return vectors


def test_static_vectors_are_the_transformer_on_each_token(tmp_path):
    from toolkit.models import load_embedder

    vectors = _partial_build(tmp_path)
    model = load_embedder("minilm-l6")
    tok = model.tokenizer
    ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    # a token's vector = the embedder's own output for the one-token text "[CLS] token [SEP]"
    word = tok.convert_ids_to_tokens(ids[1])
    assert not word.startswith("##")
    np.testing.assert_allclose(vectors[ids[1]], model.encode([word])[0], atol=1e-4)
    emb = StaticEmbedder(tmp_path).encode(PROMPTS)
    mean = vectors[ids].mean(0)
    np.testing.assert_allclose(emb[0], mean / np.linalg.norm(mean), atol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), [1.0, 1.0], atol=1e-5)
    # related prompts are closer than unrelated ones, as with the full transformer
    other = StaticEmbedder(tmp_path).encode(["reset my password for the account"])[0]
    assert emb[0] @ other > emb[1] @ other


def test_static_router_serves_without_torch(tmp_path):
    """A router with a static embedder needs numpy + tokenizers only: no torch, no sentence-transformers."""
    from toolkit.config import RouteConfig
    from toolkit.route.labels import LabelTable
    from toolkit.route.models import FITTERS
    from toolkit.route.stage import router_spec, save_router, standardizer, text_features

    _partial_build(tmp_path)
    emb = StaticEmbedder(tmp_path).encode(PROMPTS * 20)
    S = np.array([[1.0, 1.0], [0.0, 1.0]] * 20)
    raw = np.concatenate([emb, text_features(PROMPTS * 20)], 1)
    mean, scale = standardizer(raw)
    cfg = RouteConfig(embedding="static", model="logreg")
    head, w = FITTERS["logreg"](((raw - mean) / scale).astype(np.float32), emb, S, cfg, 0)
    table = LabelTable([str(i) for i in range(40)], PROMPTS * 20, S, ["small", "big"], np.array(["fit"] * 40, object))
    spec = router_spec(cfg, table, {"small": 0.0, "big": 1.0}, np.array([0.0, 1.0]), "big", head)
    spec["threshold"] = 0.5
    save_router(tmp_path, spec, {"feat.mean": mean, "feat.scale": scale, **{f"head.{k}": v for k, v in w.items()}})
    code = f"""
import sys, toolkit.route
r = toolkit.route.Router.load({str(tmp_path)!r})
print(r.route_batch({PROMPTS!r}), [m for m in ('torch', 'sentence_transformers', 'sklearn', 'transformers') if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['small', 'big'] []"
