"""The hf engine: transformers on this machine (CPU/GPU). Batched, left-padded generate(); greedy or seeded
sampling; top-k log-probs from the raw logits; per-token NLL from batched forward passes. A LoRA adapter dir
is applied with peft on top of its base (unmerged).

Timing: a token's timestamp is taken when generate() hands it to a streamer, so TTFT includes prefill and the
first decode step, as a client sees it. In a batch each answer's latency is the batch's wall time / its size.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from pydantic import Field

from toolkit.engines.base import OnResult, Settings, Timed, timed_from_stamps
from toolkit.engines.render import Renderer, cut_stop
from toolkit.settings import Section

IGNORE = -100
MIN_SHARED_PREFIX = 16  # tokens: below this, the extra forward call for the prefix saves little


# ------------------------------------------------------------------------------------------- batches


def shared_prefix_len(seqs: list[list[int]], limit: int) -> int:
    """How many leading tokens every sequence shares, at most `limit`; 0 below MIN_SHARED_PREFIX (or for one
    sequence), where a separate forward call for them would save little."""
    n = min(len(os.path.commonprefix(seqs)), limit) if len(seqs) > 1 else 0
    return n if n >= MIN_SHARED_PREFIX else 0


def layout(rows: list[list[int]], shared: int, fill: int):
    """[n, width] tensor: each row's first `shared` values at the left, the rest right-aligned after `fill`.
    With shared = 0 that is plain left padding. Right alignment keeps every row's last token at the edge (a
    completion's logits, generation's next token); the shared part lines up with one computed copy of it."""
    import torch

    width = shared + max(len(r) - shared for r in rows)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :shared] = torch.tensor(r[:shared], dtype=torch.long)
        if len(r) > shared:
            out[i, width - (len(r) - shared):] = torch.tensor(r[shared:], dtype=torch.long)
    return out


def encode_after_prefix(ids: list[list[int]], shared: int, pad_id: int, device) -> dict:
    """input_ids / attention_mask for generating from a batch whose first `shared` tokens are common. Positions
    come from the mask's cumulative sum (generate does that), so the padding in the middle does not move them."""
    return {"input_ids": layout(ids, shared, pad_id).to(device),
            "attention_mask": layout([[1] * len(r) for r in ids], shared, 0).to(device)}


def collate(examples: list[dict], pad_id: int, share_prefix: bool = True) -> dict:
    """Pads examples {input_ids, labels, prompt_len} so every completion ends at the right edge; adds position
    ids, `logits_to_keep` (the window that predicts completion tokens: the LM head runs only there) and
    `shared_prefix`: the prompt tokens every example starts with (a system prompt, the template's head), laid out
    once at the left for `forward` to compute once (0 = plain left padding)."""
    seqs = [ex["input_ids"] for ex in examples]
    # the prefix stays inside every prompt, one token short: the logit that predicts a completion's first token
    # must come from the per-row part
    shared = shared_prefix_len(seqs, min(ex["prompt_len"] for ex in examples) - 1) if share_prefix else 0
    attention = layout([[1] * len(x) for x in seqs], shared, 0)
    completion = max(len(ex["input_ids"]) - ex["prompt_len"] for ex in examples)
    return {"input_ids": layout(seqs, shared, pad_id),
            "labels": layout([ex["labels"] for ex in examples], shared, IGNORE),
            "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
            "logits_to_keep": min(attention.shape[1], completion + 1), "shared_prefix": shared}


def forward(model, batch: dict, keep: int):
    """The model's output on a collated batch, logits for the last `keep` positions only. A shared prefix goes
    through the model once at batch 1 and its KV cache is repeated for every row (in training the gradients of
    all rows flow back into that one pass); the rows' own tokens attend to it through the cache."""
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    p = int(batch.get("shared_prefix") or 0)
    window = sliding_window(model) if p else None
    if window and ids.shape[1] > window:  # the padding in the middle would count inside the window
        ids, mask, pos, p = (*left_padded(ids, mask), 0)
    cache = prefix_kv(model, ids[:1, :p], ids.shape[0], pos[:1, :p]) if p else None
    if cache is not None:
        return model(input_ids=ids[:, p:], attention_mask=mask, position_ids=pos[:, p:], past_key_values=cache,
                     logits_to_keep=keep, use_cache=True)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)


