"""What every engine shares: decoding settings, a timed request, the result dict, the interface.

A result (one per prompt) is a dict: output, finish_reason ("stop" | "length" | ...), input_tokens,
output_tokens, latency_s, and optionally topk = {"ids": [[int] * k] * T, "logprobs": [[float] * k] * T}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

OnResult = Callable[[int, dict], None]  # (index of the prompt in the list given, its result)


@dataclass(frozen=True)
class Settings:
    """Decoding settings: greedy unless temperature > 0 (then seeded)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple = ()
    seed: int = 0
    top_logprobs: int = 0

    @classmethod
    def of(cls, gen=None, seed: int = 0, top_logprobs: int = 0, **override) -> "Settings":
        """From a recipe's GenerationConfig (collect.generation); None = the defaults."""
        kw = {} if gen is None else {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
                                     "top_p": gen.top_p, "stop": tuple(gen.stop)}
        return cls(**{**kw, "seed": seed, "top_logprobs": top_logprobs, **override})


@dataclass
class Timed:
    ttft_s: float
    e2e_s: float
    output_tokens: int
    itl_s: list = field(default_factory=list)  # gaps between consecutive tokens after the first
    output: Optional[str] = None  # the answer, where the engine has it (evaluate's batch-movement check reads it)


def timed_from_stamps(started: float, stamps: list[float], n: int, now: float,
                      output: Optional[str] = None) -> Timed:
    """A request's timing from the times its tokens were handed out."""
    stamps = stamps[:n] if n else stamps
    end = stamps[-1] if stamps else now
    return Timed(ttft_s=(stamps[0] if stamps else end) - started, e2e_s=end - started, output_tokens=n,
                 itl_s=[b - a for a, b in zip(stamps, stamps[1:])], output=output)


class Engine(Protocol):
    name: str
    batches: bool  # run_batch decodes a batch together (throughput above batch 1 is meaningful)

    def identity(self) -> dict: ...
    def prompt_ids(self, messages: list[dict]) -> Optional[list[int]]: ...
    def context_length(self) -> Optional[int]: ...
    def generate(self, prompts: list[list[dict]], settings: Settings, batch_size: int = 8,
                 on_result: Optional[OnResult] = None) -> list[Optional[dict]]: ...
    def run_batch(self, prompts: list[list[dict]], settings: Settings) -> tuple[list[dict], float]: ...
    def timed(self, messages: list[dict], settings: Settings) -> Timed: ...
    def token_nll(self, sequences: list[tuple[list[int], int]]) -> Optional[list[list[float]]]: ...
    def memory_bytes(self) -> Optional[int]: ...
    def close(self) -> None: ...
