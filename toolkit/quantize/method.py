"""The one interface every quantization method implements (int8, gptq, awq and gguf alike).

A method is a module holding its settings class (a `QuantMethodConfig`, pydantic only) and
`run(cfg, job) -> list[Artifact]`, registered together in `toolkit.quantize.registry.METHODS`. `run` writes
everything into `job.out`, which becomes `quantize/<method>/` whole when it returns; the stage then verifies
each returned artifact with the engine that serves its format. This module must stay importable without
torch: the recipe schema (`toolkit.config`) is built from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from toolkit.config.base import Section

# The formats the stage knows how to verify (the engine that serves each reloads the artifact).
FORMATS = ("compressed-tensors", "gguf")


class QuantMethodConfig(Section):
    """Base of every method's settings; its docstring is the recipe reference's description of the method."""

    enabled: bool = Field(True, description="Produce this artifact.")


@dataclass
class Job:
    """What a method gets from the stage."""

    src: Path  # the unquantized model directory
    out: Path  # where the method writes; becomes quantize/<method>/ whole on success
    work: Path  # resumable intermediates, kept across runs (keyed by the source weights and the settings)
    children: Path  # where child processes are recorded (toolkit.procs) so the next run can reap them
    texts: list[str] = field(default_factory=list)  # calibration texts (train split)
    max_length: int = 256  # tokens per calibration sequence
    threads: int = 1
    unquantized_dtype: str = "auto"  # what compressed-tensors artifacts keep unquantized (toolkit.quantize.dtype)
    chat_template: bool = True  # the recipe's data.chat_template: prompts were rendered with it (or as raw text)


@dataclass
class Artifact:
    """One verified entry of summary.json. A method may produce several (gguf: one per type)."""

    name: str  # summary key: "gptq", "gguf-Q4_K_M"
    format: str  # one of FORMATS: picks the engine that verifies it
    file: str = ""  # inside the method's directory; "" = the directory itself
    facts: dict = field(default_factory=dict)  # method-specific facts copied into the summary entry

    def __post_init__(self):
        if self.format not in FORMATS:  # a programming error in a method, not a user error
            raise ValueError(f"artifact {self.name}: format {self.format!r} is not one of {FORMATS}")
