"""The teacher-record contract between collect and every later stage.

`collect/outputs.jsonl` holds one JSON object per prompt that the teacher answered (failures go to
`collect/failures.jsonl`). Fields:

    id            str   stable prompt id (id column, or sha256 of the templated messages)
    split         str   train | val | test (deterministic, by hash of id and recipe seed)
    messages      list  chat messages sent to the teacher: [{"role": "system"|"user", "content": str}, ...]
    prompt        str   the user message text alone (for routers, caches, reports)
    reference     str|None  gold answer from data.reference_column
    output        str   teacher's completion
    finish_reason str   stop | length | ...
    input_tokens  int
    output_tokens int
    latency_s     float wall time of the request (or the batch share, for batched local backends)
    model         str   teacher model reference

Top-k log-probs (collect.top_logprobs > 0) live beside it in `collect/topk.safetensors`: for record id X,
tensors `X.ids` (int32, [output_tokens, k]) and `X.logprobs` (float16, [output_tokens, k]), the teacher's
top-k next-token ids and log-probs at each output position. Read them with `load_topk`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from toolkit.io import read_jsonl

OUTPUTS = "outputs.jsonl"
FAILURES = "failures.jsonl"
TOPK = "topk.safetensors"

FIELDS = ("id", "split", "messages", "prompt", "reference", "output", "finish_reason", "input_tokens",
          "output_tokens", "latency_s", "model")


def load_records(collect_dir: Path, splits: Optional[Iterable[str]] = None) -> list[dict]:
    rows = read_jsonl(Path(collect_dir) / OUTPUTS)
    if splits is not None:
        wanted = set(splits)
        rows = [r for r in rows if r["split"] in wanted]
    return rows


def load_topk(collect_dir: Path) -> dict[str, tuple]:
    """id -> (ids [T,k] int32 tensor, logprobs [T,k] float16 tensor); empty when none were collected."""
    path = Path(collect_dir) / TOPK
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for key, value in tensors.items():
        rid, kind = key.rsplit(".", 1)
        out.setdefault(rid, [None, None])[0 if kind == "ids" else 1] = value
    return {k: (v[0], v[1]) for k, v in out.items()}
