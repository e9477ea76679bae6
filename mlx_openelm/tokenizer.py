"""The Llama SentencePiece tokenizer that OpenELM uses, and its chat template.

A folder may hold ``tokenizer.model`` (SentencePiece) or only ``tokenizer.json`` (the
mlx-community conversions); both give the same ids for the Llama-2 vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .utils import first_line

# Zephyr-style template of OpenELM-*-Instruct (CoreNet instruction_tuning/openelm-instruct.yaml),
# rendered with trim_blocks/lstrip_blocks. The role tags are plain text; "</s>" is the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

ROLES = ("system", "user", "assistant")


def with_system_turn(messages: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    """``messages`` with an empty system turn first when they have none.

    The alignment-handbook commit Apple trained OpenELM-*-Instruct with (``maybe_insert_system_message``)
    inserts ``{"role": "system", "content": ""}`` into every example without a system message, so
    the -Instruct models saw ``<|system|>\\n</s>\\n`` before every conversation."""
    messages = list(messages)
    if not messages or messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": ""})
    return messages


def render_chat(
    messages: Sequence[Dict[str, str]],
    add_generation_prompt: bool = True,
    eos_token: str = "</s>",
    add_empty_system: bool = True,
) -> str:
    """Render ``messages`` exactly as ``CHAT_TEMPLATE`` does (without needing jinja2); an empty
    system turn is inserted first when there is none unless ``add_empty_system=False``."""
    if add_empty_system:
        messages = with_system_turn(messages)
    parts = []
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown chat role {m['role']!r}; use one of {', '.join(ROLES)}")
        parts.append(f"<|{m['role']}|>\n{m['content']}{eos_token}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def render_jinja(template: str, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True,
                 bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """Render a Hugging Face ``chat_template`` as transformers does (sandboxed jinja2 with
    ``trim_blocks``/``lstrip_blocks``; ``messages``, ``bos_token``, ``eos_token``,
    ``add_generation_prompt`` and ``raise_exception`` in scope)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("the folder's chat_template needs jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
        )
    except TemplateError as e:
        raise ValueError(f"the chat_template of tokenizer_config.json failed: {e}") from e


