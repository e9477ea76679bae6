"""A two-turn conversation that reuses the KV cache between turns.

    python examples/chat.py apple/OpenELM-270M-Instruct
"""

import sys

from mlx_openelm import load
from mlx_openelm import ChatSession

model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else "apple/OpenELM-270M-Instruct")
chat = ChatSession(model, tokenizer, system="You are a concise assistant.")
for question in ["What is a llama?", "And how tall does it grow?"]:
    print(f">> {question}")
    for r in chat.reply(question, max_tokens=96, repetition_penalty=1.2):
        print(r.text, end="", flush=True)
    print(f"\n[prefilled {r.prompt_tokens} new tokens, reused {r.cached_tokens} from the cache]")
