"""Request validation for the text generation server.

Every invalid request raises RequestError(field, message); the server answers HTTP 400 (413 for
a body over --max-request-bytes, 404 for a model it does not serve): on `PUT /api` with
{"error": message, "field": field} and messages that follow Megatron's server, on the OpenAI
routes with OpenAI's {"error": {"message", "type", "param", "code"}} (param = field). Numbers must be finite (Python's JSON reader accepts NaN and Infinity).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Union

from gigatron.core.inference.engine import SamplingParams

__all__ = ["RequestError", "ServerDefaults", "ApiRequest", "CompletionRequest", "ChatRequest", "parse_api_request",
           "parse_completion_request", "parse_chat_request", "MAX_PROMPTS", "MAX_CHOICES", "DEFAULT_MAX_REQUEST_BYTES"]

MAX_PROMPTS = 128
MAX_CHOICES = 128
"""At most this many rows (prompts × best_of, or n) in one OpenAI request."""
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
"""The largest request body served by default (--max-request-bytes): 128 prompts of 2,048 tokens
sent as token ids take about 1.5 MB of JSON."""
MAX_SEED = 2 ** 63 - 1  # what torch.Generator.manual_seed takes


class RequestError(ValueError):
    """An invalid request: `field` names the offending JSON field."""

    def __init__(self, field: Optional[str], message: str, status: int = 400, code: Optional[str] = None):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status
        self.code = code


@dataclasses.dataclass
class ServerDefaults:
    """Values used when a request leaves a field out (the server's command-line flags)."""
    tokens_to_generate: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    logprobs: bool = False


@dataclasses.dataclass
class ApiRequest:
    prompts: List[str]
    params: SamplingParams
    beam_width: Optional[int] = None
    stop_token: int = 50256
    length_penalty: float = 1.0
    no_log: bool = False


@dataclasses.dataclass
class CompletionRequest:
    prompts: List[Union[str, List[int]]]
    params: SamplingParams
    echo: bool = False
    logprobs: Optional[int] = None
    stop: List[str] = dataclasses.field(default_factory=list)
    stream: bool = False
    n: int = 1
    """Choices returned per prompt."""
    best_of: int = 1
    """Rows generated per prompt; the n with the highest mean log-probability per token are returned."""
    include_usage: bool = False
    """stream_options.include_usage: a last chunk (no choices) carries the usage."""
    model: Optional[str] = None


@dataclasses.dataclass
class ChatRequest:
    messages: List[dict]
    params: SamplingParams
    max_tokens: Optional[int] = None
    """None: up to the model's length."""
    logprobs: bool = False
    top_logprobs: int = 0
    stop: List[str] = dataclasses.field(default_factory=list)
    stream: bool = False
    n: int = 1
    include_usage: bool = False
    model: Optional[str] = None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite JSON number that fits a float (not a boolean, not NaN or Infinity)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _bool(payload: dict, name: str, default: bool) -> bool:
    value = payload.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(name, f"{name} must be a boolean value")
    return value


def parse_api_request(payload: Any, defaults: ServerDefaults = ServerDefaults()) -> ApiRequest:
    """Validate the JSON body of `PUT /api` (Megatron's fields and rules)."""
    if not isinstance(payload, dict):
        raise RequestError("body", "the request body must be a JSON object")
    if "sentences" in payload:
        raise RequestError("sentences", "sentences is no longer used.  Replace with prompts")
    if "max_len" in payload:
        raise RequestError("max_len", "max_len is no longer used.  Replace with tokens_to_generate")
    if "prompts" not in payload:
        raise RequestError("prompts", "prompts argument required")
    prompts = payload["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts", "prompts is not a list of strings")
    if len(prompts) == 0:
        raise RequestError("prompts", "prompts is empty")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError("prompts", f"Maximum number of prompts is {MAX_PROMPTS}")

    tokens_to_generate = payload.get("tokens_to_generate", defaults.tokens_to_generate)
    if not _is_int(tokens_to_generate):
        raise RequestError("tokens_to_generate", "tokens_to_generate must be an integer greater than or equal to 0")
    if tokens_to_generate < 0:
        raise RequestError("tokens_to_generate", "tokens_to_generate must be an integer greater than or equal to 0")
    logprobs = _bool(payload, "logprobs", defaults.logprobs)
    if tokens_to_generate == 0 and not logprobs:
        raise RequestError("tokens_to_generate", "tokens_to_generate=0 implies logprobs should be True")

    temperature = payload.get("temperature", defaults.temperature)
    if not _is_number(temperature):
        raise RequestError("temperature", "temperature must be a positive number less than or equal to 100.0")
    if not 0.0 < temperature <= 100.0:
        raise RequestError("temperature", "temperature must be a positive number less than or equal to 100.0")

    top_k = payload.get("top_k", defaults.top_k)
    if not _is_int(top_k):
        raise RequestError("top_k", "top_k must be an integer equal to or greater than 0 and less than or equal to 1000")
    if not 0 <= top_k <= 1000:
        raise RequestError("top_k", "top_k must be equal to or greater than 0 and less than or equal to 1000")

    top_p = payload.get("top_p", defaults.top_p)
    if not _is_number(top_p):
        raise RequestError("top_p", "top_p must be a positive float less than or equal to 1.0")
    top_p = float(top_p)
    if top_p > 0.0 and top_k > 0:
        raise RequestError("top_p", "cannot set both top-k and top-p samplings.")
    if not 0.0 <= top_p <= 1.0:
        raise RequestError("top_p", "top_p must be less than or equal to 1.0")

    top_p_decay = payload.get("top_p_decay", 0.0)
    if not _is_number(top_p_decay):
        raise RequestError("top_p_decay", "top_p_decay must be a positive float less than or equal to 1.0")
    if top_p == 0.0 and top_p_decay != 0.0:
        raise RequestError("top_p_decay", "top_p_decay cannot be set without top_p")
    if not 0.0 <= top_p_decay <= 1.0:
        raise RequestError("top_p_decay", "top_p_decay must be less than or equal to 1.0")

    top_p_bound = payload.get("top_p_bound", 0.0)
    if not _is_number(top_p_bound):
        raise RequestError("top_p_bound", "top_p_bound must be a positive float less than or equal to top_p")
    if top_p == 0.0 and top_p_bound != 0.0:
        raise RequestError("top_p_bound", "top_p_bound cannot be set without top_p")
    if not 0.0 <= top_p_bound <= top_p:
        raise RequestError("top_p_bound", "top_p_bound needs to be greater than 0 and less than top_p")

    add_BOS = _bool(payload, "add_BOS", False)
    if any(len(p) == 0 for p in prompts) and not add_BOS:
        raise RequestError("prompts", "Empty prompts require add_BOS=true")
    stop_on_double_eol = _bool(payload, "stop_on_double_eol", False)
    stop_on_eol = _bool(payload, "stop_on_eol", False)
    prevent_newline_after_colon = _bool(payload, "prevent_newline_after_colon", False)

    random_seed = payload.get("random_seed", -1)
    if not _is_int(random_seed):
        raise RequestError("random_seed", "random_seed must be integer")
    if not -1 <= random_seed <= MAX_SEED:
        raise RequestError("random_seed", f"random_seed must be a positive integer up to {MAX_SEED} (or -1 for none)")
    no_log = _bool(payload, "no_log", False)

    beam_width = payload.get("beam_width", None)
    if beam_width is not None:
        if not _is_int(beam_width):
            raise RequestError("beam_width", "beam_width must be integer")
        if beam_width < 1:
            raise RequestError("beam_width", "beam_width must be an integer > 0")
        if len(prompts) > 1:
            raise RequestError("beam_width", "When doing beam_search, batch size must be 1")
        if tokens_to_generate < 1:
            raise RequestError("tokens_to_generate", "beam search needs tokens_to_generate >= 1")
    stop_token = payload.get("stop_token", 50256)
    if not _is_int(stop_token):
        raise RequestError("stop_token", "stop_token must be an integer")
    length_penalty = payload.get("length_penalty", 1)
    if not _is_number(length_penalty):
        raise RequestError("length_penalty", "length_penalty must be a finite float")

    params = SamplingParams(
        tokens_to_generate=tokens_to_generate, return_log_probs=logprobs, temperature=float(temperature),
        top_k=top_k, top_p=top_p, top_p_decay=float(top_p_decay), top_p_bound=float(top_p_bound), add_BOS=add_BOS,
        stop_on_eol=stop_on_eol, stop_on_double_eol=stop_on_double_eol,
        prevent_newline_after_colon=prevent_newline_after_colon, random_seed=random_seed)
    return ApiRequest(prompts=prompts, params=params, beam_width=beam_width, stop_token=stop_token,
                      length_penalty=float(length_penalty), no_log=no_log)


def _model(payload: dict) -> Optional[str]:
    model = payload.get("model", None)
    if model is not None and not isinstance(model, str):
        raise RequestError("model", "model must be a string")
    return model


def _stop(payload: dict) -> List[str]:
    stop = payload.get("stop", None)
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("stop", "stop must be a string or a list of strings")
    if len(stop) > 4 or any(s == "" for s in stop):
        raise RequestError("stop", "stop takes at most 4 non-empty strings")
    return stop


def _include_usage(payload: dict, stream: bool) -> bool:
    options = payload.get("stream_options", None)
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options", "stream_options is only allowed with stream=true")
    if not isinstance(options, dict):
        raise RequestError("stream_options", "stream_options must be an object")
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise RequestError("stream_options", f"unknown stream_options field(s): {', '.join(sorted(unknown))}")
    return _bool(options, "include_usage", False)


def _penalty(payload: dict, name: str) -> float:
    value = payload.get(name, 0.0)
    if value is None:
        return 0.0
    if not _is_number(value) or not -2.0 <= value <= 2.0:
        raise RequestError(name, f"{name} must be a number in [-2, 2]")
    return float(value)


def _logit_bias(payload: dict) -> tuple:
    bias = payload.get("logit_bias", None)
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise RequestError("logit_bias", "logit_bias must be an object mapping token ids to a bias in [-100, 100]")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.strip().lstrip("-").isdigit()):
            raise RequestError("logit_bias", f"logit_bias key {key!r} is not a token id")
        if not _is_number(value) or not -100.0 <= value <= 100.0:
            raise RequestError("logit_bias", f"logit_bias of token {key} must be a number in [-100, 100]")
        out.append((int(key), float(value)))
    return tuple(sorted(out))


