"""Static token vectors distilled from a sentence-transformers embedder (the idea of model2vec, Tulkens &
van Dongen 2024): every vocabulary token is run through the transformer once, alone ([CLS] token [SEP]), and
its pooled output becomes a fixed vector. A prompt's embedding is then the normalized mean of its tokens'
vectors: a tokenizer call and a numpy mean instead of a transformer forward pass (~100x faster on CPU),
which is what lets routing keep up with a serving stack on a small CPU. The model2vec package itself
cannot be used here: its distill extra pins an older transformers.

Built once per (embedder, revision) into the optkit cache, then copied next to the router that uses it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("optkit.route")

from toolkit.route.runtime import StaticEmbedder

VECTORS, TOKENIZER = StaticEmbedder.VECTORS, StaticEmbedder.TOKENIZER


def build_vectors(embedder_ref: str, token_ids: Optional[Sequence[int]] = None, batch: int = 1024) -> tuple[np.ndarray, Path]:
    """(vectors [vocab, dim] float32, path of the embedder's tokenizer.json). `token_ids` restricts the
    distillation to some tokens (others stay zero: they are ignored when averaging)."""
    import torch

    from toolkit.errors import OptkitError
    from toolkit.models import load_embedder, resolve

    model = load_embedder(embedder_ref)
    tok = model.tokenizer
    tok_json = Path(resolve(embedder_ref)) / TOKENIZER
    if not tok_json.is_file() or tok.cls_token_id is None or tok.sep_token_id is None:
        raise OptkitError(f"route.embedding=static: embedder '{embedder_ref}' needs a fast tokenizer "
                          "(tokenizer.json) with [CLS]/[SEP] tokens")
    ids = np.arange(len(tok)) if token_ids is None else np.unique(np.asarray(token_ids))
    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    out = np.zeros((len(tok), dim_of()), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            chunk = torch.as_tensor(ids[start:start + batch], dtype=torch.long)
            n = len(chunk)
            input_ids = torch.stack([torch.full((n,), tok.cls_token_id), chunk, torch.full((n,), tok.sep_token_id)], 1)
            feats = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                     "token_type_ids": torch.zeros_like(input_ids)}
            out[ids[start:start + batch]] = model(feats)["sentence_embedding"].float().numpy()
    return out, tok_json


def cached_vectors(embedder_ref: str) -> Path:
    """Directory holding static_embedder.safetensors + tokenizer.json for this embedder (built once)."""
    import shutil

    from safetensors.numpy import save

    from toolkit.io import atomic_dir
    from toolkit.models import cache_root, model_revision

    tag = f"{embedder_ref}-{model_revision(embedder_ref)}".replace("/", "_").replace("=", "_")
    target = cache_root() / "static" / tag
    if (target / VECTORS).is_file():
        return target
    log.info("route: distilling static token vectors from %s once into %s", embedder_ref, target)
    vectors, tok_json = build_vectors(embedder_ref)
    with atomic_dir(target) as tmp:  # an interrupted build leaves nothing that looks finished
        (tmp / VECTORS).write_bytes(save({"vectors": vectors.astype(np.float16)}))
        shutil.copy(tok_json, tmp / TOKENIZER)
    return target
