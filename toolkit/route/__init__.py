"""route: a complexity router that knows when the cheaper model is good enough.

Runtime (numpy + the embedder only): `Router.load(dir).route(prompt) -> model name`, `.route_batch(prompts)`,
`.score(prompts)`, `.models`, `.threshold`. Training (`run(ctx)`, the pipeline stage) imports sklearn / torch
lazily inside `toolkit.route.stage`.
"""

from toolkit.route.runtime import Router

__all__ = ["Router", "run"]


# Recipe keys besides `route` its outputs depend on; a change re-runs it (toolkit/pipeline.py). A stage
# name = that stage's outputs are consumed.
# Here: labels from collect + distill outputs, seed (splits, fit), pricing (relative model costs).
READS = ("collect", "distill", "seed", "pricing")


def run(ctx):
    from toolkit.route.stage import run as _run

    return _run(ctx)