def _count(payload: dict, name: str, default: int, limit: int = MAX_CHOICES) -> int:
    value = payload.get(name, default)
    if value is None:
        return default
    if not _is_int(value) or not 1 <= value <= limit:
        raise RequestError(name, f"{name} must be an integer in [1, {limit}]")
    return value


def _sampling(payload: dict, defaults: ServerDefaults, tokens: int, return_log_probs: bool, top_logprobs: int,
              prompt_top_logprobs: bool = False) -> SamplingParams:
    """The SamplingParams of an OpenAI request (temperature 0 = greedy)."""
    temperature = payload.get("temperature", defaults.temperature)
    if temperature is None:
        temperature = defaults.temperature
    if not _is_number(temperature) or not 0.0 <= temperature <= 100.0:
        raise RequestError("temperature", "temperature must be a number in [0, 100] (0 = greedy)")
    top_p = payload.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise RequestError("top_p", "top_p must be a number in (0, 1]")
    top_k = payload.get("top_k", 0)
    if top_k is None or top_k == -1:  # -1: off, as other OpenAI-compatible servers take it
        top_k = 0
    if not _is_int(top_k) or not 0 <= top_k <= 1000:
        raise RequestError("top_k", "top_k must be an integer in [0, 1000]")
    if top_k > 1 and top_p < 1.0:
        raise RequestError("top_p", "cannot set both top_k and top_p")
    seed = payload.get("seed", None)
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise RequestError("seed", f"seed must be an integer in [0, {MAX_SEED}]")
    greedy = temperature == 0.0
    return SamplingParams(
        tokens_to_generate=tokens, return_log_probs=return_log_probs,
        temperature=1.0 if greedy else float(temperature), top_k=1 if greedy else top_k,
        # A greedy request draws nothing: its seed is dropped, so that it can share a batch.
        top_p=0.0 if (greedy or top_p >= 1.0) else float(top_p), random_seed=-1 if seed is None or greedy else seed,
        top_logprobs=top_logprobs, presence_penalty=_penalty(payload, "presence_penalty"),
        frequency_penalty=_penalty(payload, "frequency_penalty"), logit_bias=_logit_bias(payload),
        prompt_top_logprobs=prompt_top_logprobs)


