"""gguf: llama.cpp's converter (HF dir -> F16 GGUF), then llama.cpp's quantizer (Q8_0, Q4_K_M, ...).

The converter script (`convert_hf_to_gguf.py`, MIT, the ggml authors) is not part of the llama-cpp-python
wheel, but its sdist vendors llama.cpp with it. We fetch the sdist of the *installed* llama-cpp-python
version once with pip (same registry as every other package), keep only the converter, its `conversion`
package, `gguf-py` and the licence in the optkit cache, and run it with the current Python. Quantization
goes through the llama_cpp binding's `llama_model_quantize` (the same C function as `llama-quantize`).
An importance matrix is not offered: the binding cannot pass one to the quantizer (it is a C++ map pointer).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from toolkit import procs
from toolkit.errors import MissingExtraError, OptkitError
from toolkit.quantize.method import Artifact, QuantMethodConfig

log = logging.getLogger("optkit.quantize")

GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")


class GGUFConfig(QuantMethodConfig):
    """GGUF via llama.cpp (converter + llama-cpp-python)."""

    types: list[Literal[GGUF_TYPES]] = Field(["Q8_0", "Q4_K_M"], min_length=1,
                                             description="llama.cpp quantization types to produce.")
    modelfile_type: Optional[Literal[GGUF_TYPES]] = Field(
        None, description="Which GGUF the Ollama Modelfile points at (default: the first of types).")
    converter_dir: Optional[str] = Field(
        None, description="A llama.cpp checkout holding convert_hf_to_gguf.py; default: fetched once from the "
        "llama-cpp-python sdist of the installed version into the optkit cache.")

    @model_validator(mode="after")
    def _modelfile_type_is_produced(self):
        if self.modelfile_type is not None and self.modelfile_type not in self.types:
            raise ValueError(f"modelfile_type {self.modelfile_type} is not one of types {self.types}")
        return self

CONVERTER = "convert_hf_to_gguf.py"
# What we keep from the sdist's vendor/llama.cpp: the script, the modules it imports, the licence.
KEEP = (CONVERTER, "conversion/", "gguf-py/", "LICENSE")


def llama_cpp_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtraError("GGUF quantization", "llama-cpp-python", "gguf") from None
    return llama_cpp.__version__


def converter_dir(configured: str | None = None) -> Path:
    """A directory with convert_hf_to_gguf.py: the configured one, the cached one, or fetched now."""
    if configured:
        path = Path(configured).expanduser()
        if not (path / CONVERTER).is_file():
            raise OptkitError(f"quantize.gguf.converter_dir: no {CONVERTER} in {path}")
        return path
    from toolkit.models import cache_root

    version = llama_cpp_version()
    target = cache_root() / "llama.cpp-converter" / version
    if not (target / CONVERTER).is_file():
        with tempfile.TemporaryDirectory() as tmp:
            extract_converter(download_sdist(version, Path(tmp)), target)
    return target


def download_sdist(version: str, dest: Path) -> Path:
    log.info("fetching llama.cpp's converter from the llama-cpp-python %s sdist (once)", version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    proc = procs.run(cmd)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise OptkitError(f"could not download the llama-cpp-python {version} sdist to get llama.cpp's GGUF "
                          f"converter ({proc.stderr.strip()[-300:]}); set quantize.gguf.converter_dir to a "
                          "llama.cpp checkout instead")
    return found[0]


def extract_converter(sdist: Path, target: Path) -> Path:
    from toolkit.io import atomic_dir

    with tarfile.open(sdist) as tar, atomic_dir(target) as tmp:
        for member in tar.getmembers():
            parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rel>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not member.isfile():
                continue
            rel = parts[3]
            if rel == CONVERTER or rel == "LICENSE" or rel.startswith(KEEP[1:3]):
                member.name = rel
                tar.extract(member, tmp, filter="data")  # "data" refuses links and paths outside tmp
    if not (target / CONVERTER).is_file():
        raise OptkitError(f"{sdist.name} does not contain vendor/llama.cpp/{CONVERTER}")
    return target


def converter_view(src: Path, work: Path) -> Path:
    """The model dir as the converter should see it. A byte-level BPE tokenizer that also sets
    byte_fallback (transformers writes one when it converts a GGUF tokenizer, e.g. our built-in SmolLM2)
    makes the converter file it as a sentencepiece-style Llama vocab: the GGUF then decodes 'Ġ' literally.
    byte_fallback never fires in a byte-level BPE (every byte has a token), so a view of the dir with it
    off converts to the right (gpt2) vocab without changing tokenization."""
    tok_file = src / "tokenizer.json"
    if not tok_file.is_file():
        return src
    tok = json.loads(tok_file.read_text())
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    if not (model.get("type") == "BPE" and model.get("byte_fallback") and "ByteLevel" in json.dumps(pre)):
        return src
    view = work / "converter-view"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (view / f.name).symlink_to(f.resolve())
    model["byte_fallback"] = False
    (view / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return view


def convert(src: Path, out_file: Path, converter: Path, children: Optional[Path] = None) -> None:
    """HF dir -> F16 GGUF with the current interpreter (it needs torch, numpy, transformers, sentencepiece).
    The converter runs as a child that dies with us; `children`: where it is recorded meanwhile (toolkit.procs),
    so a run after a kill -9 reaps it and deletes its half-written output before converting again."""
    view = converter_view(src, out_file.parent)
    cmd = [sys.executable, str(converter / CONVERTER), str(view), "--outfile", str(out_file), "--outtype", "f16"]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the gguf-py that matches it
    temporaries = [out_file] + ([view] if view != src else [])
    record = Path(children) / "convert_hf_to_gguf.json" if children is not None else None
    try:
        proc = procs.run(cmd, env=env, record=record, temporaries=temporaries)
    finally:
        if view != src:
            shutil.rmtree(view, ignore_errors=True)
    if proc.returncode != 0 or not out_file.is_file():
        out_file.unlink(missing_ok=True)
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise OptkitError(f"llama.cpp's converter failed on {src} (unsupported architecture?): {tail}")


def quantize_file(f16: Path, out_file: Path, qtype: str, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    tmp = out_file.with_name("." + out_file.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise OptkitError(f"llama.cpp could not quantize {f16.name} to {qtype} (code {rc})")
    os.replace(tmp, out_file)


# Ollama does not run the model's Jinja chat template: for a ChatML model the Modelfile spells it out, with the
# system turn the template adds by itself (SmolLM2's names the assistant), so Ollama sends the prompts evaluate
# scored. The same template as LLaMA-Factory's ChatML Modelfiles; the system message from .System only.
CHATML = ('TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ range .Messages }}'
          '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
          '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"""')