def prefix_kv(model, prefix_ids, rows: int, position_ids=None):
    """The KV cache of a [1, p] prefix, computed once and repeated `rows` times along the batch; None when the
    model keeps another kind of cache (static, quantized, recurrent) or none (gradient checkpointing turns it off)."""
    from transformers import DynamicCache

    first = model(input_ids=prefix_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = getattr(first, "past_key_values", None)
    if type(cache) is not DynamicCache:
        return None
    cache.batch_repeat_interleave(rows)
    return cache


def sliding_window(model) -> Optional[int]:
    """The attention window of a model that has one in use (Mistral, Gemma's local layers), else None. A wrapper
    without a config (DDP) has none here: several processes never share a prefix (distill.train.shares_prefix)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None


def left_padded(ids, mask):
    """(input_ids, attention_mask, position_ids) of a shared-prefix layout moved to plain left padding: a stable
    sort on the mask puts each row's padding first and keeps its tokens in order, so the right edge (completions,
    the kept logits) stays where it was."""
    import torch

    order = torch.argsort(mask, dim=1, stable=True)
    mask = mask.gather(1, order)
    return ids.gather(1, order), mask, (mask.cumsum(-1) - 1).clamp(min=0)


def batch_nll(model, batch: dict):
    """(nll [B, K-1], mask [B, K-1]) of the labelled tokens of a collated batch, K = logits_to_keep."""
    import torch

    keep = batch["logits_to_keep"]
    logits = forward(model, batch, keep).logits[:, :-1].float()
    labels = batch["labels"][:, -keep + 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0),
                                            reduction="none").view(labels.shape)
    return nll, labels != IGNORE


def completion_nll(model, batches: list[dict]) -> float:
    """Mean per-token NLL of the labelled (completion) tokens over collated batches."""
    import torch

    from toolkit.errors import OptkitError

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            nll, mask = batch_nll(model, batch)
            total += float(nll[mask].sum())
            count += int(mask.sum())
    if count == 0:
        raise OptkitError("no completion tokens to score (all answers empty?)")
    return total / count


# ------------------------------------------------------------------------------------------- the engine


class HFSettings(Section):
    """collect.hf: the hf engine as the teacher (one field of the collect section)."""

    batch_size: int = Field(8, ge=1, description="Prompts per generate() call (left-padded; prompts are "
                            "sorted by length first so a batch pads little).")
    device: str = Field("auto", description="torch device: auto = cuda when available, else cpu.")
    share_prefix: bool = Field(True, description="Compute the tokens every prompt of a batch starts with (system "
                               "prompt, template head) once and reuse their KV cache for the batch, as vLLM's "
                               "prefix caching does; same answers in float32.")


class HFEngine:
    settings_class = HFSettings  # collect.hf (toolkit.config.collect adds one field per engine)
    name = "transformers"
    batches = True
    batch_size = 8  # prompts per generate() call when the caller does not say
    share_prefix = True  # compute a batch's common leading tokens once (see _shared_prefix)

    def __init__(self, model, tok, *, chat_template: bool = True, ref: str = "the model"):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        self.model, self.tok, self.ref = model, tok, ref
        self.renderer = Renderer(tok, chat_template, f"'{ref}'")
        self.eos = self.renderer.eos_ids(getattr(model, "generation_config", None))

    @classmethod
    def load(cls, ref, *, chat_template: bool = True, adapter_dir: Optional[Path] = None, dtype: str = "auto",
             device: str = "auto", revision: Optional[str] = None, trust_remote_code: bool = False) -> "HFEngine":
        import torch

        from toolkit.models import load_causal_lm

        model, tok = load_causal_lm(str(ref), revision, trust_remote_code, dtype)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        return cls(model, tok, chat_template=chat_template, ref=str(ref))

    @classmethod
    def for_teacher(cls, recipe) -> "HFEngine":
        t = recipe.teacher
        engine = cls.load(t.model, chat_template=recipe.data.chat_template, dtype=t.dtype, revision=t.revision,
                          device=recipe.collect.hf.device, trust_remote_code=t.trust_remote_code)
        engine.batch_size = recipe.collect.hf.batch_size
        engine.share_prefix = recipe.collect.hf.share_prefix
        return engine

    @staticmethod
    def teacher_identity(recipe) -> dict:
        from toolkit.models import model_revision, torch_dtype

        t = recipe.teacher
        # The dtype changes greedy answers (bf16 vs fp32 rounding), so it is part of the identity.
        return {"backend": "hf", "model": t.model, "revision": model_revision(t.model, t.revision),
                "dtype": str(torch_dtype(t.dtype)).removeprefix("torch.")}

    @property
    def device(self):
        return self.model.device

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.renderer.prompt(messages).ids

    def context_length(self) -> Optional[int]:
        n = getattr(self.model.config, "max_position_embeddings", None)
        if n is None and 0 < (self.tok.model_max_length or 0) < 10**7:
            n = self.tok.model_max_length
        return n

    # --------------------------------------------------------------------------------- generation

    def _kwargs(self, s: Settings) -> dict:
        kw = {"max_new_tokens": s.max_new_tokens, "do_sample": s.temperature > 0, "pad_token_id": self.tok.pad_token_id,
              "return_dict_in_generate": True, "output_logits": s.top_logprobs > 0}
        if s.temperature > 0:
            kw.update(temperature=s.temperature, top_p=s.top_p, top_k=None)
        else:  # the model's generation_config may carry sampling defaults; greedy must ignore them
            kw.update(temperature=None, top_p=None, top_k=None)
        if s.stop:
            kw.update(stop_strings=list(s.stop), tokenizer=self.tok)
        return kw

    def _encode(self, ids_list: list[list[int]]):
        return self.tok.pad({"input_ids": ids_list}, return_tensors="pt", padding=True).to(self.device)

    def answer(self, ids: list[int], s: Settings) -> dict:
        """Tokens the answer used (its end-of-turn token counts: it was generated), text cut at a stop string."""
        end = next((j for j, t in enumerate(ids) if t in self.eos), None)
        n, finish = (end + 1, "stop") if end is not None else (len(ids), "length")
        text, cut = cut_stop(self.tok.decode(ids[:n], skip_special_tokens=True), s.stop)
        return {"output": text, "finish_reason": "stop" if cut else finish, "output_tokens": n}

    def run_batch(self, prompts: list[list[dict]], s: Settings) -> tuple[list[dict], float]:
        import torch

        ids = [self.prompt_ids(m) for m in prompts]
        shared = self._shared_prefix(ids, s.max_new_tokens)
        started = time.perf_counter()
        with torch.inference_mode():
            cache = self.prefix_cache(ids[0][:shared], len(ids)) if shared else None
            if cache is not None:
                enc = encode_after_prefix(ids, shared, self.tok.pad_token_id, self.device)
                out = self.model.generate(**enc, past_key_values=cache, **self._kwargs(s))
            else:
                enc = self._encode(ids)
                out = self.model.generate(**enc, **self._kwargs(s))
        seconds = time.perf_counter() - started
        topk = self._topk(out.logits, s.top_logprobs) if s.top_logprobs else None
        rows = []
        for r, ids in enumerate(out.sequences[:, enc["input_ids"].shape[1]:].tolist()):
            row = {**self.answer(ids, s), "input_tokens": int(enc["attention_mask"][r].sum()),
                   "latency_s": round(seconds / len(prompts), 6)}
            if topk is not None:
                n = row["output_tokens"]
                row["topk"] = {"ids": topk[0][:n, r].tolist(), "logprobs": topk[1][:n, r].tolist()}
            rows.append(row)
        return rows, seconds

    # --------------------------------------------------------------------------------- shared prefix

    def _shared_prefix(self, ids: list[list[int]], new_tokens: int) -> int:
        """How many leading tokens the batch computes once (0: none). Prompts rendered from one template share
        its start (a system prompt, the chat header, the template's first words); vLLM's prefix caching skips
        that work and so does this: the prefix's KV cache is computed at batch 1 and repeated for every row
        (speed and answers vs. without: `eval/bench_collect.py --engines hf,hf@plain`). Only where the layout
        is exact: a DynamicCache (not a static, quantized or recurrent cache), no sliding window the padding
        in the middle could shift."""
        if not self.share_prefix:
            return 0
        n = shared_prefix_len(ids, min(map(len, ids)) - 1)  # each row keeps >= 1 token to start generating from
        if not n:
            return 0
        gen = getattr(self.model, "generation_config", None)
        window = sliding_window(self.model)
        if window and max(map(len, ids)) + new_tokens > window:  # the padding counts inside a window
            return 0
        if gen is not None and getattr(gen, "cache_implementation", None):
            return 0
        return n

    def prefix_cache(self, prefix: list[int], rows: int):
        """The KV cache of `prefix`, computed once and repeated `rows` times along the batch; None (and no more
        sharing on this engine) when the model keeps another kind of cache."""
        import torch

        cache = prefix_kv(self.model, torch.tensor([prefix], device=self.device), rows)
        if cache is None:
            self.share_prefix = False
        return cache

    @staticmethod
    def _topk(logits: tuple, k: int):
        """(ids [T, B, k], logprobs [T, B, k]) from the raw per-step logits."""
        import torch

        steps = [torch.log_softmax(step.float(), dim=-1).topk(k, dim=-1) for step in logits]
        return (torch.stack([s.indices.to(torch.int32) for s in steps]), torch.stack([s.values for s in steps]))

    def generate(self, prompts: list[list[dict]], s: Settings, batch_size: Optional[int] = None,
                 on_result: Optional[OnResult] = None) -> list[Optional[dict]]:
        """Answers in input order; prompts are sorted by length first so a batch pads little."""
        import torch

        batch_size = batch_size or self.batch_size
        lengths = [len(self.prompt_ids(m)) for m in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        if s.temperature > 0:
            torch.manual_seed(s.seed)
        results: list[Optional[dict]] = [None] * len(prompts)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            rows, _ = self.run_batch([prompts[j] for j in idx], s)
            for j, row in zip(idx, rows):
                results[j] = row
                if on_result:
                    on_result(j, row)
        return results

    def timed(self, messages: list[dict], s: Settings) -> Timed:
        import torch
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Clock(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate() hands the prompt to the streamer first
                    self.first = False
                    return
                stamps.append(time.perf_counter())

            def end(self):
                pass

        started = time.perf_counter()
        enc = self._encode([self.prompt_ids(messages)])
        with torch.inference_mode():
            out = self.model.generate(**enc, **{**self._kwargs(s), "output_logits": False}, streamer=Clock())
        ended = time.perf_counter()
        answer = self.answer(out.sequences[0, enc["input_ids"].shape[1]:].tolist(), s)
        return timed_from_stamps(started, stamps, answer["output_tokens"], ended, output=answer["output"])

    # --------------------------------------------------------------------------------- scoring

    def token_nll(self, sequences: list[tuple[list[int], int]], batch_size: int = 8) -> list[list[float]]:
        """NLL of every token of each sequence from its start index on (start >= 1), batched."""
        import torch

        out: list[list[float]] = [[] for _ in sequences]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
        self.model.eval()
        with torch.inference_mode():
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                examples = []
                for j in idx:
                    ids, start = sequences[j]
                    start = max(start, 1)
                    examples.append({"input_ids": ids, "labels": [IGNORE] * start + ids[start:], "prompt_len": start})
                nll, mask = batch_nll(self.model, collate(examples, self.tok.pad_token_id))
                for row, j in enumerate(idx):
                    out[j] = nll[row][mask[row]].tolist()
        return out

    def memory_bytes(self) -> int:
        return int(sum(p.numel() * p.element_size() for p in self.model.parameters()) +
                   sum(b.numel() * b.element_size() for b in self.model.buffers()))

    def close(self) -> None:
        self.model = None
