"""Which variants a run has, found from the finished stages' outputs (the stage contracts), and how to run each."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from toolkit.errors import OptkitError

SYSTEM = "system"


@dataclass
class Variant:
    name: str
    source: str  # teacher | student | student_lora | quantized | system
    engine: str  # transformers | llama.cpp | records (answers and latency from collect's records only)
    model_dir: Optional[Path] = None
    adapter_dir: Optional[Path] = None
    gguf: Optional[Path] = None
    tokenizer_dir: Optional[Path] = None  # GGUF: the source model's tokenizer renders its prompts (same ids)
    price_keys: tuple = ()  # recipe.pricing keys tried in order
    facts: dict = field(default_factory=dict)

    def descriptor(self) -> dict:
        return {"name": self.name, "source": self.source, "engine": self.engine,
                "model_dir": str(self.model_dir) if self.model_dir else None,
                "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None,
                "gguf": str(self.gguf) if self.gguf else None,
                "tokenizer_dir": str(self.tokenizer_dir) if self.tokenizer_dir else None, **self.facts}


def disk_bytes(path: Optional[Path]) -> Optional[int]:
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "work" not in f.relative_to(path).parts)


def collect_backend(ctx) -> str:
    """The engine collect actually ran: `auto` is resolved at run time and recorded in collect/summary.json."""
    recipe = ctx.recipe
    if recipe.collect is None:
        return "hf"
    from toolkit.collect.backends import used_backend

    return used_backend(ctx) or recipe.collect.backend


def _teacher(ctx) -> Variant:
    recipe = ctx.recipe
    backend = collect_backend(ctx)
    # vllm-server's records hold each request's wall time among ~128 open ones (queueing, not the model's
    # latency): its teacher is a local model, so it is re-measured like hf's (and swept on a vLLM server when
    # evaluate measures serving); its answers stay collect's either way (known_answers).
    if backend in ("hf", "vllm-server"):
        from toolkit.models import resolve

        ref = resolve(recipe.teacher.model)
        model_dir = Path(ref) if Path(str(ref)).exists() else None
        return Variant("teacher", "teacher", "transformers", model_dir=model_dir or Path(str(ref)),
                       price_keys=("teacher",), facts={"size_bytes": disk_bytes(model_dir)})
    # API / vLLM teachers are not re-run here: their answers and latencies are collect's records.
    return Variant("teacher", "teacher", "records", price_keys=("teacher",), facts={"backend": backend})


def discover(ctx) -> list[Variant]:
    """Every variant whose upstream outputs exist, in report order."""
    found = [_teacher(ctx)]
    if ctx.recipe.distill is not None and ctx.has_upstream("distill"):
        d = ctx.upstream("distill")
        found.append(Variant("student", "student", "transformers", model_dir=d / "model",
                             price_keys=("student",), facts={"size_bytes": disk_bytes(d / "model")}))
        if (d / "adapter").is_dir():
            found.append(Variant("student_lora", "student_lora", "transformers", model_dir=d / "base",
                                 adapter_dir=d / "adapter", price_keys=("student_lora", "student"),
                                 facts={"size_bytes": (disk_bytes(d / "base") or 0) + (disk_bytes(d / "adapter") or 0)}))
    if ctx.recipe.quantize is not None and ctx.has_upstream("quantize"):
        q = ctx.upstream("quantize")
        summary_path = q / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        source = quantize_source(ctx, q)
        for name, art in summary.items():
            if not art.get("path"):  # the unquantized source ("fp32"): that is the student variant
                continue
            path = q / art["path"]
            facts = {"method": art.get("method"), "format": art.get("format"), "size_bytes": disk_bytes(path)}
            if path.suffix == ".gguf":
                found.append(Variant(name, "quantized", "llama.cpp", gguf=path, tokenizer_dir=source,
                                     price_keys=(name, "student"), facts=facts))
            elif (path / "config.json").is_file():
                found.append(Variant(name, "quantized", "transformers", model_dir=path, price_keys=(name, "student"),
                                     facts=facts))
    return found


def quantize_source(ctx, q: Path) -> Optional[Path]:
    """The model the quantize stage started from (its tokenizer is the GGUF files' tokenizer)."""
    from toolkit.pipeline import read_manifest

    src = (read_manifest(q) or {}).get("quantize_source")
    if src and Path(src).is_dir():
        return Path(src)
    return ctx.upstream("distill") / "model" if ctx.recipe.distill is not None else None


def has_system_parts(ctx) -> bool:
    return any(getattr(ctx.recipe, s) is not None and ctx.has_upstream(s) for s in ("route", "cache"))


def select(ctx, found: list[Variant]) -> tuple[list[Variant], bool]:
    """(model variants to evaluate, whether to replay the system). The system needs the teacher and its
    student variant, which are then evaluated even when not listed."""
    cfg = ctx.config
    names = [v.name for v in found]
    system_ok = cfg.system.enabled and has_system_parts(ctx)
    if cfg.variants == "all":
        # "all" replays the system only when its student exists (a recipe without distill has none).
        wanted, system = list(names), system_ok and cfg.system.student in names
    else:
        unknown = [n for n in cfg.variants if n not in names and n != SYSTEM]
        if unknown:
            raise OptkitError(f"evaluate.variants: unknown variant(s) {', '.join(unknown)}; this run has: "
                              f"{', '.join(names + ([SYSTEM] if system_ok else []))}")
        wanted = [n for n in cfg.variants if n != SYSTEM]
        system = SYSTEM in cfg.variants
        if system and not system_ok:
            raise OptkitError("evaluate.variants: 'system' needs a finished route or cache stage and "
                              "evaluate.system.enabled")
    if system:
        if cfg.system.student not in names:
            raise OptkitError(f"evaluate.system.student: '{cfg.system.student}' is not a variant of this run "
                              f"(has: {', '.join(names)})")
        for need in ("teacher", cfg.system.student):
            if need not in wanted:
                wanted.append(need)
    return [v for v in found if v.name in wanted], system