def modelfile(gguf_name: str, stop: str | None, chatml_system: str | None = None, raw: bool = False) -> str:
    """An Ollama Modelfile: the ChatML template and default system turn when the model uses ChatML
    (`chatml_system`: its default system text, "" for none); otherwise Ollama takes the template it recognises
    in the GGUF's metadata. raw: the recipe renders prompts as plain text (data.chat_template: false), so Ollama
    must send the prompt as it is, not wrapped in a chat template the student never saw."""
    lines = ["# Ollama: ollama create <name> -f Modelfile && ollama run <name>", f"FROM ./{gguf_name}",
             "PARAMETER temperature 0"]
    stops = [stop] if stop else []
    if raw:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    elif chatml_system is not None:
        lines.append(CHATML)
        if chatml_system:
            lines.append(f'SYSTEM """{chatml_system}"""')
        stops += [t for t in ("<|im_end|>", "<|im_start|>") if t not in stops]
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    return "\n".join(lines) + "\n"


def chatml_system(src: Path) -> str | None:
    """The default system text of a ChatML chat template ("" = none), None when the template is not ChatML."""
    import re

    from toolkit.models import load_tokenizer

    try:
        tok = load_tokenizer(str(src))
        text = tok.apply_chat_template([{"role": "user", "content": "@@Q@@"}], tokenize=False,
                                       add_generation_prompt=True)
    except Exception:  # no template, or one that refuses this conversation: let Ollama decide
        return None
    tail = "<|im_start|>user\n@@Q@@<|im_end|>\n<|im_start|>assistant\n"
    if not isinstance(text, str) or not text.endswith(tail):
        return None
    head = text[:-len(tail)]
    m = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", head, re.S)
    return m.group(1) if m else ("" if head == "" else None)


def run(cfg: GGUFConfig, job) -> list[Artifact]:
    """Writes job.out/model-<TYPE>.gguf for each type and job.out/Modelfile: one artifact per type."""
    from toolkit.io import atomic_write_text

    version = llama_cpp_version()
    conv = converter_dir(cfg.converter_dir)
    f16 = job.work / "model-F16.gguf"  # intermediate (work/ is keyed by the source): a resumed run reuses it
    if not f16.is_file():
        job.work.mkdir(parents=True, exist_ok=True)
        tmp = job.work / ".model-F16.gguf.tmp"
        convert(job.src, tmp, conv, job.children)
        os.replace(tmp, f16)
    job.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for qtype in cfg.types:
        target = job.out / f"model-{qtype}.gguf"
        quantize_file(f16, target, qtype, job.threads)
        files[qtype] = target.name
    chosen = cfg.modelfile_type or cfg.types[0]  # the config checked it is one of types
    system = chatml_system(job.src) if job.chat_template else None
    atomic_write_text(job.out / "Modelfile", modelfile(files[chosen], _eos_token(job.src), system,
                                                       raw=not job.chat_template))
    converter = f"llama.cpp via llama-cpp-python {version} sdist (MIT)"
    return [Artifact(f"gguf-{q}", "gguf", f, {"type": q, "converter": converter}) for q, f in files.items()]


def _eos_token(src: Path) -> str | None:
    try:
        cfg = json.loads((src / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    eos = cfg.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos
