"""The evaluate stage: every variant (teacher, student merged and LoRA, each quantized artifact, the composed
system) on the same held-out prompts; quality x cost x latency in one table, the Pareto set, two plots,
report.md, and a nested MLflow run per variant. See toolkit/evaluate/measure.py for the metric definitions."""

from __future__ import annotations


# Recipe keys besides `evaluate` its outputs depend on; a change re-runs it (toolkit/pipeline.py). A stage
# name = that stage's outputs are consumed.
# Here: every variant, the teacher, the prompt format, seed, prices.
READS = ("collect", "distill", "quantize", "route", "cache", "teacher", "data", "seed", "pricing")


def run(ctx) -> dict:
    from toolkit.evaluate.stage import evaluate

    return evaluate(ctx)
