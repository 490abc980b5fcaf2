import pytest

from tests.distill.helpers import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_teacher(smollm2_dir, tmp_path_factory):
    """4-layer, 64-wide Llama with the real SmolLM2 tokenizer (49k vocabulary, chat template)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "teacher", smollm2_dir, layers=4, hidden=64)