def parse_completion_request(payload: Any, defaults: ServerDefaults = ServerDefaults()) -> CompletionRequest:
    """Validate the JSON body of `POST /v1/completions` (OpenAI's fields)."""
    if not isinstance(payload, dict):
        raise RequestError("body", "the request body must be a JSON object")
    model = _model(payload)
    if "prompt" not in payload:
        raise RequestError("prompt", "prompt is required (a string, a list of strings or a list of token ids)")
    prompt = payload["prompt"]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise RequestError("prompt", "prompt must be a string, a non-empty list of strings, or token ids")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError("prompt", f"Maximum number of prompts is {MAX_PROMPTS}")
    suffix = payload.get("suffix", None)
    if suffix not in (None, ""):
        raise RequestError("suffix", "suffix (fill-in-the-middle) is not supported: this model only continues "
                                     "text; put everything in prompt and leave suffix out")
    stream = _bool(payload, "stream", False)
    n = _count(payload, "n", 1)
    best_of = _count(payload, "best_of", n)
    if best_of < n:
        raise RequestError("best_of", f"best_of ({best_of}) must be at least n ({n})")
    if stream and best_of > n:
        raise RequestError("best_of", "best_of > n cannot be streamed (the best rows are known only at the end)")
    if len(prompts) * best_of > MAX_CHOICES:
        raise RequestError("n" if best_of == n else "best_of",
                           f"{len(prompts)} prompt(s) × {best_of} rows exceed the limit of {MAX_CHOICES} rows a request")
    max_tokens = payload.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if not _is_int(max_tokens) or max_tokens < 0:
        raise RequestError("max_tokens", "max_tokens must be an integer >= 0")
    echo = _bool(payload, "echo", False)
    logprobs = payload.get("logprobs", None)
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= 20):
        raise RequestError("logprobs", "logprobs must be an integer between 0 and 20 (or null)")
    if max_tokens == 0 and not (echo and logprobs is not None):
        raise RequestError("max_tokens", "max_tokens=0 scores the prompt and needs echo=true and logprobs")
    if max_tokens == 0 and best_of > 1:
        raise RequestError("n", "max_tokens=0 scores the prompt once; n and best_of must be 1")
    params = _sampling(payload, defaults, max_tokens,
                       return_log_probs=logprobs is not None or max_tokens == 0 or best_of > n,
                       top_logprobs=logprobs or 0, prompt_top_logprobs=echo and bool(logprobs))
    return CompletionRequest(prompts=prompts, params=params, echo=echo, logprobs=logprobs, stop=_stop(payload),
                             stream=stream, n=n, best_of=best_of, include_usage=_include_usage(payload, stream),
                             model=model)


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def _message_text(content, index: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError("messages", f"message {index}: only text content parts are supported "
                                               "({\"type\": \"text\", \"text\": ...})")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise RequestError("messages", f"message {index}: content must be a string or a list of text parts")


def parse_chat_request(payload: Any, defaults: ServerDefaults = ServerDefaults()) -> ChatRequest:
    """Validate the JSON body of `POST /v1/chat/completions` (OpenAI's fields)."""
    if not isinstance(payload, dict):
        raise RequestError("body", "the request body must be a JSON object")
    model = _model(payload)
    messages = payload.get("messages", None)
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError("messages", f"message {i} must be an object with a role and content")
        if message["role"] not in CHAT_ROLES:
            raise RequestError("messages", f"message {i} has role {message['role']!r}; one of {', '.join(CHAT_ROLES)}")
        clean.append({**message, "content": _message_text(message.get("content"), i)})
    for unsupported in ("tools", "functions", "response_format"):
        if payload.get(unsupported) not in (None, [], {"type": "text"}):
            raise RequestError(unsupported, f"{unsupported} is not supported by this server; leave it out")
    stream = _bool(payload, "stream", False)
    n = _count(payload, "n", 1)
    max_tokens = payload.get("max_completion_tokens", None)
    field = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, field = payload.get("max_tokens", None), "max_tokens"
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise RequestError(field, f"{field} must be an integer >= 1")
    logprobs = _bool(payload, "logprobs", False) if payload.get("logprobs") is not None else False
    top_logprobs = payload.get("top_logprobs", None)
    if top_logprobs is not None:
        if not _is_int(top_logprobs) or not 0 <= top_logprobs <= 20:
            raise RequestError("top_logprobs", "top_logprobs must be an integer between 0 and 20")
        if not logprobs:
            raise RequestError("top_logprobs", "top_logprobs needs logprobs=true")
    params = _sampling(payload, defaults, max_tokens or 1, return_log_probs=logprobs,
                       top_logprobs=top_logprobs or 0)
    return ChatRequest(messages=clean, params=params, max_tokens=max_tokens, logprobs=logprobs,
                       top_logprobs=top_logprobs or 0, stop=_stop(payload), stream=stream, n=n,
                       include_usage=_include_usage(payload, stream), model=model)
