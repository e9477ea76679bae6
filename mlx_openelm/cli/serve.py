"""``serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import DEFAULT_CHAT_MODEL, PromptPrecisionOpt, _describe, _load

def serve(
    model: List[str] = typer.Option([DEFAULT_CHAT_MODEL], "--model", "-m", help="MLX folder, apple/OpenELM-* folder or hub id, loaded at start (repeat to serve several; the first is the default)."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA/DoRA adapters folder to apply (to the first model)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="A smaller OpenELM that drafts tokens: speculative decoding, one request at a time (no batching)."),
    num_draft_tokens: int = typer.Option(3, "--num-draft-tokens", help="Tokens the draft model proposes per step."),
    alias: List[str] = typer.Option([], "--alias", help="Another name requests may use for the (first) model (repeatable)."),
    any_model_name: bool = typer.Option(False, "--any-model-name", help="Answer any 'model' value with the served model (clients with a fixed name)."),
    tokenize_bos: bool = typer.Option(False, "--tokenize-bos", help="/tokenize always puts BOS first, so lm-eval (whose remote tokenizer never asks for it) scores as the model card does."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default keeps the server on this machine."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MLX_OPENELM_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    max_concurrency: int = typer.Option(32, "--max-concurrency", help="Sequences decoded together (continuous batching)."),
    max_tokens_default: int = typer.Option(512, "--max-tokens-default", help="max_tokens when a request gives none."),
    max_body_mb: float = typer.Option(4.0, "--max-body-mb", help="Largest request body in MiB (413 beyond)."),
    allowed_origin: List[str] = typer.Option([], "--allowed-origin", help="Enable CORS for this origin (repeatable; '*' for any)."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto, float32, float16, bfloat16."),
    prompt_precision: str = PromptPrecisionOpt,
):
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models,
    /tokenize, /detokenize, /tokenizer_info, /health) for chat front-ends, the openai client and lm-eval."""
    from rich.console import Console

    from ..serve import ServeConfig, ServedModel, create_app, make_server

    if max_concurrency < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--max-concurrency")
    if max_tokens_default < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--max-tokens-default")
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    served, names = [], set()
    for i, spec in enumerate(model):
        with console.status(f"loading {spec} ..."):
            m, tok = _load(spec, dtype, adapter_path if i == 0 else None, prompt_precision=prompt_precision)
            draft = _load(draft_model, dtype)[0] if draft_model and i == 0 else None
        name = Path(spec).name if Path(spec).exists() else spec
        if name in names:
            raise ValueError(f"model: {spec!r} is given twice (served names must differ)")
        names.add(name)
        served.append(ServedModel(name, m, tok, aliases=[spec, *(alias if i == 0 else [])], max_concurrency=max_concurrency,
                                  draft_model=draft, num_draft_tokens=num_draft_tokens))
    config = ServeConfig(host=host, port=port, api_key=api_key, max_concurrency=max_concurrency,
                         max_tokens_default=max_tokens_default, max_body_bytes=int(max_body_mb * 2**20),
                         allowed_origins=tuple(allowed_origin), any_model_name=any_model_name,
                         tokenize_bos=tokenize_bos)
    mode = f"speculative decoding with {draft_model}" if draft_model else f"up to {max_concurrency} sequences batched"
    for s in served:
        console.print(f"serving [bold]{s.name}[/] ({_describe(s.model)}; {mode if s is served[0] else 'batched'})")
    console.print(f"on http://{host}:{port}/v1  (Ctrl-C stops)")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        console.print("[yellow]warning:[/] listening beyond this machine without --api-key")
    make_server(create_app(served, config), host, port, log_level="info").run()
