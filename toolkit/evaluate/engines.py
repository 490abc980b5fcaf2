"""How evaluate runs a variant: an engine of toolkit.engines with the evaluation's decoding settings (greedy,
the teacher's stop strings, max_new_tokens), behind the small interface measure.py uses:

    generate(messages_list, batch_size)   greedy answers (batched where the engine batches)
    timed(messages)                       one request at batch 1 with per-token timestamps
    run_batch(messages_list)              one batch, wall time and generated tokens (throughput)
    perplexity(pairs)                     teacher-forced perplexity of given answers (None when unsupported)
    memory_bytes()                        weights in memory

Rendering, generation, stop strings and NLL are the engines' (the same for the teacher in collect and the
student in distill), so a variant sees exactly the token ids the teacher answered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from toolkit.engines.base import Settings, Timed  # noqa: F401  (Timed re-exported for measure and tests)
from toolkit.engines.score import answer_sequences, perplexity


class Runner:
    def __init__(self, engine, settings: Settings):
        self.engine, self.settings = engine, settings
        self.name, self.batches = engine.name, engine.batches

    @property
    def llm(self):  # the vLLM engine's LLM, for callers that inspect it
        return getattr(self.engine, "llm", None)

    def generate(self, messages_list: list[list[dict]], batch_size: int = 8) -> list[Optional[dict]]:
        return self.engine.generate(messages_list, self.settings, batch_size)

    def run_batch(self, batch: list[list[dict]]) -> tuple[list[dict], float]:
        return self.engine.run_batch(batch, self.settings)

    def timed(self, messages: list[dict]) -> Timed:
        return self.engine.timed(messages, self.settings)

    def perplexity(self, pairs: list[tuple[list[dict], str]]) -> Optional[float]:
        """exp(mean NLL) of the given answers' tokens (the end-of-turn token included), prompt tokens masked."""
        seqs = answer_sequences(self.engine.renderer, [(m, a, "stop") for m, a in pairs])
        return perplexity(self.engine.token_nll(seqs))

    def memory_bytes(self) -> Optional[int]:
        return self.engine.memory_bytes()

    def close(self) -> None:
        self.engine.close()


def _settings(max_new_tokens: int, stop, seed: int = 0) -> Settings:
    return Settings(max_new_tokens=max_new_tokens, stop=tuple(stop or ()), seed=seed)


def HFEngine(model_dir: Path, *, adapter_dir: Optional[Path] = None, chat_template: bool = True,
             max_new_tokens: int = 64, stop=(), dtype: str = "auto", trust_remote_code: bool = False) -> Runner:
    from toolkit.engines.hf import HFEngine as Engine

    engine = Engine.load(model_dir, chat_template=chat_template, adapter_dir=adapter_dir, dtype=dtype,
                         trust_remote_code=trust_remote_code)
    return Runner(engine, _settings(max_new_tokens, stop))


def LlamaCppEngine(gguf_path: Path, *, tokenizer_dir: Path, chat_template: bool = True, max_new_tokens: int = 64,
                   stop=(), n_ctx: int = 2048, seed: int = 0) -> Runner:
    from toolkit.engines.llamacpp import LlamaCppEngine as Engine

    engine = Engine.load(gguf_path, tokenizer_dir=tokenizer_dir, chat_template=chat_template, n_ctx=n_ctx, seed=seed)
    return Runner(engine, _settings(max_new_tokens, stop, seed))


def VLLMEngine(model_dir: Path, *, adapter_dir: Optional[Path] = None, chat_template: bool = True,
               max_new_tokens: int = 64, stop=(), dtype: str = "auto", trust_remote_code: bool = False, seed: int = 0,
               max_model_len: int = 2048, **llm_kwargs) -> Runner:
    """llm_kwargs: further vllm.LLM arguments (e.g. enforce_eager=True)."""
    from toolkit.engines.vllm import VLLMEngine as Engine

    engine = Engine.load(model_dir, chat_template=chat_template, adapter_dir=adapter_dir, dtype=dtype,
                         trust_remote_code=trust_remote_code, seed=seed, max_model_len=max_model_len, **llm_kwargs)
    return Runner(engine, _settings(max_new_tokens, stop, seed))
