"""The ``mlx-openelm`` command line: a lazy command table (as mlx-lm's) and the error policy.

Only this package prints, reads stdin or imports typer/rich. ``main`` imports the one command
module asked for, so ``--help`` and start-up stay fast; library errors become one red line and
exit code 1 (``--debug`` or ``MLX_OPENELM_DEBUG=1`` shows the traceback), Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

import mlx_openelm  # noqa: F401  (makes OpenBLAS visible before mlx loads)

# command -> (module under mlx_openelm.cli, function, one-line summary)
COMMANDS = {
    "convert": ("convert", "convert_command", "Convert an OpenELM checkpoint (Hugging Face or CoreNet) into an MLX model folder."),
    "generate": ("generate", "generate", "Generate text from a prompt, streaming it to stdout."),
    "chat": ("generate", "chat", "Chat with an -Instruct model (/reset, /exit; Ctrl-C stops an answer)."),
    "lora": ("train", "lora", "Fine-tune LoRA or DoRA adapters on instruction data (LLM-Adapters format)."),
    "dpo": ("dpo", "dpo", "Preference-tune (DPO / hinge / IPO) as OpenELM-Instruct was made; LoRA, DoRA or full."),
    "fuse": ("train", "fuse", "Fold LoRA/DoRA adapters into the base weights: a standalone model."),
    "eval": ("evaluate", "eval_", "Zero-shot accuracy: the paper's lm-eval table, or the 8 commonsense tasks."),
    "bench": ("bench", "bench", "Prompt/decode speed, time to first token, peak memory; the RMSNorm study."),
    "serve": ("serve", "serve", "Serve a model over an OpenAI-compatible API (chat, completions, lm-eval)."),
    "passuntil": ("passuntil", "passuntil", "PassUntil: sample each item until r samples pass; PU estimates and p_exact."),
    "scaling": ("passuntil", "scaling", "Fit the task scaling law to PassUntil results and predict a larger model."),
    "memorization": ("openness", "memorization", "Memorization score of checkpoints on training data (LLM360 Analysis360)."),
    "plot": ("openness", "plot", "Training curves from metrics.jsonl or CoreNet's training_logs.txt."),
}

PROG = "mlx-openelm"


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items())
    return (
        f"Usage: {PROG} COMMAND [OPTIONS]\n\n"
        "Run, fine-tune and study Apple's OpenELM language models with MLX.\n\n"
        f"Commands:\n{rows}\n\n"
        f"Run '{PROG} COMMAND --help' for a command's options. --debug (before COMMAND) shows tracebacks.\n"
    )


def command_app(name: str):
    """The typer app of one command (its module imported only now)."""
    import typer

    module_name, func_name, summary = COMMANDS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    app = typer.Typer(
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.command(name, help=getattr(module, func_name).__doc__ or summary)(getattr(module, func_name))
    return app


def _debug() -> bool:
    return os.environ.get("MLX_OPENELM_DEBUG", "") not in ("", "0")


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        os.environ["MLX_OPENELM_DEBUG"] = "1"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        sys.stdout.write(f"{PROG} {mlx_openelm.__version__}\n")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from ._common import err

        close = [c for c in COMMANDS if c.startswith(name[:2])]
        err(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)}" + (f" (did you mean {close[0]}?)" if close else ""))
        sys.exit(2)
    return run(name, rest)


def _click_errors():
    """(UsageError, ClickException, Exit, Abort) classes of every click in use: typer >= 0.20
    vendors its own copy (``typer._click``) next to the ``click`` package."""
    modules = []
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return tuple(tuple(getattr(m, cls) for m in modules if hasattr(m, cls)) for cls in ("UsageError", "ClickException", "Exit", "Abort"))


def _usage_hint(name: str, args: List[str], message: str) -> str:
    if "unexpected extra argument" in message and {"-q", "--quantize"} & set(args):
        return " (-q/--quantize is a switch; give the bits with --q-bits, e.g. -q --q-bits 4)"
    return ""


def run(name: str, args: List[str]) -> int:
    """Run one command with the error policy: one red line and exit 1 for errors, 2 for usage, 130 for Ctrl-C."""
    from ._common import err

    usage_error, click_error, click_exit, click_abort = _click_errors()
    kernels = sys.modules.get("mlx_openelm.kernels")
    precision = kernels.get_prompt_precision() if kernels else None
    try:
        code = command_app(name)(args=args, prog_name=f"{PROG} {name}", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) comes back as a return value here
            sys.exit(code)
    except click_exit as e:
        sys.exit(e.exit_code)
    except usage_error as e:
        message = e.format_message().strip().replace("\n", " ")
        err(f"{message}{_usage_hint(name, args, message)} (see '{PROG} {name} --help')")
        sys.exit(2)
    except click_error as e:
        err(e.format_message())
        sys.exit(e.exit_code or 1)
    except (click_abort + (KeyboardInterrupt,)):
        sys.stderr.write("\ninterrupted\n")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the CLI's one error policy
        if _debug():
            raise
        err(_one_line(e))
        sys.exit(1)
    finally:
        _restore_prompt_precision(precision)
    return 0


def _restore_prompt_precision(precision: Optional[str]) -> None:
    """A command's --prompt-precision lasts as long as the command (commands run in-process from Python too)."""
    kernels = sys.modules.get("mlx_openelm.kernels")
    if kernels is not None:
        kernels.set_prompt_precision(precision or kernels.PROMPT_PRECISIONS[0])


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    line = text.splitlines()[0] if text else type(e).__name__
    return line if isinstance(e, (ValueError, OSError, ImportError, KeyError)) else f"{type(e).__name__}: {line}"


if __name__ == "__main__":
    main()
