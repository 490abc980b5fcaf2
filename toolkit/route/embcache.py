"""On-disk embedding cache shared by every run: one vector per (embedder, revision, truncation, text hash).

Embedding 10k prompts with MiniLM takes minutes on a loaded CPU core; a second run (another run name, another
router model, the benchmark) re-uses the vectors. Layout: `<cache_root>/embeddings/<tag>/<shard>.npz`, each
shard holding `hashes` (sha256 of the text, hex) and `vectors` (float32, unit norm). New vectors are appended
as a new shard written atomically, so an interrupted run leaves nothing half-written and concurrent runs at
worst compute a vector twice.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger("optkit.route")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def cache_dir(embedder: str, revision: str, max_seq_length: int, root: Optional[Path] = None) -> Path:
    from toolkit.models import cache_root

    tag = hashlib.sha256(f"{embedder}|{revision}|{max_seq_length}".encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in embedder)[-40:]
    return Path(root or cache_root()) / "embeddings" / f"{safe}-{tag}"


def _load(directory: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for shard in sorted(directory.glob("*.npz")):
        try:
            with np.load(shard, allow_pickle=False) as z:
                hashes, vectors = z["hashes"], z["vectors"]
        except Exception:  # a damaged shard is ignored (its vectors are recomputed), never fatal
            log.warning("route: ignoring unreadable embedding cache shard %s", shard)
            continue
        if len(hashes) != len(vectors):
            continue
        for h, v in zip(hashes.tolist(), vectors):
            found[h] = v
    return found


def cached_embed(prompts: Sequence[str], encode: Callable[[list[str]], np.ndarray], embedder: str,
                 revision: str, max_seq_length: int, root: Optional[Path] = None) -> np.ndarray:
    """Unit-norm embeddings [n, dim] float32; only texts not cached yet are passed to `encode`."""
    from toolkit.io import atomic_write_bytes

    directory = cache_dir(embedder, revision, max_seq_length, root)
    known = _load(directory) if directory.is_dir() else {}
    hashes = [text_hash(p) for p in prompts]
    todo: dict[str, str] = {}
    for h, p in zip(hashes, prompts):
        if h not in known and h not in todo:
            todo[h] = p
    items = list(todo.items())
    for start in range(0, len(items), 2000):  # shards of 2,000: an interrupted long run keeps what it embedded
        chunk = dict(items[start:start + 2000])
        new = np.asarray(encode(list(chunk.values())), dtype=np.float32)
        buf = io.BytesIO()
        np.savez(buf, hashes=np.array(list(chunk), dtype="U64"), vectors=new)
        shard = hashlib.sha256("".join(chunk).encode()).hexdigest()[:20]
        atomic_write_bytes(directory / f"{shard}.npz", buf.getvalue())
        known.update(zip(chunk, new))
    if todo:
        log.info("route: embedded %d new prompts (%d from the cache %s)", len(todo), len(prompts) - len(todo),
                 directory)
    if not prompts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([known[h] for h in hashes]).astype(np.float32)
