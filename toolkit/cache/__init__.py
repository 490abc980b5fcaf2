"""cache: tune a semantic-cache similarity threshold with a stated false-hit bound; the runtime SemanticCache.

`from toolkit.cache import SemanticCache` costs numpy only (plus the embedder you load). The stage's heavier
parts (scipy, sklearn, matplotlib, sentence-transformers) are imported inside `run`.
"""

from toolkit.cache.runtime import Hit, SemanticCache

__all__ = ["Hit", "SemanticCache", "run"]


# Recipe keys besides `cache` its outputs depend on; a change re-runs it (toolkit/pipeline.py). A stage
# name = that stage's outputs are consumed.
# Here: the prompts (read from `data` directly), seed (sampling, calibration/held-out split).
READS = ("data", "seed")


def run(ctx):
    from toolkit.cache.stage import run as run_stage

    return run_stage(ctx)
