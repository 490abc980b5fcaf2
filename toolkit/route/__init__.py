"""route: a complexity router that knows when the cheaper model is good enough.

Runtime (numpy + the embedder only): `Router.load(dir).route(prompt) -> model name`, `.route_batch(prompts)`,
`.score(prompts)`, `.models`, `.threshold`. Training (`run(ctx)`, the pipeline stage) imports sklearn / torch
lazily inside `toolkit.route.stage`. Router models: toolkit.route.routers (one module + one registry line each).

Importing this package imports nothing heavy (toolkit.config reads toolkit.route.routers' names); `Router` loads
toolkit.route.runtime (numpy) on first access.
"""

__all__ = ["Router", "run"]


# Recipe keys besides `route` its outputs depend on; a change re-runs it (toolkit/pipeline.py). A stage
# name = that stage's outputs are consumed.
# Here: labels from collect + distill outputs, seed (splits, fit), pricing (relative model costs); with
# route.label_prompts on, also the data file and its settings (extra prompts) and the teacher (it answers them).
READS = ("teacher", "data", "collect", "distill", "seed", "pricing")


def reads(recipe) -> tuple[str, ...]:
    """READS for this recipe: the data file and the teacher only when route.label_prompts has them answer extra
    prompts (labels from a file, or from collect + distill outputs alone, do not change with them)."""
    if recipe.route.label_prompts.rows != "none":
        return READS
    return tuple(k for k in READS if k not in ("teacher", "data"))


def __getattr__(name: str):
    if name == "Router":
        from toolkit.route.runtime import Router

        return Router
    raise AttributeError(f"module 'toolkit.route' has no attribute {name!r}")


def run(ctx):
    from toolkit.route.stage import run as _run

    return _run(ctx)
