"""The Hugging Face Hub: repo ids, downloads, the converted-model cache, and ONE error translator.

Every Hub access of the package goes through here, so a gated, missing, offline or failing Hub
always reads the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

from ..utils import first_line, sha256_file

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
BIN_PATTERNS = ["pytorch_model*.bin"]


def cache_dir() -> Path:
    """Where hub models and local HF folders are converted on first use (env MLX_OPENELM_CACHE)."""
    return Path(os.environ.get("MLX_OPENELM_CACHE") or Path.home() / ".cache" / "mlx-openelm").expanduser()


def is_repo_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(text)) is not None


def hub_error(repo: str, e: Exception, revision: Optional[str] = None) -> ValueError:
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        msg = f"{repo} is gated: accept its licence at https://huggingface.co/{repo} and log in (`huggingface-cli login` or HF_TOKEN)"
    elif isinstance(e, errors.RepositoryNotFoundError):
        msg = f"{repo} was not found on the Hugging Face Hub (if it is private, log in with `huggingface-cli login` or set HF_TOKEN)"
    elif isinstance(e, errors.RevisionNotFoundError):
        msg = f"{repo} has no revision {revision!r}"
    elif isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        msg = (
            f"{repo} is not in the local Hugging Face cache and the Hub cannot be reached (offline or "
            "HF_HUB_OFFLINE=1); connect once to download it, or give a local folder"
        )
    else:
        msg = f"cannot download {repo} from the Hugging Face Hub: {first_line(e)}"
    return ValueError(msg)


def download(repo: str, revision: Optional[str] = None, patterns: Sequence[str] = tuple(HUB_PATTERNS),
             repo_type: Optional[str] = None) -> Path:
    """Snapshot of the files of ``repo`` that conversion needs (HF cache; honours HF_HUB_OFFLINE,
    HF_TOKEN); ``pytorch_model*.bin`` only when the repo has no safetensors. ``repo_type="dataset"``
    with ``patterns`` fetches a dataset's files."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=list(patterns), repo_type=repo_type))
        if not any(folder.glob("*.safetensors")) and patterns == tuple(HUB_PATTERNS):
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS + BIN_PATTERNS))
    except Exception as e:  # the hub library raises many kinds; all become one line
        raise hub_error(repo, e, revision) from e
    return folder


def download_file(repo: str, filename: str, revision: Optional[str] = None, repo_type: Optional[str] = None,
                  cache_dir: Optional[str] = None) -> Path:
    """One file of a hub repo (HF cache), errors translated by ``hub_error``."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, repo_type=repo_type, cache_dir=cache_dir))
    except Exception as e:
        raise hub_error(repo, e, revision) from e


def dataset_file(repo: str, filename: str, what: str, instead: str, revision: Optional[str] = None,
                 cache_dir: Optional[str] = None) -> Path:
    """A data set's file from the Hub; when it cannot be had, ``FileNotFoundError`` saying which
    (``what``), why, and what to do ``instead`` (a local copy)."""
    try:
        return download_file(repo, filename, revision=revision, repo_type="dataset", cache_dir=cache_dir)
    except ValueError as e:
        raise FileNotFoundError(f"could not get {what} from the Hugging Face Hub ({repo}/{filename}: {e}); {instead}") from e



# ---------------------------------------------------------------- the Llama-2 tokenizer OpenELM uses

LLAMA_TOKENIZER_REPO = "meta-llama/Llama-2-7b-hf"  # gated: licence + login
# An ungated public copy of the same SentencePiece file (the one transformers' own docs use).
LLAMA_TOKENIZER_FALLBACK = "hf-internal-testing/llama-tokenizer"
# sha256 (= the Hub LFS pointer oid) and size of meta-llama/Llama-2-7b-hf's tokenizer.model.
LLAMA_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
LLAMA_TOKENIZER_SIZE = 499723


def llama_tokenizer() -> "tuple[Path, str]":
    """``(path of tokenizer.model, repo it came from)``: the gated Llama-2 tokenizer OpenELM uses,
    else the ungated copy in ``LLAMA_TOKENIZER_FALLBACK``, accepted only if its sha256 equals the
    Llama-2 file's. Raises ``ValueError`` saying why neither could be used."""
    try:
        return download_file(LLAMA_TOKENIZER_REPO, "tokenizer.model"), LLAMA_TOKENIZER_REPO
    except ValueError as e:
        gated_reason = str(e)
    try:
        path = download_file(LLAMA_TOKENIZER_FALLBACK, "tokenizer.model")
    except ValueError as e:
        raise ValueError(
            f"the Llama-2 tokenizer is not available: {gated_reason}; and its public copy {LLAMA_TOKENIZER_FALLBACK} "
            f"neither: {e}"
        ) from e
    digest = sha256_file(path)
    if digest != LLAMA_TOKENIZER_SHA256:
        raise ValueError(
            f"the Llama-2 tokenizer is not available ({gated_reason}), and {LLAMA_TOKENIZER_FALLBACK}'s tokenizer.model "
            f"({path.stat().st_size} bytes, sha256 {digest[:12]}...) is not the Llama-2 file (sha256 "
            f"{LLAMA_TOKENIZER_SHA256[:12]}..., {LLAMA_TOKENIZER_SIZE} bytes), so it was refused"
        )
    return path, LLAMA_TOKENIZER_FALLBACK
