"""The hf engine: transformers on this machine (CPU/GPU). Batched, left-padded generate(); greedy or seeded
sampling; top-k log-probs from the raw logits; per-token NLL from batched forward passes. A LoRA adapter dir
is applied with peft on top of its base (unmerged).

Timing: a token's timestamp is taken when generate() hands it to a streamer, so TTFT includes prefill and the
first decode step, as a client sees it. In a batch each answer's latency is the batch's wall time / its size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from pydantic import Field

from toolkit.engines.base import OnResult, Settings, Timed, timed_from_stamps
from toolkit.engines.render import Renderer, cut_stop
from toolkit.settings import Section

IGNORE = -100


# ------------------------------------------------------------------------------------------- batches


def collate(examples: list[dict], pad_id: int) -> dict:
    """Left-pads examples {input_ids, labels, prompt_len} so every completion ends at the right edge; adds
    position ids and `logits_to_keep` (the window that predicts completion tokens: the LM head runs only there)."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, ex in enumerate(examples):
        off = width - len(ex["input_ids"])
        input_ids[i, off:] = torch.tensor(ex["input_ids"])
        labels[i, off:] = torch.tensor(ex["labels"])
        attention[i, off:] = 1
    completion = max(len(ex["input_ids"]) - ex["prompt_len"] for ex in examples)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "logits_to_keep": min(width, completion + 1)}


def batch_nll(model, batch: dict):
    """(nll [B, K-1], mask [B, K-1]) of the labelled tokens of a collated batch, K = logits_to_keep."""
    import torch

    keep = batch["logits_to_keep"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, :-1].float()
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


class HFEngine:
    settings_class = HFSettings  # collect.hf (toolkit.config.collect adds one field per engine)
    name = "transformers"
    batches = True
    batch_size = 8  # prompts per generate() call when the caller does not say

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

        enc = self._encode([self.prompt_ids(m) for m in prompts])
        started = time.perf_counter()
        with torch.inference_mode():
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
