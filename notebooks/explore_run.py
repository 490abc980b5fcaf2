# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exploring a finished optkit run
#
# Reads a run directory (`artifacts/<name>/`) and shows: the variants table and its Pareto frontier, the
# router's threshold trade-off, the semantic cache's hit rate / false-hit curve on the run's own prompts, and
# the prompts where the student fails. Open it with Jupyter (`pip install jupytext` pairs this `.py` file with a
# notebook) or run it as a script. Set `OPTKIT_RUN` to the run directory (default `artifacts/quickstart`).
# The tests execute it against a small run, so it cannot rot.

# %%
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

RUN = Path(os.environ.get("OPTKIT_RUN", "artifacts/quickstart"))
FIGS = Path(os.environ.get("OPTKIT_FIGS", RUN / "notebook"))
FIGS.mkdir(parents=True, exist_ok=True)
print("run:", RUN.resolve())


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# %% [markdown]
# ## Variants and the Pareto frontier (quality vs cost)

# %%
variants = pd.DataFrame(json.loads((RUN / "evaluate" / "variants.json").read_text()))
cols = ["variant", "engine", "quality", "agreement", "e2e_p50_s", "tokens_per_s_b1", "cost_per_1m_requests", "pareto"]
print(variants[[c for c in cols if c in variants]].to_string(index=False))

priced = variants.dropna(subset=["quality", "cost_per_1m_requests"])
front = priced[priced["pareto"]].sort_values("cost_per_1m_requests")
fig, ax = plt.subplots(figsize=(6, 4))
ax.scatter(priced["cost_per_1m_requests"], priced["quality"])
for _, r in priced.iterrows():
    ax.annotate(r["variant"], (r["cost_per_1m_requests"], r["quality"]), fontsize=8)
ax.step(front["cost_per_1m_requests"], front["quality"], where="post", color="tab:red", label="Pareto frontier")
ax.set_xlabel("$ per 1M requests")
ax.set_ylabel("quality")
ax.legend()
fig.savefig(FIGS / "pareto.png", dpi=90)
print("Pareto set:", list(front["variant"]))

# %% [markdown]
# ## Router: threshold trade-off
#
# Scores of the held-out prompts under the trained router: the fraction sent to the strong model at each
# threshold, and the quality the system would reach by mixing the two models' actual answers.

# %%
records = {r["id"]: r for r in read_jsonl(RUN / "collect" / "outputs.jsonl")}
outputs_dir = RUN / "evaluate" / "outputs"
if (RUN / "route" / "router.json").is_file() and (outputs_dir / "teacher.jsonl").is_file():
    from toolkit.route import Router

    router = Router.load(RUN / "route")
    import yaml

    recipe = yaml.safe_load((RUN / "recipe.yaml").read_text()) if (RUN / "recipe.yaml").is_file() else {}
    student_name = ((recipe.get("evaluate") or {}).get("system") or {}).get("student", "student")
    teacher_rows = {r["id"]: r for r in read_jsonl(outputs_dir / "teacher.jsonl")}
    student_rows = {r["id"]: r for r in read_jsonl(outputs_dir / f"{student_name}.jsonl")}
    ids = [i for i in teacher_rows if i in student_rows]
    prompts = [records[i]["prompt"] for i in ids]
    if len(router.models) == 2:
        score = router.score(prompts)
        ts = np.unique(np.concatenate([score, [score.max() + 1e-6]]))
        strong_frac, quality = [], []
        for t in ts:
            strong = score >= t
            strong_frac.append(strong.mean())
            quality.append(np.mean([(teacher_rows if s else student_rows)[i]["score"] or 0 for i, s in zip(ids, strong)]))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(strong_frac, quality, marker=".")
        ax.axvline(np.mean(score >= router.threshold), color="tab:red", ls="--", label=f"threshold {router.threshold:.3g}")
        ax.set_xlabel("fraction sent to the strong model")
        ax.set_ylabel("system quality (held-out)")
        ax.legend()
        fig.savefig(FIGS / "router_tradeoff.png", dpi=90)
        print(f"{len(ids)} prompts; at the calibrated threshold {np.mean(score >= router.threshold):.0%} go to "
              f"{router.strong}")
else:
    print("no router or no evaluated teacher answers in this run")

# %% [markdown]
# ## Semantic cache: hit rate and false hits vs threshold
#
# Each held-out prompt is matched with its most similar earlier (val) prompt; a hit at threshold t is a pair with
# similarity >= t, a false hit one whose gold answers differ. The tuned threshold is marked.

# %%
if (RUN / "cache" / "cache.json").is_file():
    from toolkit.cache import SemanticCache
    from toolkit.cache.runtime import embed_texts

    cache = SemanticCache.load(RUN / "cache" / "cache.json")
    warm = [r for r in records.values() if r["split"] == "val"]
    held = [r for r in records.values() if r["split"] == "test"]
    sims = embed_texts(cache.embedder, [r["prompt"] for r in held]) @ embed_texts(cache.embedder, [r["prompt"] for r in warm]).T
    best = sims.argmax(1)
    sim = sims.max(1)
    same = np.array([held[i]["reference"] == warm[j]["reference"] for i, j in enumerate(best)])
    grid = np.linspace(0.5, 1.0, 51)
    hit = [(sim >= t).mean() for t in grid]
    fhr = [(~same[sim >= t]).mean() if (sim >= t).any() else np.nan for t in grid]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, hit, label="hit rate")
    ax.plot(grid, fhr, label="false-hit rate among hits")
    if cache.threshold is not None:
        ax.axvline(cache.threshold, color="tab:red", ls="--", label=f"tuned threshold {cache.threshold:.3g}")
    ax.set_xlabel("cosine similarity threshold")
    ax.legend()
    fig.savefig(FIGS / "cache_curve.png", dpi=90)
    print(f"{len(held)} held-out prompts vs {len(warm)} cached; hit rate at the tuned threshold: "
          f"{(sim >= (cache.threshold or 1.1)).mean():.0%}")
else:
    print("no cache stage in this run")

# %% [markdown]
# ## Where the student fails
#
# Held-out prompts the student gets wrong while the teacher gets them right, and the student's most common
# wrong answers.

# %%
if (outputs_dir / "student.jsonl").is_file():
    s = pd.DataFrame(read_jsonl(outputs_dir / "student.jsonl")).set_index("id")
    t = pd.DataFrame(read_jsonl(outputs_dir / "teacher.jsonl")).set_index("id")
    joined = s.join(t[["output", "score"]], rsuffix="_teacher")
    joined["prompt"] = [records[i]["prompt"] for i in joined.index]
    fails = joined[(joined["score"] == 0) & (joined["score_teacher"] == 1)]
    print(f"student wrong where the teacher is right: {len(fails)} of {len(joined)}")
    print(fails[["prompt", "reference", "output", "output_teacher"]].head(10).to_string())
    print(joined[joined["score"] == 0]["output"].str.strip().str[:40].value_counts().head(5).to_string())
