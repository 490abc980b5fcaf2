"""The quantization methods: name -> (settings class, run). Adding a method = one module + one line here.

The recipe's `quantize` section gets one optional field per entry (toolkit.config.quantize builds it from
this dict), and the stage runs every enabled entry the same way. Only cheap modules are imported here: each
method imports its heavy libraries (llm-compressor, llama_cpp) inside `run`.
"""

from __future__ import annotations

from toolkit.quantize import awq, gguf, gptq, int8

METHODS = {
    "int8": (int8.Int8Config, int8.run),
    "gptq": (gptq.GPTQConfig, gptq.run),
    "awq": (awq.AWQConfig, awq.run),
    "gguf": (gguf.GGUFConfig, gguf.run),
}
