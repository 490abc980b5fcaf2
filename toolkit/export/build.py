"""Assemble the bundle: pick the parts the recipe asks for from the finished stages, copy them, write serve.sh,
the model card and the manifest, then move the whole directory into place at once."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.export")

# Distributions whose versions go into the manifest (those installed; vllm is usually on the serving side only).
VERSIONED = ("optkit", "torch", "transformers", "tokenizers", "safetensors", "peft", "accelerate",
             "compressed-tensors", "llmcompressor", "llama_cpp_python", "gguf", "sentence-transformers",
             "scikit-learn", "numpy", "mlflow", "vllm")


@dataclass
class Part:
    kind: str  # hf | lora | gguf | modelfile | router | cache
    name: str
    src: Path
    dest: str  # bundle-relative path
    facts: dict = field(default_factory=dict)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------------------ choosing parts


def _quantize_summary(ctx) -> dict:
    path = ctx.upstream("quantize") / "summary.json"
    if not path.is_file():
        raise OptkitError(f"export: {path} is missing (the quantize stage's artifact list)")
    return json.loads(path.read_text())


def hf_facts(model_dir: Path) -> dict:
    """What serving needs to know about an HF dir, and what it lacks to be vLLM-ready."""
    config = json.loads((model_dir / "config.json").read_text())
    missing = [what for what, ok in (
        ("safetensors weights", any(model_dir.glob("*.safetensors"))),
        ("tokenizer", (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file()),
        ("generation_config.json", (model_dir / "generation_config.json").is_file()),
    ) if not ok]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        missing.append("pickle-free weights (found .bin/.pt files)")
    q = config.get("quantization_config") or {}
    return {"architecture": (config.get("architectures") or ["?"])[0],
            "quantization": q.get("quant_method") or q.get("format"), "missing": missing}


def choose_parts(ctx) -> tuple[list[Part], list[str]]:
    """(parts to copy, notes on what was left out and why)."""
    cfg = ctx.config
    parts: list[Part] = []
    notes: list[str] = []

    def available(stage: str, part: str) -> bool:
        if getattr(ctx.recipe, stage) is None or not ctx.has_upstream(stage):
            notes.append(f"{part}: left out (the {stage} stage is not in this recipe or has not finished)")
            return False
        return True

    if "student" in cfg.include and available("distill", "student"):
        parts.append(Part("hf", "student", ctx.upstream("distill") / "model", "models/student"))
    if "adapter" in cfg.include and available("distill", "adapter"):
        d = ctx.upstream("distill")
        if (d / "adapter").is_dir():
            parts.append(Part("hf", "student-base", d / "base", "models/student-base", {"role": "lora base"}))
            parts.append(Part("lora", "student-lora", d / "adapter", "adapters/student-lora",
                              {"base": "models/student-base"}))
        else:
            notes.append("adapter: left out (distill.method = full has no adapter)")
    want_q, want_g = "quantized" in cfg.include, "gguf" in cfg.include
    if (want_q or want_g) and available("quantize", "quantized/gguf"):
        qdir = ctx.upstream("quantize")
        summary = _quantize_summary(ctx)
        # Entries without a path (the unquantized "fp32" reference) are the student itself.
        artifacts = {k: v for k, v in summary.items() if v.get("path")}
        names = cfg.quantized if cfg.quantized is not None else list(artifacts)
        for name in names:
            if name not in artifacts:
                raise OptkitError(f"export.quantized: '{name}' is not an artifact in quantize/summary.json "
                                  f"(has: {', '.join(artifacts)})")
            src = qdir / summary[name]["path"]
            if src.suffix == ".gguf":
                if want_g:
                    parts.append(Part("gguf", name, src, f"gguf/{src.name}", {"method": summary[name].get("method")}))
            elif want_q:
                parts.append(Part("hf", name, src, f"models/{name}", {"method": summary[name].get("method")}))
        if want_g and (qdir / "gguf" / "Modelfile").is_file() and any(p.kind == "gguf" for p in parts):
            parts.append(Part("modelfile", "Modelfile", qdir / "gguf" / "Modelfile", "gguf/Modelfile"))
    if "route" in cfg.include and available("route", "route"):
        parts.append(Part("router", "router", ctx.upstream("route"), "route"))
    if "cache" in cfg.include and available("cache", "cache"):
        parts.append(Part("cache", "cache", ctx.upstream("cache") / "cache.json", "cache.json"))
        if (ctx.upstream("cache") / "cache-embedder").is_dir():  # cache.embedding = static: its vectors travel too
            parts.append(Part("cache-embedder", "cache-embedder", ctx.upstream("cache") / "cache-embedder", "cache-embedder"))
        query = json.loads((ctx.upstream("cache") / "cache.json").read_text()).get("query_threshold")
        if query:  # cache.adaptive = query: the calibration queries its threshold reads
            parts.append(Part("cache-reference", "cache-reference", ctx.upstream("cache") / query["reference"]["file"],
                              query["reference"]["file"]))
    for p in parts:
        if not p.src.exists():
            raise OptkitError(f"export: {p.src} is missing ({p.name}); re-run the stage that writes it")
    return parts, notes


# ------------------------------------------------------------------------------------------ copying


def copy_part(part: Part, root: Path) -> None:
    dest = root / part.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if part.kind == "router":  # only the runtime files, not the report or plots
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("router.json", "router.safetensors", "static_embedder.safetensors", "tokenizer.json",
                     "cascade.json"):  # cascade.json: route.mode = cascade (the gateway then runs the cascade)
            if name.startswith("router") or (part.src / name).is_file():  # a static router carries its embedder
                shutil.copy2(part.src / name, dest / name)
    elif part.src.is_dir():
        # Stage-internal litter (hidden temp files, work/) never goes to a deployment.
        shutil.copytree(part.src, dest, ignore=shutil.ignore_patterns(".*", "work"))
        if part.kind == "lora":
            _rebase_adapter(dest, part.facts["base"])
    else:
        shutil.copy2(part.src, dest)


def _rebase_adapter(adapter: Path, base: str) -> None:
    """peft wrote the build machine's path of the base into the adapter (and a template README naming it): point it
    at the base inside the bundle (relative to the bundle root: AutoPeftModelForCausalLM from there, or
    PeftModel.from_pretrained on models/student-base), and drop that README (the bundle's card documents it)."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (adapter / "README.md").unlink(missing_ok=True)


def model_entries(parts: list[Part], root: Path, prefix: str) -> list[dict]:
    models = []
    for p in parts:
        if p.kind == "hf":
            facts = hf_facts(root / p.dest)
            models.append({"name": p.name, "kind": "hf", "path": p.dest, "served_name": f"{prefix}-{p.name}",
                           **p.facts, **facts})
        elif p.kind == "lora":
            adapter_cfg = json.loads((root / p.dest / "adapter_config.json").read_text())
            models.append({"name": p.name, "kind": "lora", "path": p.dest, "served_name": f"{prefix}-{p.name}",
                           "rank": adapter_cfg.get("r"), **p.facts})
        elif p.kind == "gguf":
            models.append({"name": p.name, "kind": "gguf", "path": p.dest, **p.facts})
    return models


def ensure_modelfile(root: Path, models: list[dict]) -> None:
    """The quantize stage writes a Modelfile; when it did not, point Ollama at the smallest GGUF."""
    ggufs = [m for m in models if m["kind"] == "gguf"]
    if not ggufs or (root / "gguf" / "Modelfile").is_file():
        return
    smallest = min(ggufs, key=lambda m: (root / m["path"]).stat().st_size)
    (root / "gguf" / "Modelfile").write_text(f"FROM ./{Path(smallest['path']).name}\nPARAMETER temperature 0\n")


def file_table(root: Path) -> dict[str, dict]:
    from toolkit.bundle import list_files, sha256_file

    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in list_files(root)}


