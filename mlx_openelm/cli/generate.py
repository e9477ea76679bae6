"""``generate`` and ``chat``: streaming text to the terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ._common import DEFAULT_CHAT_MODEL, ModelOpt, PromptPrecisionOpt, TokenizerOpt, _describe, _load, _stats_line, err


def _sampling(temp, top_p, top_k, min_p, repetition_penalty, seed):
    """The library's ``SamplingConfig`` (it checks the ranges), built before the model loads."""
    from ..generate.sampling import SamplingConfig

    return SamplingConfig(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)


def _bad_utf8(text: str) -> bool:
    """True for a line read with errors="surrogateescape" that held bytes that are not UTF-8."""
    return any("\udc80" <= c <= "\udcff" for c in text)


def generate(
    model: str = ModelOpt,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Most tokens to generate (stops earlier at EOS or the 2048-token context)."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(0.0, "--top-p", help="Nucleus sampling mass (0 disables)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 disables)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 disables)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="Penalty for recent tokens; the model card uses 1.2."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Wrap the prompt in the -Instruct chat template (with the empty system turn the -Instruct models were trained with)."),
    system_turn: bool = typer.Option(True, "--system-turn/--no-system-turn", help="With --chat-template: start with an empty system turn, as in the -Instruct training data."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="A smaller OpenELM that drafts tokens (speculative decoding)."),
    num_draft_tokens: int = typer.Option(3, "--num-draft-tokens", min=1, help="Tokens the draft model proposes per step."),
    prompt_lookup: int = typer.Option(0, "--prompt-lookup", min=0, help="Prompt-lookup decoding: draft N tokens copied from the context (the model card uses 10)."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA/DoRA adapters folder to apply."),
    tokenizer: Optional[str] = TokenizerOpt,
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16."),
    prompt_precision: str = PromptPrecisionOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Report speed, memory, device, dtype and BLAS."),
):
    """Generate text from a prompt, streaming it to stdout."""
    from rich.console import Console

    from ..generate.stream import stream_generate

    sampling = _sampling(temp, top_p, top_k, min_p, repetition_penalty, seed)
    if prompt == "-":
        prompt = sys.stdin.read()
    m, tok = _load(model, dtype, adapter_path, tokenizer, prompt_precision)
    draft = _load(draft_model, dtype, tokenizer=tokenizer)[0] if draft_model else None
    if chat_template:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_empty_system=system_turn)
    out = Console(stderr=True, highlight=False, soft_wrap=True)
    last, drafted = None, 0
    for r in stream_generate(
        m, tok, prompt, max_tokens=max_tokens, sampling=sampling, draft_model=draft, num_draft_tokens=num_draft_tokens,
        prompt_lookup=prompt_lookup,
    ):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last, drafted = r, drafted + bool(r.from_draft)
    sys.stdout.write("\n")
    if verbose and last is not None:
        _stats_line(last, out)
        if draft is not None or prompt_lookup:
            share = drafted / max(last.generation_tokens, 1)
            out.print(f"tokens accepted from drafts: {drafted}/{last.generation_tokens} ({share:.0%})", highlight=False)
        out.print(f"compute: {_describe(m)}", highlight=False)


def chat(
    model: str = typer.Option(DEFAULT_CHAT_MODEL, "--model", "-m", help="An -Instruct model: MLX folder or hub id."),
    system: Optional[str] = typer.Option(None, "--system", "-s", "--system-prompt", help="System message (default: the empty system turn the -Instruct models were trained with)."),
    system_turn: bool = typer.Option(True, "--system-turn/--no-system-turn", help="Without --system: start with an empty system turn, as in the -Instruct training data."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Most tokens per answer."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(0.0, "--top-p", help="Nucleus sampling mass (0 disables)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 disables)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 disables)."),
    repetition_penalty: Optional[float] = typer.Option(1.2, "--repetition-penalty", help="Penalty for recent tokens; the model card's 1.2 by default."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA/DoRA adapters folder to apply."),
    tokenizer: Optional[str] = TokenizerOpt,
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16."),
    prompt_precision: str = PromptPrecisionOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Report speed, memory and how much of the history came from the cache."),
):
    """Chat with an -Instruct model. /reset clears the history, /exit quits, Ctrl-C stops an answer.

    Reads one message per line, so it also works with stdin piped in."""
    from rich.console import Console

    from ..generate.chat import ChatSession

    sampling = _sampling(temp, top_p, top_k, min_p, repetition_penalty, seed)
    m, tok = _load(model, dtype, adapter_path, tokenizer, prompt_precision)
    session = ChatSession(m, tok, system=system, add_empty_system=system_turn)
    interactive = sys.stdin.isatty()
    info = Console(stderr=True, highlight=False, soft_wrap=True)
    if interactive:
        info.print(f"[bold]{model}[/] — /reset clears the history, /exit quits, Ctrl-C stops an answer.")
    opts = dict(max_tokens=max_tokens, sampling=sampling)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a non-UTF-8 line is reported, not fatal
    while True:
        try:
            line = input(">> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if _bad_utf8(line):
            err("that line is not valid UTF-8 text; it was skipped (the conversation goes on)")
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            info.print("(history cleared)")
            continue
        last = None
        try:
            for r in session.reply(line, **opts):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last = r
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ValueError as e:  # message too long for the context: say so and keep the conversation
            err(str(e))
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose and last is not None:
            _stats_line(last, info)
            info.print(f"reused from cache: {last.cached_tokens} tokens", highlight=False)

