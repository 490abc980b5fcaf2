"""The one way a conversation becomes model input, for every stage: collect's teacher, the student's training
examples, quantization's calibration and verification, and every variant evaluate runs.

Rule: the prompt text carries all its special tokens literally and is encoded with add_special_tokens=False.
- chat template on: the tokenizer's template with the generation prompt (the template writes its own BOS);
- chat template off: the messages' contents joined by a blank line, after the tokenizer's BOS when the
  tokenizer adds one to plain text (as the model saw text in pre-training).
So `Rendered.ids == tok(Rendered.text, add_special_tokens=False)`: text (vLLM, calibration, llama.cpp) and
ids (transformers) give the model the same tokens. An answer is its own tokens, then the end-of-turn token
unless the answer was cut at max_new_tokens (it did not end there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from toolkit.errors import OptkitError


@dataclass(frozen=True)
class Rendered:
    text: str
    ids: list[int]


def render_plain(messages: list[dict]) -> str:
    """Messages as plain text (models without a chat template, and the OpenAI /completions API)."""
    return "\n\n".join(m["content"] for m in messages)


def cut_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """OpenAI semantics: the answer ends before the first stop string, which is not included."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def end_of_turn_id(tok) -> Optional[int]:
    eos = tok.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


class Renderer:
    """Prompts and answers as text and token ids under one tokenizer and one chat-template setting."""

    def __init__(self, tok, chat_template: bool, model: str = "the model"):
        if chat_template and not getattr(tok, "chat_template", None):
            raise OptkitError(f"data.chat_template is true but the tokenizer of {model} has no chat template; "
                              "set data.chat_template: false")
        self.tok = tok
        self.chat_template = chat_template
        self.bos = self._plain_bos(tok)

    @staticmethod
    def _plain_bos(tok) -> str:
        """The BOS text the tokenizer puts before plain text ("" for tokenizers that add none)."""
        bos_id = getattr(tok, "bos_token_id", None)
        if bos_id is None or not tok.bos_token:
            return ""
        added = tok("x", add_special_tokens=True)["input_ids"]
        return tok.bos_token if added and added[0] == bos_id else ""

    def text(self, messages: list[dict]) -> str:
        if self.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.bos + render_plain(messages)

    def encode_text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt(self, messages: list[dict]) -> Rendered:
        text = self.text(messages)
        return Rendered(text, self.encode_text(text))

    def answer_ids(self, output: str, finish_reason: Optional[str] = "stop") -> list[int]:
        """The answer's tokens, and its end-of-turn token when it ended on its own (KD learns to stop)."""
        ids = self.encode_text(output or "")
        eot = end_of_turn_id(self.tok)
        if finish_reason != "length" and eot is not None:
            ids.append(eot)
        return ids

    def answer_text(self, output: str, finish_reason: Optional[str] = "stop") -> str:
        eot = self.tok.eos_token if finish_reason != "length" else ""
        return (output or "") + (eot or "")

    def eos_ids(self, generation_config=None) -> set[int]:
        """Every token that ends a turn: the tokenizer's and the model's generation config's."""
        eos = getattr(generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        return {e for e in eos if e is not None} | ({end_of_turn_id(self.tok)} - {None})