def bundled_recipe(recipe) -> dict:
    """The recipe for the bundle's provenance, without process settings (threads, tracking, where artifacts go):
    those change no output, so changing them must not make the bundle differ (export.READS leaves them out)."""
    return {k: v for k, v in recipe.public_dict().items() if k not in ("runtime", "tracking", "artifacts_dir")}


def evaluate_rows(ctx) -> list[dict]:
    if ctx.recipe.evaluate is None or not ctx.has_upstream("evaluate"):
        return []
    path = ctx.upstream("evaluate") / "variants.json"
    return json.loads(path.read_text()) if path.is_file() else []


def write_deploy(root: Path, models: list[dict], prefix: str, cfg) -> None:
    import yaml

    from toolkit.export import deploy
    from toolkit.io import atomic_write_text

    serve = yaml.safe_load((root / "serve.yaml").read_text())
    text, serve_compose = deploy.compose(prefix, models, cfg.port, serve, cfg.vllm_args)
    atomic_write_text(root / "docker-compose.yaml", text)
    atomic_write_text(root / deploy.COMPOSE_SERVE, serve_compose)
    (root / deploy.K8S).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / deploy.K8S, deploy.kubernetes(prefix, models, cfg.port, serve))


def gateway_config(root: Path, models: list[dict], prefix: str, port: int, recipe) -> tuple[str, Optional[str],
                                                                                           Optional[str]]:
    """(serve.yaml text, strong backend, weak backend): a bundle with models fronts them and the teacher
    (toolkit.serve.bundle_config); a router alone fronts the models it routes between (same module)."""
    from toolkit.export.gateway import router_models
    from toolkit.serve.bundle_config import route_only_serve_yaml, serve_yaml

    if models or not (root / "route" / "router.json").is_file():
        return serve_yaml(models, prefix, port, recipe), None, None
    names, strong = router_models(root / "route")
    weak = next(iter(n for n in names if n != strong)) if len(names) == 2 else None
    return route_only_serve_yaml(names, strong, prefix, port), strong, weak


