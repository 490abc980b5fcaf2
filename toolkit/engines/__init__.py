"""The one way to reach a model: render a prompt (toolkit.engines.render), generate (batched, timed), score
per-token NLL (toolkit.engines.score). collect's teacher, distill's in-stage evaluation, quantize's
calibration and verification, evaluate's variants and the judge all go through here.

An engine is a class with the interface of toolkit.engines.base.Engine, plus `for_teacher(recipe)` and
`teacher_identity(recipe)` (what decides its answers, known without loading the model). Adding one = one
module + one line below; collect (`collect.backend`) and evaluate both get it. Modules import their heavy
libraries (torch, vllm, llama_cpp, httpx) inside functions, so importing this package stays cheap.
"""

from __future__ import annotations

from toolkit.engines.base import Engine, Settings, Timed
from toolkit.engines.hf import HFEngine
from toolkit.engines.llamacpp import LlamaCppEngine
from toolkit.engines.openai import OpenAIEngine
from toolkit.engines.render import Rendered, Renderer, cut_stop, render_plain
from toolkit.engines.servers import llamacpp_server, vllm_server
from toolkit.engines.vllm import VLLMEngine
from toolkit.engines.served_vllm import VLLMServerEngine

ENGINES: dict[str, type] = {
    "hf": HFEngine,
    "vllm": VLLMEngine,
    "vllm-server": VLLMServerEngine,
    "llamacpp": LlamaCppEngine,
    "openai": OpenAIEngine,
}

# Server-managed engines (toolkit.engines.servers): a started OpenAI-compatible server per model, measured through
# the one client; evaluate's serving sweep picks vllm for HF-format dirs and llamacpp-server for GGUF.
SERVERS = {"vllm": vllm_server, "llamacpp-server": llamacpp_server}

__all__ = ["ENGINES", "SERVERS", "Engine", "Settings", "Timed", "Rendered", "Renderer", "cut_stop", "render_plain",
           "HFEngine", "LlamaCppEngine", "OpenAIEngine", "VLLMEngine",
           "VLLMServerEngine"]
