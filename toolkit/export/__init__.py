"""The export stage: a bundle a serving stack deploys without optkit's training dependencies.

`export/bundle/` (the stage directory also holds the pipeline's own manifest.json, so the bundle is one level
down and can be copied away whole):

    models/<name>/        vLLM-ready HF dirs: merged student, its LoRA base, compressed-tensors artifacts
    adapters/<name>/      peft LoRA adapter (served on its base with --enable-lora --lora-modules)
    gguf/                 GGUF files + Ollama Modelfile
    route/                router.json + router.safetensors
    cache.json            tuned semantic-cache config
    serve.sh              the exact vllm serve / ollama command lines
    serve.yaml            the gateway's backends and policy (`optkit serve .`)
    docker-compose.yaml   gateway + model servers (serve.compose.yaml: its serve.yaml); k8s/gateway.yaml
    README.md             model card: what is inside, measured numbers and their limits
    manifest.json         every file with sha256, the recipe, metrics, library versions

Setup (what is included) -> copy parts into a temporary dir -> serve.sh, model card -> manifest -> move into
place -> optional MLflow model registry.
"""

from __future__ import annotations

BUNDLE = "bundle"


# Recipe keys besides `export` its outputs depend on; a change re-runs it (toolkit/pipeline.py). A stage
# name = that stage's outputs are consumed.
# Here: the finished parts, and the recipe it embeds in the bundle manifest.
READS = ("collect", "distill", "quantize", "route", "cache", "evaluate", "teacher", "data", "seed", "pricing",
         "description")


def run(ctx) -> dict:
    from toolkit.export.build import build_bundle

    return build_bundle(ctx)