# ------------------------------------------------------------------------------------------ the stage


def build_bundle(ctx) -> dict:
    from toolkit import __version__
    from toolkit.bundle import FORMAT, MANIFEST
    from toolkit.export import BUNDLE
    from toolkit.export.card import model_card
    from toolkit.export.gateway import gateway_case
    from toolkit.export.serve import serve_script
    from toolkit.io import atomic_dir, atomic_write_json, atomic_write_text, publish_modes

    cfg = ctx.config
    prefix = cfg.served_name or ctx.recipe.name
    parts, notes = choose_parts(ctx)
    if not parts:
        raise OptkitError("export: nothing to bundle (export.include names no part whose stage has finished)")
    rows = evaluate_rows(ctx)
    with atomic_dir(ctx.dir / BUNDLE) as tmp:
        with ctx.progress("copying bundle parts", len(parts)) as advance:
            for part in parts:
                copy_part(part, tmp)
                advance(1)
        models = model_entries(parts, tmp, prefix)
        ensure_modelfile(tmp, models)
        for m in models:
            for what in m.get("missing", []):
                notes.append(f"{m['name']}: not vLLM-ready, missing {what}")
        serve_text, strong, weak = gateway_config(tmp, models, prefix, cfg.port, ctx.recipe)
        atomic_write_text(tmp / "serve.yaml", serve_text)  # optkit serve
        atomic_write_text(tmp / "serve.sh", serve_script(models, prefix, cfg.port, cfg.vllm_args,
                                                         gateway_case(serve_text, strong, weak)))
        write_deploy(tmp, models, prefix, cfg)  # docker-compose.yaml, serve.compose.yaml, k8s/gateway.yaml
        has = {p.kind for p in parts}
        manifest = {
            "format": FORMAT, "run": ctx.recipe.name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "optkit": __version__, "models": models,
            "router": "route" if "router" in has else None, "cache": "cache.json" if "cache" in has else None,
            "cascade": "route/cascade.json" if (tmp / "route/cascade.json").is_file() else None,
            "metrics": rows, "notes": notes, "versions": library_versions(), "recipe": bundled_recipe(ctx.recipe),
        }
        atomic_write_text(tmp / "README.md", model_card(manifest, tmp))
        manifest["files"] = file_table(tmp)  # last: covers every file written above
        atomic_write_json(tmp / MANIFEST, manifest)
        # Shipped to another user's serving process: 0755/0644 whatever the sources' modes and the umask were.
        publish_modes(tmp, executables=["serve.sh"])
    bundle = ctx.dir / BUNDLE
    from toolkit.bundle import Bundle

    digest = Bundle.open(bundle).manifest_sha256()
    ctx.extra["bundle_manifest_sha256"] = digest
    for note in notes:
        log.warning("export: %s", note)
    size = sum(meta["bytes"] for meta in manifest["files"].values())
    metrics = {"files": len(manifest["files"]), "bundle_bytes": size, "models": len(models)}
    if cfg.register_model:
        from toolkit.export.registry import register

        ctx.extra["registered_model"] = register(ctx, bundle, cfg.registry_name or ctx.recipe.name, digest)
    log.info("export: bundle at %s (%d files, %.1f MB), manifest sha256 %s", bundle, len(manifest["files"]),
             size / 1e6, digest)
    return metrics
