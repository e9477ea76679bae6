"""Speculative decoding: OpenELM-270M drafts for OpenELM-1_1B; the output equals greedy decoding
of the 1.1B model alone.

    python examples/speculative.py
"""

from mlx_openelm import load, stream_generate

target, tokenizer = load("apple/OpenELM-1_1B-Instruct")
draft, _ = load("apple/OpenELM-270M-Instruct")
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "List three uses of a paperclip."}])
accepted = 0
for r in stream_generate(target, tokenizer, prompt, max_tokens=128, draft_model=draft, num_draft_tokens=3):
    print(r.text, end="", flush=True)
    accepted += r.from_draft
print(f"\n[{accepted}/{r.generation_tokens} tokens came from the draft, {r.generation_tps:.1f} tok/s]")
