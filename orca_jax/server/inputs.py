"""API requests -> engine requests: prompt token ids and SamplingParams, validated up front.

Both front ends (gRPC and HTTP) go through `prepare()`, so a bad request is refused with a
message naming the offending field before it reaches the engine thread. The numbers are
checked once, by `SamplingParams` (every value that passes fits the step's device arrays);
the engine checks lengths again (it is the authority); doing it here as well gives
API-shaped messages (`max_tokens: ...`) and keeps malformed requests off the engine's command
queue. `prepare_async` runs it in a worker thread: tokenizing a 1 MiB prompt takes about a
second, during which the event loop must keep streaming everyone else's tokens.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
from typing import Sequence

from ..request import SamplingParams, is_int, valid_unicode
from ..structured import Structured
from ..tokenizer import Tokenizer

MAX_REQUEST_ID_CHARS = 256  # a client's own request id (gRPC `request_id`)


class InvalidArgument(ValueError):
    """A request field is wrong: gRPC INVALID_ARGUMENT, HTTP 400. `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request must fit in; read from the running engine."""

    max_model_len: int            # prompt + max_tokens tokens per KV slot
    vocab_size: int               # valid token ids are [0, vocab_size)
    max_request_bytes: int        # serialized request (gRPC) or body (HTTP) size limit


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params(fields: dict) -> SamplingParams:
    """SamplingParams(**fields); its ValueError (which starts with the field name) becomes an
    InvalidArgument for that field."""
    unknown = sorted(set(fields) - set(SAMPLING_FIELDS))
    if unknown:
        raise InvalidArgument(unknown[0], "unknown sampling parameter")
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        msg = str(e)
        field = msg.split(" ", 1)[0]
        if field not in SAMPLING_FIELDS:
            field = "sampling"
        raise InvalidArgument(field, msg.removeprefix(field).strip()) from None


def prompt_ids(tokenizer: Tokenizer, limits: Limits, text: str | None,
               ids: Sequence[int] | None, *, text_field: str = "prompt",
               ids_field: str = "prompt_token_ids", add_special_tokens: bool = True,
               truncate: bool = False) -> tuple[list[int], str]:
    """The prompt's token ids and the field they came from. Exactly one of text/ids. Text is
    encoded with the tokenizer's special tokens (BOS, ...) unless `add_special_tokens` is False.
    A prompt to be truncated may be longer than the context (up to the body size limit)."""
    if text and ids:
        raise InvalidArgument(text_field, f"give either {text_field} or {ids_field}, not both")
    if ids:
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < limits.vocab_size)]
        if bad:
            raise InvalidArgument(ids_field, f"token ids {bad[:5]} are outside the vocabulary "
                                  f"[0, {limits.vocab_size})")
        return [int(t) for t in ids], ids_field
    if not text:
        raise InvalidArgument(text_field, "the prompt is empty: give prompt text or token ids")
    if not valid_unicode(text):
        raise InvalidArgument(text_field, "is not valid Unicode (it holds a lone surrogate)")
    most = limits.max_model_len * (tokenizer.max_token_bytes or len(text))
    if len(text) > most and not truncate:  # characters <= bytes: it cannot fit, whatever it tokenizes to
        raise InvalidArgument(text_field, f"the prompt is {len(text)} characters; the maximum "
                              f"context length is {limits.max_model_len} tokens of at most "
                              f"{most // limits.max_model_len} bytes each")
    out = tokenizer.encode(text, add_special_tokens)
    if not out:
        raise InvalidArgument(text_field, "the prompt encodes to zero tokens")
    return out, text_field


def fit_length(limits: Limits, tokens: list[int], params: SamplingParams, prompt_field: str,
               truncate: int | None = None, over_field: str | None = None) -> tuple[list[int], SamplingParams]:
    """vLLM's length rule: `truncate` (truncate_prompt_tokens) keeps the prompt's last k tokens
    (-1: as many as leave room for one new token); `max_tokens` alone may not exceed the
    context, nor may the prompt; otherwise `max_tokens` is cut to the room the prompt leaves
    (the request is answered, finishing with "length"). Orca then reserves prompt + max_tokens
    positions at admission. `over_field` names a prompt over the context (vLLM's HTTP says
    `input_tokens`; default: the prompt's field)."""
    L = limits.max_model_len
    if truncate is not None:
        if not is_int(truncate) or not -1 <= truncate <= L:
            raise InvalidArgument("truncate_prompt_tokens", f"must be -1 or an integer in [0, {L}] "
                                  f"(the maximum context length), got {truncate!r}")
        keep = L - 1 if truncate == -1 else truncate
        if keep == 0:
            raise InvalidArgument("truncate_prompt_tokens", "keeps no prompt token; use at least 1")
        tokens = tokens[-keep:]
    if params.max_tokens > L:
        raise InvalidArgument("max_tokens", f"max_tokens={params.max_tokens} cannot be greater than "
                              f"the maximum context length of {L} tokens")
    n_prompt = len(tokens)
    if n_prompt > L:
        raise InvalidArgument(over_field or prompt_field, f"the prompt is {n_prompt} tokens; the "
                              f"maximum context length is {L} tokens, even without any output tokens")
    if n_prompt == L:
        raise InvalidArgument("max_tokens", f"must be at least 1, got 0: the {n_prompt}-token prompt "
                              f"fills the maximum context length of {L} tokens")
    if n_prompt + params.max_tokens > L:
        room = L - n_prompt
        params = dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids),
                      ("logit_bias", [t for t, _ in params.logit_bias])):
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidArgument(name, f"token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    return tokens, params


def prepare(tokenizer: Tokenizer, limits: Limits, text: str | None, ids: Sequence[int] | None,
            fields: dict, *, text_field: str = "prompt", ids_field: str = "prompt_token_ids",
            truncate: int | None = None, over_field: str | None = None) -> tuple[list[int], SamplingParams]:
    """Validated (prompt token ids, SamplingParams) or InvalidArgument naming the field."""
    params = sampling_params(fields)
    tokens, field = prompt_ids(tokenizer, limits, text, ids, text_field=text_field, ids_field=ids_field,
                               truncate=truncate is not None)
    tokens, params = fit_length(limits, tokens, params, field, truncate, over_field)
    params.stop_automaton  # built here, in a worker thread, not on the engine thread
    return tokens, params


STRUCTURED_OPTIONS = ("json", "regex", "choice", "grammar", "json_object")


def structured_from_body(body: dict) -> tuple[Structured | None, str]:
    """An OpenAI/vLLM request body's constraint and the field it came from: vLLM's
    `structured_outputs` ({json | regex | choice | grammar | json_object}), overridden by a
    `response_format` of type json_object or json_schema (vLLM's rule)."""
    so, fmt = body.get("structured_outputs"), body.get("response_format")
    out, field = None, "structured_outputs"
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidArgument(field, "must be an object with one of " + ", ".join(STRUCTURED_OPTIONS))
        # JSON is always compact here (structured.py): disable_any_whitespace true says so.
        extra = sorted(k for k, v in so.items() if k not in STRUCTURED_OPTIONS and v is not None
                       and not (k == "disable_any_whitespace" and v is True))
        if extra:
            raise InvalidArgument(f"{field}.{extra[0]}", "is not supported")
        given = [k for k in STRUCTURED_OPTIONS if so.get(k) is not None]
        if len(given) != 1:
            raise InvalidArgument(field, f"give exactly one of {', '.join(STRUCTURED_OPTIONS)}; got {given or 'none'}")
        out = _one(field, given[0], so[given[0]])
    if fmt is not None:
        field = "response_format"
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            out = Structured("json_object")
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            schema = js.get("schema", js.get("json_schema")) if isinstance(js, dict) else None
            if schema is None:
                raise InvalidArgument(field, "type json_schema needs json_schema.schema")
            out = _one(field, "json", schema)
        elif kind != "text":
            raise InvalidArgument(field, "type must be text, json_object or json_schema")
    return out, field


def _one(field: str, kind: str, value) -> Structured:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidArgument(field, f"the JSON schema is not JSON ({e})") from None
        if not isinstance(value, (dict, bool)):
            raise InvalidArgument(field, "the JSON schema must be an object")
        return Structured("json", json.dumps(value, separators=(",", ":"), sort_keys=True))
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidArgument(field, "choice must be a non-empty list of non-empty strings")
        return Structured("choice", json.dumps(value))
    if kind == "json_object":
        if value is not True:
            raise InvalidArgument(field, "json_object must be true")
        return Structured("json_object")
    if not isinstance(value, str) or not value:
        raise InvalidArgument(field, f"{kind} must be a non-empty string")
    return Structured(kind, value)


def render_chat(template, messages, add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> str:
    """The messages rendered with `template` (a chat.ChatTemplate); its errors as
    InvalidArgument naming the field."""
    from ..chat import ChatError
    try:
        return template.render(messages, add_generation_prompt, **(template_kwargs or {}))
    except ChatError as e:
        raise InvalidArgument(e.field, str(e).removeprefix(e.field + ": ")) from None


def prepare_chat(tokenizer: Tokenizer, limits: Limits, template, messages, fields: dict, *,
                 add_generation_prompt: bool = True,
                 template_kwargs: dict | None = None) -> tuple[list[int], SamplingParams, str]:
    """A chat request: the messages rendered with `template` (a chat.ChatTemplate), then
    validated and tokenized like a completions prompt (no special tokens added: the template
    writes them, as transformers' apply_chat_template). Without `max_tokens` the output may
    fill the rest of the context (vLLM's chat default; completions' default stays 16).
    Returns (ids, params, the prompt text)."""
    params = sampling_params(fields)  # field errors first, as for completions
    text = render_chat(template, messages, add_generation_prompt, template_kwargs)
    if not text:
        raise InvalidArgument("messages", "the chat template rendered an empty prompt")
    # The template wrote the special tokens (transformers encodes it without adding more).
    tokens, field = prompt_ids(tokenizer, limits, text, None, text_field="messages", add_special_tokens=False)
    if fields.get("max_tokens") is None and len(tokens) < limits.max_model_len:
        params = sampling_params({**fields, "max_tokens": limits.max_model_len - len(tokens)})
    tokens, params = fit_length(limits, tokens, params, field)
    params.stop_automaton  # built here, in a worker thread, not on the engine thread
    return tokens, params, text


# Tokenizing has threads of its own: long prompts queue here, not in front of the event loop's
# other work in the default executor (JSON bodies).
_PREPARE = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="orca-prepare")


async def in_prepare_pool(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a tokenizing thread (the `tokenizers` encoder releases the GIL)."""
    return await asyncio.get_running_loop().run_in_executor(_PREPARE, functools.partial(fn, *args, **kwargs))


async def prepare_async(*args, **kwargs) -> tuple[list[int], SamplingParams]:
    """`prepare` in a worker thread."""
    return await in_prepare_pool(prepare, *args, **kwargs)


async def prepare_chat_async(*args, **kwargs) -> tuple[list[int], SamplingParams, str]:
    """`prepare_chat` in a worker thread (rendering a long conversation is not free either)."""
    return await in_prepare_pool(prepare_chat, *args, **kwargs)


def tokenize(tokenizer: Tokenizer, template, body: dict) -> dict:
    """vLLM's POST /tokenize: a `prompt` (special tokens added unless `add_special_tokens` is
    false) or chat `messages` rendered with `template` (none added unless asked; the
    generation prompt unless `add_generation_prompt` is false). Returns the ids, their count
    and, with `return_token_strs`, each id's vocabulary string."""
    flags = {k: body.get(k) for k in ("add_special_tokens", "add_generation_prompt", "return_token_strs")}
    for k, v in flags.items():
        if v is not None and not isinstance(v, bool):
            raise InvalidArgument(k, "must be a boolean")
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise InvalidArgument("prompt", "give either prompt (a string) or messages")
    if messages is not None:
        if template is None:
            raise InvalidArgument("messages", "this server has no chat template")
        if not isinstance(messages, list) or not messages:
            raise InvalidArgument("messages", "must be a non-empty list of {role, content} messages")
        prompt = render_chat(template, messages, flags["add_generation_prompt"] is not False)
        special = flags["add_special_tokens"] is True
    else:
        if not isinstance(prompt, str):
            raise InvalidArgument("prompt", "must be a string")
        if not valid_unicode(prompt):
            raise InvalidArgument("prompt", "is not valid Unicode (it holds a lone surrogate)")
        special = flags["add_special_tokens"] is not False
    ids = tokenizer.encode(prompt, special) if prompt else []
    strs = [tokenizer.token_string(i) for i in ids] if flags["return_token_strs"] else None
    return {"tokens": ids, "count": len(ids), "token_strs": strs}


def detokenize(tokenizer: Tokenizer, limits: Limits, body: dict) -> dict:
    """vLLM's POST /detokenize: `tokens` (ids) -> their text, special tokens skipped."""
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(is_int(t) for t in ids):
        raise InvalidArgument("tokens", "must be a list of token ids")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise InvalidArgument("tokens", f"token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    return {"prompt": tokenizer.decode(ids)}
