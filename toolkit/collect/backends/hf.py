"""The hf backend: transformers generate() on the local machine, batched and left-padded.

Prompts are sorted by token length before batching so a batch carries little padding; each batch's answers
go to the sink as soon as the batch finishes (the store persists them). Latency per record is the batch's
wall time divided by its size (what one answer cost on this machine at this batch size).
"""

from __future__ import annotations

import time
from typing import Optional

from toolkit.collect.backends import Request, Sink
from toolkit.collect.prompts import render_plain
from toolkit.config import Recipe
from toolkit.errors import OptkitError


class HFBackend:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cfg = recipe.collect
        self.model = self.tok = None  # loaded on first use: a fully cached rerun never loads the model

    def identity(self) -> dict:
        from toolkit.models import model_revision, torch_dtype

        t = self.recipe.teacher
        # The dtype changes greedy answers (bf16 vs fp32 rounding), so it is part of the identity.
        return {"backend": "hf", "model": t.model, "revision": model_revision(t.model, t.revision),
                "dtype": str(torch_dtype(t.dtype)).removeprefix("torch.")}

    def load(self) -> None:
        if self.model is not None:
            return
        import torch

        from toolkit.models import load_causal_lm

        t = self.recipe.teacher
        self.model, self.tok = load_causal_lm(t.model, t.revision, t.trust_remote_code, t.dtype)
        self.tok.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        device = self.cfg.hf.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(device)
        if self.recipe.data.chat_template and not self.tok.chat_template:
            raise OptkitError(f"data.chat_template is true but the tokenizer of '{t.model}' has no chat template; "
                              "set data.chat_template: false")

    def render(self, messages: list[dict]) -> str:
        if self.recipe.data.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_plain(messages)

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        return {e for e in eos if e is not None} | ({self.tok.eos_token_id} - {None})

    def generate(self, requests: list[Request], sink: Sink) -> None:
        import torch

        self.load()
        texts = {r.key: self.render(r.messages) for r in requests}
        lengths = {k: len(self.tok(v, add_special_tokens=False)["input_ids"]) for k, v in texts.items()}
        ordered = sorted(requests, key=lambda r: lengths[r.key])
        if self.cfg.generation.temperature > 0:
            torch.manual_seed(self.recipe.seed)
        bs = self.cfg.hf.batch_size
        for i in range(0, len(ordered), bs):
            batch = ordered[i:i + bs]
            for request, result in zip(batch, self.generate_batch([texts[r.key] for r in batch])):
                sink.done(request, result)

    def generate_kwargs(self) -> dict:
        g = self.cfg.generation
        kw = {"max_new_tokens": g.max_new_tokens, "do_sample": g.temperature > 0,
              "pad_token_id": self.tok.pad_token_id, "return_dict_in_generate": True,
              "output_logits": self.cfg.top_logprobs > 0}
        if g.temperature > 0:
            kw.update(temperature=g.temperature, top_p=g.top_p, top_k=None)
        else:  # the model's generation_config may carry sampling defaults; greedy must ignore them
            kw.update(temperature=None, top_p=None, top_k=None)
        if g.stop:
            kw.update(stop_strings=list(g.stop), tokenizer=self.tok)
        return kw

    def generate_batch(self, texts: list[str]) -> list[dict]:
        import torch

        enc = self.tok(texts, return_tensors="pt", padding=True,
                       add_special_tokens=not self.recipe.data.chat_template).to(self.model.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, **self.generate_kwargs())
        share = (time.perf_counter() - started) / len(texts)
        new = out.sequences[:, enc["input_ids"].shape[1]:].tolist()
        topk = self.topk(out.logits) if self.cfg.top_logprobs > 0 else None
        results = []
        for row, ids in enumerate(new):
            n, finish = self.answer_length(ids)
            text, finish = self.cut_stop(self.tok.decode(ids[:n], skip_special_tokens=True), finish)
            result = {"output": text, "finish_reason": finish, "input_tokens": int(enc["attention_mask"][row].sum()),
                      "output_tokens": n, "latency_s": round(share, 6)}
            if topk is not None:
                result["topk"] = {"ids": topk[0][:n, row].tolist(), "logprobs": topk[1][:n, row].tolist()}
            results.append(result)
        return results

    def answer_length(self, ids: list[int]) -> tuple[int, str]:
        """Tokens the answer used, counting its end-of-turn token (it was generated; KD learns to stop)."""
        eos = self.eos_ids()
        for j, t in enumerate(ids):
            if t in eos:
                return j + 1, "stop"
        return len(ids), "length"

    def cut_stop(self, text: str, finish: str) -> tuple[str, str]:
        """OpenAI semantics: the answer ends before the first stop string, which is not included."""
        cuts = [text.find(s) for s in self.cfg.generation.stop if s and s in text]
        return (text[:min(cuts)], "stop") if cuts else (text, finish)

    def topk(self, logits: tuple) -> Optional[tuple]:
        """(ids [T, B, k], logprobs [T, B, k]) from the raw per-step logits."""
        import torch

        k = self.cfg.top_logprobs
        ids, lps = [], []
        for step in logits:  # one [B, vocab] tensor per generated position
            values, indices = torch.log_softmax(step.float(), dim=-1).topk(k, dim=-1)
            ids.append(indices.to(torch.int32))
            lps.append(values)
        return torch.stack(ids), torch.stack(lps)

    def close(self) -> None:
        self.model = self.tok = None
