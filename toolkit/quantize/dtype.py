"""The dtype of what a compressed-tensors artifact keeps unquantized, and effective bits per weight.

The quantizers calibrate on an fp32 copy of the model (their statistics want it on CPU), so what they save
would be fp32 wherever nothing was quantized: the embeddings (and the head tied to them), the norms, the
ignored layers and the quantization scales. On SmolLM2-135M that is a 28M-parameter table, ~113 MB in fp32,
which made the INT4 artifacts larger than llama.cpp's Q4_K_M. The model was trained and is served in 16 bits,
so the checkpoint is rewritten with every floating tensor in that dtype unless the recipe asks for fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

SIXTEEN_BIT = ("bfloat16", "float16")
DTYPES = ("auto", *SIXTEEN_BIT, "float32")


def resolve_dtype(choice: str, src: Path) -> str:
    """"auto" = the source config's 16-bit dtype; bfloat16 when it says fp32 (a checkpoint converted or
    trained in fp32 still serves in 16 bits, and bfloat16 keeps fp32's range: no overflow in the head)."""
    if choice != "auto":
        return choice
    cfg = json.loads((Path(src) / "config.json").read_text())
    found = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").removeprefix("torch.")
    return found if found in SIXTEEN_BIT else "bfloat16"


def cast_checkpoint(out: Path, dtype: str) -> None:
    """Rewrite the saved *.safetensors of `out` with every floating tensor in `dtype` (int weights and zero
    points are untouched) and record the dtype in config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    nbytes = 0
    for f in sorted(Path(out).glob("*.safetensors")):
        tensors = load_file(f)
        cast = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        nbytes += sum(v.numel() * v.element_size() for v in cast.values())
        mode = f.stat().st_mode
        save_file(cast, f, metadata={"format": "pt"})
        f.chmod(mode)  # save_file creates the file private; keep the permissions it was saved with
    _fix_index(Path(out), nbytes)
    config = Path(out) / "config.json"
    cfg = json.loads(config.read_text())
    for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:  # whichever the config uses
        cfg[key] = dtype
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _fix_index(out: Path, nbytes: int) -> None:
    """A sharded checkpoint's index states the tensors' total size: keep it true after the cast."""
    index = out / "model.safetensors.index.json"
    if not index.is_file():
        return
    data = json.loads(index.read_text())
    data.setdefault("metadata", {})["total_size"] = nbytes
    index.write_text(json.dumps(data, indent=2) + "\n")


def parameter_count(model_dir: Path) -> int:
    """Parameters of an unquantized HF checkpoint, read from the safetensors headers (no weights loaded; a
    tied head is stored once, so counted once)."""
    import struct

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
    return total


def bits_per_weight(size_bytes: int, params: int) -> float | None:
    """Effective bits per weight: every byte of the artifact (scales, tokenizer, metadata included) over the
    parameters of the original model; comparable across formats at a glance."""
    return round(size_bytes * 8 / params, 2) if params else None