def piece_bytes(piece: str) -> bytes:
    """The bytes a SentencePiece piece stands for: byte-fallback pieces ``<0xAB>`` are one byte."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.encode("utf-8")


class StreamingDetokenizer:
    """Text of a growing token sequence, one segment at a time, in linear time (the behaviour of
    mlx-lm's ``SPMStreamingDetokenizer``): pieces are joined as bytes, "▁" becomes a space, text is
    released once it is valid UTF-8 (a multi-byte character split over byte pieces waits), and
    the leading space of the first piece is dropped. ``add_token``, ``finalize``, ``last_segment``,
    ``text`` and ``tokens`` as mlx-lm's."""

    _SPACE = "\u2581".encode("utf-8")

    def __init__(self, piece_bytes_table: Sequence[bytes]):
        self._table = piece_bytes_table
        self.reset()

    def reset(self) -> None:
        self.text, self.tokens, self.offset, self._pending = "", [], 0, b""

    def _flush(self, force: bool = False) -> None:
        text = self._pending.replace(self._SPACE, b" ").decode("utf-8", "replace")
        if text.endswith("\ufffd") and not force:
            return  # an incomplete UTF-8 character: wait for its next byte
        if not self.text and text.startswith(" "):
            text = text[1:]
        self.text += text
        self._pending = b""

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        self._pending += self._table[token]
        self._flush()

    def finalize(self) -> None:
        self._flush(force=True)

    @property
    def last_segment(self) -> str:
        """The text added since the previous call."""
        segment = self.text[self.offset:]
        self.offset = len(self.text)
        return segment


class Tokenizer:
    """Encode/decode with BOS/EOS handling as Hugging Face's LlamaTokenizer (``legacy=False``)."""

    def __init__(self, path: Path, chat_template: Optional[str] = None):
        path = Path(path)
        model_file = path / "tokenizer.model" if path.is_dir() else path
        json_file = path / "tokenizer.json" if path.is_dir() else None
        if model_file.is_file() and model_file.suffix == ".model":
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
            except (RuntimeError, OSError) as e:
                raise ValueError(f"{model_file} is not a valid SentencePiece tokenizer.model ({first_line(e)}); copy or download it again") from e
            self._hf = None
            self.bos_id, self.eos_id, self.unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()
            self._pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        elif json_file is not None and json_file.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self._sp = None
            try:
                self._hf = HFTokenizer.from_file(str(json_file))
            except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
                raise ValueError(f"{json_file} is not a valid tokenizer.json ({first_line(e)}); copy or download it again") from e
            self._pieces = [self._hf.id_to_token(i) for i in range(self._hf.get_vocab_size())]
            index = {p: i for i, p in enumerate(self._pieces)}
            self.bos_id, self.eos_id, self.unk_id = index.get("<s>", 1), index.get("</s>", 2), index.get("<unk>", 0)
        else:
            raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
        self.chat_template = chat_template
        self._piece_bytes: Optional[List[bytes]] = None
        self._specials = {self._pieces[i]: i for i in (self.bos_id, self.eos_id, self.unk_id) if i >= 0}
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in self._specials) + ")")

    # -- what SPMStreamingDetokenizer needs
    def __len__(self) -> int:
        return len(self._pieces)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self._pieces[i] for i in ids]

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def eos_token_ids(self) -> set:
        return {self.eos_id}

    def _encode_plain(self, text: str, prefix: bool) -> List[int]:
        if not text:
            return []
        if self._hf is not None:
            ids = self._hf.encode(text, add_special_tokens=False).ids
            if not prefix and ids and self._pieces[ids[0]] == "\u2581":
                ids = ids[1:]
            return ids
        if prefix:
            return self._sp.encode(text)
        # No dummy "▁" before text that follows a special token (HF legacy=False): encode
        # behind the unk piece and drop it.
        marker = self._sp.encode(self._pieces[self.unk_id])
        ids = self._sp.encode(self._pieces[self.unk_id] + text)
        return ids[len(marker):]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> List[int]:
        """Token ids of ``text``; the literal strings ``<s>``/``</s>`` become the BOS/EOS ids."""
        ids = [self.bos_id] if add_bos else []
        after_special = False
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self._specials[part])
                after_special = True
            elif part:
                ids.extend(self._encode_plain(part, prefix=not after_special))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        return self._sp.decode(ids)

    @property
    def detokenizer(self) -> "StreamingDetokenizer":
        """A new streaming detokenizer for each stream, so concurrent streams never share state
        (the piece table they read is built once and shared)."""
        if getattr(self, "_piece_bytes", None) is None:
            self._piece_bytes = [piece_bytes(p) for p in self._pieces]
        return StreamingDetokenizer(self._piece_bytes)

    def apply_chat_template(
        self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True, add_empty_system: bool = True
    ) -> str:
        """The prompt text of ``messages``: the folder's ``chat_template`` (tokenizer_config.json) when
        it has one, else the built-in OpenELM-Instruct template. An empty system turn is inserted
        first when there is none (as in the -Instruct training data) unless ``add_empty_system=False``."""
        if add_empty_system:
            messages = with_system_turn(messages)
        eos = self._pieces[self.eos_id]
        if self.chat_template:
            bos = self._pieces[self.bos_id] if self.bos_id >= 0 else "<s>"
            return render_jinja(self.chat_template, messages, add_generation_prompt, bos_token=bos, eos_token=eos)
        return render_chat(messages, add_generation_prompt, eos_token=eos, add_empty_system=False)


def load_chat_template(folder: Path) -> Optional[str]:
    """The ``chat_template`` of ``folder/tokenizer_config.json`` (a string), if any."""
    cfg = Path(folder) / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg} is not valid JSON ({first_line(e)})") from e
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None
