"""Stream a completion from OpenELM with the Python API.

    python examples/generate.py apple/OpenELM-270M-Instruct "Once upon a time there was"
"""

import sys

from mlx_openelm import load, stream_generate

model_id = sys.argv[1] if len(sys.argv) > 1 else "apple/OpenELM-270M-Instruct"
prompt = sys.argv[2] if len(sys.argv) > 2 else "Once upon a time there was"

model, tokenizer = load(model_id)  # a hub id is converted once, then served from the cache
for response in stream_generate(model, tokenizer, prompt, max_tokens=128, repetition_penalty=1.2):
    print(response.text, end="", flush=True)
print(f"\n[{response.generation_tps:.1f} tok/s, finish: {response.finish_reason}]")
