"""Request validation for the OpenAI-compatible endpoints and the shapes of their answers.

Every check raises ``APIError`` with OpenAI's error fields (status, message, type, param,
code), so a bad request always gets ``{"error": {...}}`` and never reaches the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..generate.sampling import SamplingConfig

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 8

# SamplingConfig's field names -> the request field they come from
_SAMPLING_PARAM = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty", "seed": "seed"}


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {401: "authentication_error", 404: "not_found_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def get_int(body: Dict[str, Any], name: str, default: Optional[int], lo: Optional[int] = None, hi: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise _bad(name, f"{name} must be an integer, not {type(v).__name__}", "invalid_type")
    if lo is not None and v < lo:
        raise _bad(name, f"{name}={v} must be >= {lo}")
    if hi is not None and v > hi:
        raise _bad(name, f"{name}={v} must be <= {hi}")
    return v


def get_bool(body: Dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be true or false, not {type(v).__name__}", "invalid_type")
    return v


def get_stop(body: Dict[str, Any]) -> List[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "stop must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise _bad("stop", f"stop has {len(stops)} sequences; at most {MAX_STOPS}")
    return [s for s in stops if s]


def get_sampling(body: Dict[str, Any]) -> SamplingConfig:
    """``SamplingConfig.from_openai`` after a type check of each field; its range errors name the field."""
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = body.get(name)
        if v is not None and not _is_number(v):
            raise _bad(name, f"{name} must be a number, not {type(v).__name__}", "invalid_type")
    for name in ("top_k", "seed"):
        get_int(body, name, None)
    if body.get("temperature") is not None and body["temperature"] > 2:
        raise _bad("temperature", f"temperature={body['temperature']} must be <= 2")
    try:
        return SamplingConfig.from_openai(body, default_temp=1.0)
    except ValueError as e:
        name = str(e).split("=", 1)[0]
        raise _bad(_SAMPLING_PARAM.get(name, name), str(e).replace(f"{name}=", f"{_SAMPLING_PARAM.get(name, name)}=", 1)) from e


def get_stream_usage(body: Dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("stream_options", "stream_options must be an object", "invalid_type")
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed with stream=true")
    return get_bool(opts, "include_usage", False)


def reject_unsupported(body: Dict[str, Any], names: Sequence[str]) -> None:
    for name in names:
        v = body.get(name)
        if v not in (None, [], {}, ""):
            raise _bad(name, f"{name} is not supported by this server", "unsupported_parameter")


@dataclass
class GenOptions:
    """What both endpoints share once validated."""

    max_tokens: int
    n: int
    stop: List[str]
    sampling: SamplingConfig
    stream: bool
    include_usage: bool
    top_logprobs: Optional[int]  # None: no log-probs


@dataclass
class CompletionRequest:
    model: Optional[str]
    prompts: List[Union[str, List[int]]]
    echo: bool
    opts: GenOptions
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatRequest:
    model: Optional[str]
    messages: List[Dict[str, str]]
    opts: GenOptions


def get_model(body: Dict[str, Any]) -> Optional[str]:
    v = body.get("model")
    if v is not None and not isinstance(v, str):
        raise _bad("model", "model must be a string", "invalid_type")
    return v


def _prompts(v: Any) -> List[Union[str, List[int]]]:
    """``str`` | ``list[int]`` | ``list[str]`` | ``list[list[int]]`` -> a list of prompts."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(_is_int(t) for t in v):
            return [list(v)]
        if all(isinstance(p, str) for p in v):
            return list(v)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in v):
            return [list(p) for p in v]
    if isinstance(v, list) and not v:
        raise _bad("prompt", "prompt is empty")
    raise _bad("prompt", "prompt must be a string, a list of token ids, or a list of either", "invalid_type")


def parse_completion(body: Dict[str, Any], max_tokens_default: int) -> CompletionRequest:
    if "prompt" not in body:
        raise _bad("prompt", "prompt is required", "missing_required_parameter")
    prompts = _prompts(body["prompt"])
    echo = get_bool(body, "echo", False)
    max_tokens = get_int(body, "max_tokens", max_tokens_default, lo=0)
    if max_tokens == 0 and not echo:
        raise _bad("max_tokens", "max_tokens=0 must be >= 1 (0 only with echo)")
    n = get_int(body, "n", 1, lo=1, hi=MAX_N)
    best_of = get_int(body, "best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise _bad("best_of", "best_of other than n is not supported", "unsupported_parameter")
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):  # some clients send true/false
        logprobs = 1 if logprobs else None
    else:
        logprobs = get_int(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    reject_unsupported(body, ["suffix", "logit_bias", "tools"])
    stream = get_bool(body, "stream", False)
    opts = GenOptions(max_tokens, n, get_stop(body), get_sampling(body), stream, get_stream_usage(body, stream), logprobs)
    return CompletionRequest(get_model(body), prompts, echo, opts)


def _content(m: Dict[str, Any], i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}]
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text content parts are supported", "invalid_type")
            parts.append(p["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "content must be a string or a list of text parts", "invalid_type")


def parse_chat(body: Dict[str, Any], max_tokens_default: int) -> ChatRequest:
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("messages", "messages is required", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "messages must be a non-empty list", "invalid_type")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "each message must be an object", "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"role {role!r} is not one of system, user, assistant")
        messages.append({"role": role, "content": _content(m, i)})
    max_tokens = get_int(body, "max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", max_tokens_default, lo=1)
    n = get_int(body, "n", 1, lo=1, hi=MAX_N)
    want = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise _bad("top_logprobs", "top_logprobs needs logprobs=true")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("response_format", "only response_format {\"type\": \"text\"} is supported", "unsupported_parameter")
    reject_unsupported(body, ["tools", "functions", "logit_bias"])
    stream = get_bool(body, "stream", False)
    opts = GenOptions(max_tokens, n, get_stop(body), get_sampling(body), stream, get_stream_usage(body, stream),
                      (top or 0) if want else None)
    return ChatRequest(get_model(body), messages, opts)


_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(pieces: Sequence[str], token: int, specials: Sequence[int] = ()) -> bytes:
    """The bytes one token stands for in generated text (SentencePiece "▁" is a space, <0xNN> a byte)."""
    piece = pieces[token]
    if token in specials:
        return piece.encode()
    m = _BYTE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


def chat_logprob_entry(pieces: Sequence[str], token: int, logprob: float, top: Optional[List[Tuple[int, float]]],
                       specials: Sequence[int] = ()) -> Dict[str, Any]:
    """One token in OpenAI's chat format: ``{token, logprob, bytes, top_logprobs[]}``."""

    def one(t: int, lp: float) -> Dict[str, Any]:
        b = token_bytes(pieces, t, specials)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in (top or [])]}
