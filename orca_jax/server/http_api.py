"""HTTP on an optional port: OpenAI-compatible completions, models, health, metrics (aiohttp).

    POST /v1/completions   OpenAI legacy completions, streaming (SSE) and not, with `usage`,
                           `logprobs`, `stop`, `seed`, `n`, several prompts, and vLLM's extra
                           sampling fields (top_k, min_p, repetition_penalty, ignore_eos, ...)
    POST /v1/chat/completions  OpenAI chat: `messages` rendered with the model's chat template
                           (orca_jax/chat.py, or --chat-template), then the completions path;
                           400 when there is no template
    GET  /v1/models        the served model
    GET  /health           200, or 503 when the engine loop is dead, stuck or draining
    GET  /metrics          Prometheus text format, vLLM metric names (metrics.py)

Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with 400 (bad
field, named in `param` and at the start of `message`), 429 (queue full), 503 (draining or
dead) and 500 (the engine failed the request). A client that disconnects aborts its requests:
the runner is created with `handler_cancellation=True`, so aiohttp cancels the handler.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid

from aiohttp import web

from ..request import MAX_LOGPROBS, FinishReason, RequestOutput, is_int
from .. import __version__
from ..scoring import PromptScorer
from ..structured import GrammarError
from .inputs import InvalidArgument, structured_from_body, detokenize, in_prepare_pool, prepare_async, prepare_chat_async, tokenize
from .stream import classify

log = logging.getLogger("orca_jax.server")

# OpenAI/vLLM body fields that become SamplingParams (which checks their types and ranges).
# Unknown fields are ignored, as vLLM does, so clients that send OpenAI-only fields (`user`,
# ...) keep working.
SAMPLING_BODY = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
                 "ignore_eos", "min_tokens", "logprobs", "include_stop_str_in_output", "logit_bias",
                 "allowed_token_ids")
# pydantic's lax mode, as vLLM's request models parse their fields: "8" and 8.0 are 8, "0.5"
# is 0.5, "true"/"on"/1 are True. A value that does not convert is left for the field's check.
LAX_INT = ("max_tokens", "max_completion_tokens", "top_k", "seed", "min_tokens", "n", "best_of",
           "prompt_logprobs", "truncate_prompt_tokens", "top_logprobs")
LAX_FLOAT = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty")
LAX_BOOL = ("stream", "echo", "ignore_eos", "include_stop_str_in_output", "return_token_ids",
            "return_tokens_as_token_ids", "use_beam_search", "add_generation_prompt")
_TRUE, _FALSE = ("1", "on", "t", "true", "y", "yes"), ("0", "off", "f", "false", "n", "no")
MAX_N = 16            # samples of one prompt
MAX_CHOICES = 128     # prompts x n in one request


OPENAI_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               408: "timeout_error", 415: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error" if status < 500
                                             else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def _invalid(field: str, message: str) -> HttpError:
    return HttpError(400, str(InvalidArgument(field, message)), field)


def _from_exception(e: BaseException) -> HttpError:
    if isinstance(e, HttpError):
        return e
    if isinstance(e, InvalidArgument):
        return HttpError(400, str(e), e.field)
    return HttpError(classify(e).http_status, str(e), None)


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error leaves as OpenAI's JSON error body: aiohttp's own (404 for an unknown path,
    405, 413) and, as a last resort, an unexpected exception (500, logged)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if isinstance(e, (web.HTTPNotFound, web.HTTPMethodNotAllowed)):  # no route: FastAPI's body,
            return web.json_response({"detail": e.reason}, status=e.status)  # as vLLM answers
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return web.json_response(HttpError(e.status, message).body(), status=e.status)
    except HttpError as e:
        resp = web.json_response(e.body(), status=e.status)
        if e.status == 408:  # the rest of the body may still trickle in: do not wait for it
            resp.force_close()
        return resp
    except Exception as e:
        log.error("unexpected error in %s %s", request.method, request.path, exc_info=e)
        return web.json_response(HttpError(500, f"internal error: {type(e).__name__}").body(),
                                 status=500)


@web.middleware
async def request_id_header(request: web.Request, handler):
    """A request's `X-Request-Id` comes back on its response (a stream sets it itself, before
    its headers leave)."""
    resp = await handler(request)
    rid = request.headers.get("X-Request-Id")
    if rid and not resp.prepared:
        resp.headers["X-Request-Id"] = rid
    return resp


@dataclasses.dataclass(frozen=True)
class _Show:
    """What a completions choice shows besides its new text (vLLM's fields)."""

    echo: bool = False          # the prompt's text (and, with logprobs, its logprobs) first
    prompt_only: bool = False   # echo with max_tokens 0: the prompt alone (scoring)
    token_ids: bool = False     # return_token_ids: `prompt_token_ids` and `token_ids`
    as_ids: bool = False        # return_tokens_as_token_ids: logprob tokens as "token_id:N"
    prompts: tuple[tuple[list[int], str | None], ...] = ()  # per choice: prompt ids, echoed text
    prompt_lps: tuple[list[dict | None], ...] = ()  # per choice: its prompt's logprobs, when asked
    best_of: int = 1            # samples drawn per prompt; the `n` most likely are returned
    hide_logprobs: bool = False  # logprobs were asked only to rank best_of's samples


def _best_of(results: list[list[RequestOutput]], n: int, best_of: int) -> list[int]:
    """The jobs to report: of each prompt's `best_of` samples (consecutive jobs), the `n` with
    the highest cumulative log-probability, best first (OpenAI's and vLLM V0's best_of)."""
    picked = []
    for start in range(0, len(results), best_of):
        score = lambda j: sum(lp["logprob"] for p in results[j] for lp in (p.logprobs or ()))
        picked += sorted(range(start, start + best_of), key=score, reverse=True)[:n]
    return picked


def _fingerprint(engine) -> str:
    """vLLM's `system_fingerprint` ("vllm-<version>-<8 hex>"), ours: this package's version and
    a hash of what decides the outputs (the model's config, the engine's sampling-relevant
    settings), so a client can tell when the backend changed."""
    c = engine.model_config
    config = c.to_json() if hasattr(c, "to_json") else repr(c)
    what = f"{config}|{getattr(engine.config, 'matmul_precision', '')}|{engine.max_len}"
    return f"orca-jax-{__version__}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


def _engine_id(cid: str, i: int) -> str:
    """The engine's id for choice `i` of response `cid`: unique even when a client sends the
    same request id twice."""
    return f"{cid}-{i}-{uuid.uuid4().hex[:8]}"


def _sampling_fields(body: dict) -> dict:
    fields = {k: body[k] for k in SAMPLING_BODY if body.get(k) is not None}  # null: the default
    if fields.get("top_k") == -1:  # vLLM spells "off" as -1; ours is 0
        fields["top_k"] = 0
    return fields


def _parse_body(raw: bytes) -> dict:
    """The JSON object of a request body, or a 400 naming `body`. Strict JSON: the NaN and
    Infinity literals Python accepts are refused (no sampling field may be non-finite)."""
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number (numbers must be finite)")
    try:  # strict UTF-8 first: json.loads(bytes) lets encoded surrogates through
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except RecursionError:
        raise HttpError(400, "body: JSON nested too deeply", "body") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the literals above
        raise HttpError(400, f"body: not valid JSON ({e})", "body") from None
    if not isinstance(body, dict):
        raise HttpError(400, "body: must be a JSON object", "body")
    return body


def _lax_int(v):
    if isinstance(v, str):
        try:
            v = float(v.strip()) if "." in v or "e" in v.lower() else int(v.strip())
        except ValueError:
            return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _lax_float(v):
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return v
    return v


def _lax_bool(v):
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    if is_int(v) and v in (0, 1) or isinstance(v, float) and v in (0.0, 1.0):
        return bool(v)
    return v


def _lax(body: dict, logprobs_kind: str) -> dict:
    """The body with vLLM's (pydantic's lax) conversions of its scalar fields; `logprobs` is an
    integer on completions ("int") and a boolean on chat ("bool")."""
    out = dict(body)
    kinds = [(LAX_INT, _lax_int), (LAX_FLOAT, _lax_float), (LAX_BOOL, _lax_bool),
             (("logprobs",), _lax_int if logprobs_kind == "int" else _lax_bool)]
    for names, convert in kinds:
        for k in names:
            if out.get(k) is not None:
                out[k] = convert(out[k])
    return out


def _flag(body: dict, name: str) -> bool:
    """A boolean body field (null: false), or a 400 naming it."""
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _invalid(name, "must be a boolean")
    return v


def _best_of_field(body: dict, n: int, stream: bool) -> int:
    """Completions' `best_of`: samples drawn per prompt (default n), at least n."""
    best_of = body.get("best_of")
    if best_of is None:
        return n
    if not is_int(best_of) or not n <= best_of <= MAX_N:
        raise _invalid("best_of", f"must be an integer in [n, {MAX_N}] (n = {n}), got {json.dumps(best_of)[:40]}")
    if best_of > n and stream:
        raise _invalid("best_of", "cannot be used with stream (the best samples are known only at the end)")
    if body.get("temperature") == 0:  # greedy samples are all the same: the first n are the best
        return n
    return best_of


def _prompt_logprobs(body: dict, show: _Show, stream: bool) -> int | None:
    """How many alternatives each prompt token's log-probability comes with, or None when the
    request wants none: vLLM's `prompt_logprobs`, or `logprobs` with `echo`."""
    top = body.get("prompt_logprobs")
    if top is not None:
        if not is_int(top) or not 0 <= top <= MAX_LOGPROBS:
            raise _invalid("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got "
                                              f"{json.dumps(top)[:40]}")
        if stream and top > 0:
            raise _invalid("prompt_logprobs", "prompt_logprobs are not available when stream is true")
        return top
    lp = body.get("logprobs")
    return lp if show.echo and is_int(lp) and 0 <= lp <= MAX_LOGPROBS else None


def _prompts(body: dict) -> list[tuple[str | None, list[int] | None]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of ids, a list of id lists."""
    p = body.get("prompt")
    if p is None or p == "" or p == []:
        raise _invalid("prompt", "the prompt is empty: give text or token ids")
    if isinstance(p, str):
        return [(p, None)]
    if isinstance(p, list):
        if all(is_int(x) for x in p):
            return [(None, p)]
        if all(isinstance(x, str) for x in p):
            return [(x, None) for x in p]
        if all(isinstance(x, list) and all(is_int(t) for t in x) for x in p):
            return [(None, x) for x in p]
    raise _invalid("prompt", "must be a string, a list of strings, a list of token ids or a list "
                             "of token-id lists")


class CompletionsAPI:
    def __init__(self, server):
        self.server = server  # the owning Server: engine, tokenizer, limits, metrics, names
        self._scorer = PromptScorer(server.engine.engine)  # prompt logprobs (echo, prompt_logprobs)
        self.fingerprint = _fingerprint(server.engine.engine)  # vLLM's system_fingerprint

    # -- routes ---------------------------------------------------------------------------------

    def app(self, middlewares=()) -> web.Application:
        app = web.Application(client_max_size=self.server.limits.max_request_bytes,
                              middlewares=[request_id_header, json_errors, *middlewares])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)   # vLLM's (SageMaker's) name for it, GET and POST
        app.router.add_post("/ping", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/version", self.version)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        return app

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize (vLLM's): a prompt or chat messages -> token ids, as generation
        would see them."""
        s = self.server
        body = await self._body(request)
        self._check_model(body)
        try:
            out = await in_prepare_pool(tokenize, s.tokenizer, s.chat, body)
        except InvalidArgument as e:
            raise HttpError(400, str(e), e.field) from None
        return web.json_response({"count": out["count"], "max_model_len": s.limits.max_model_len,
                                  "tokens": out["tokens"], "token_strs": out["token_strs"]})

    async def detokenize(self, request: web.Request) -> web.Response:
        """POST /detokenize (vLLM's): token ids -> text."""
        s = self.server
        body = await self._body(request)
        self._check_model(body)
        try:
            return web.json_response(await in_prepare_pool(detokenize, s.tokenizer, s.limits, body))
        except InvalidArgument as e:
            raise HttpError(400, str(e), e.field) from None

    async def health(self, request: web.Request) -> web.Response:
        problem = self.server.health_problem()
        if problem is None:
            return web.Response(text="ok\n")
        return web.json_response({"status": "unhealthy", "reason": problem}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return web.Response(body=self.server.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        s = self.server
        return web.json_response({"object": "list", "data": [{
            "id": s.model_name, "object": "model", "created": s.started_at, "owned_by": "orca-jax",
            "root": s.model_name, "parent": None, "max_model_len": s.limits.max_model_len,
            "permission": [{  # OpenAI's old model_permission, as vLLM fills it
                "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
                "created": s.started_at, "allow_create_engine": False, "allow_sampling": True,
                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}]}]})

    # -- /v1/completions ------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict:
        c = self.server.config
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):  # a 1 MB gzip bomb inflates on the event loop
            raise HttpError(415, f"body: Content-Encoding {encoding!r} is not accepted; send the "
                                 "body uncompressed", "body")
        try:
            async with asyncio.timeout(c.body_timeout_s):  # a client trickling its body
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(400, f"body: the request body is over the server's limit of "
                                 f"{c.max_request_bytes} bytes (--max-request-bytes)", "body") from None
        except TimeoutError:
            raise HttpError(408, f"body: not received within {c.body_timeout_s:.0f} s",
                            "body", "timeout_error") from None
        return await asyncio.to_thread(_parse_body, raw)  # a 1 MiB body: off the event loop

    @staticmethod
    def _request_id(request: web.Request, body: dict) -> str:
        """The response id's suffix, as vLLM takes it: the `X-Request-Id` header, else the
        body's `request_id`, else a fresh one. Clients may reuse theirs: engine ids stay unique."""
        rid = request.headers.get("X-Request-Id") or body.get("request_id")
        if rid is None:
            return uuid.uuid4().hex
        if not isinstance(rid, str) or not rid or len(rid) > 256:
            raise _invalid("request_id", "must be a non-empty string of at most 256 characters")
        return rid

    def _check_model(self, body: dict) -> None:
        s = self.server
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _invalid("model", "must be a string")
        if model is not None and model != s.model_name:
            raise HttpError(404, f"model: {model!r} is not served here; this server serves "
                                 f"{s.model_name!r}", "model", "not_found_error")

    @staticmethod
    def _common(body: dict) -> tuple[int, bool, bool]:
        """(n, stream, stream_options.include_usage): the fields completions and chat share."""
        if body.get("allowed_token_ids") == []:
            raise _invalid("allowed_token_ids", "must not be empty (leave it out to allow every token)")
        n = body.get("n", 1) if body.get("n") is not None else 1
        if not is_int(n) or not 1 <= n <= MAX_N:
            raise _invalid("n", f"must be an integer in [1, {MAX_N}], got {json.dumps(n)[:40]}")
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise _invalid("best_of", "is not supported (only best_of == n)")
        if _flag(body, "use_beam_search"):
            raise _invalid("use_beam_search", "beam search is not supported; sample with n and seed")
        stream = _flag(body, "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise _invalid("stream_options", "must be an object")
        if opts and not stream:  # vLLM's rule
            raise _invalid("stream_options", "can only be given when stream is true")
        return n, stream, bool(opts.get("include_usage"))

    @staticmethod
    def _samples(tokens: list[int], params, n: int, field: str = "n") -> list[tuple[list[int], object]]:
        """n samples of one prompt: distinct seeds when one is given. Greedy samples would all
        be the same: n > 1 (`field`: n or best_of) needs a temperature (vLLM refuses it too)."""
        if n > 1 and params.temperature == 0:
            raise _invalid(field, f"must be 1 when using greedy sampling (temperature 0), got {n}")
        return [(tokens, params if j == 0 or params.seed is None else
                 dataclasses.replace(params, seed=(params.seed + j) % 2**63)) for j in range(n)]

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions (an HttpError raised anywhere here: json_errors answers it)."""
        s = self.server
        body = _lax(await self._body(request), "int")
        self._check_model(body)
        if body.get("suffix"):
            raise _invalid("suffix", "is not supported")
        n, stream, include_usage = self._common({**body, "best_of": None})
        best_of = _best_of_field(body, n, stream)
        show = _Show(echo=_flag(body, "echo"), token_ids=_flag(body, "return_token_ids"),
                     as_ids=_flag(body, "return_tokens_as_token_ids"), best_of=best_of)
        fields = _sampling_fields(body)
        if best_of > n and fields.get("logprobs") is None:  # the ranking needs each token's logprob
            fields["logprobs"] = 0
            show = dataclasses.replace(show, hide_logprobs=True)
        fields["structured"] = await self._structured(body)
        if show.echo and fields.get("max_tokens") == 0:  # scoring: the prompt alone (vLLM runs 1)
            show = dataclasses.replace(show, prompt_only=True)
            fields["max_tokens"] = 1
        prompts = _prompts(body)
        if len(prompts) * best_of > MAX_CHOICES:
            raise _invalid("prompt", f"{len(prompts)} prompts x {best_of} samples make {len(prompts) * best_of} "
                                     f"choices; one request may have at most {MAX_CHOICES}")
        jobs, shown = [], []  # per choice: (prompt token ids, params), (prompt ids, echoed text)
        truncated = body.get("truncate_prompt_tokens") is not None
        for text, ids in prompts:
            try:
                tokens, params = await prepare_async(s.tokenizer, s.limits, text, ids, fields,
                                                     ids_field="prompt", over_field="input_tokens",
                                                     truncate=body.get("truncate_prompt_tokens"))
            except InvalidArgument as e:
                raise HttpError(400, str(e), e.field) from None
            echoed = None
            if show.echo:  # vLLM echoes the prompt as generation saw it; "" with return_token_ids
                echoed = ("" if show.token_ids else text if text is not None and not truncated
                          else await in_prepare_pool(s.tokenizer.decode, tokens))
            jobs += self._samples(tokens, params, best_of, "best_of" if best_of > n else "n")
            shown += [(tokens, echoed)] * best_of
        cid = f"cmpl-{self._request_id(request, body)}"
        created = int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": s.model_name}
        show = dataclasses.replace(show, prompts=tuple(shown))
        top = _prompt_logprobs(body, show, stream)
        if top is not None:  # scored before any is submitted: a refusal costs no generation
            scored = await self._score([t for t, _ in shown[::best_of]], top)
            show = dataclasses.replace(show, prompt_lps=tuple(lp for lp in scored for _ in range(best_of)))
        if stream:
            return await self._stream(request, jobs, n, cid, head, include_usage, show=show)
        return await self._complete(jobs, n, cid, head, show=show)

    # -- /v1/chat/completions -------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions: the messages rendered with the chat template (chat.py),
        then the completions path (validation, submission, aborts, stops) with chat's shapes."""
        s = self.server
        body = _lax(await self._body(request), "bool")
        self._check_model(body)
        if s.chat is None:
            raise HttpError(400, s.chat_problem or "model: this server has no chat template "
                                 "(start it with --chat-template FILE)", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _invalid("messages", "is required: a non-empty list of {role, content} messages")
        for key in ("tools", "functions"):
            if body.get(key):
                raise _invalid(key, "is not supported (no tool calling)")
        n, stream, include_usage = self._common(body)
        fields = _sampling_fields({**body, "logprobs": None})
        fields["structured"] = await self._structured(body)
        mct = body.get("max_completion_tokens")
        if mct is not None:  # OpenAI's newer name; it wins over the deprecated max_tokens
            fields["max_tokens"] = mct
        want_lp, top = body.get("logprobs"), body.get("top_logprobs")
        if want_lp is not None and not isinstance(want_lp, bool):
            raise _invalid("logprobs", "must be a boolean (the number of alternatives is top_logprobs)")
        if top is not None and not is_int(top):
            raise _invalid("top_logprobs", "must be an integer")
        if top and not want_lp:
            raise _invalid("top_logprobs", "needs logprobs: true")
        if want_lp:
            fields["logprobs"] = 0 if top is None else top  # SamplingParams checks the range
        add_gen = body.get("add_generation_prompt", True)
        add_gen = True if add_gen is None else add_gen
        if not isinstance(add_gen, bool):
            raise _invalid("add_generation_prompt", "must be a boolean")
        kwargs = body.get("chat_template_kwargs")
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict):
            raise _invalid("chat_template_kwargs", "must be an object")
        try:
            tokens, params, _ = await prepare_chat_async(
                s.tokenizer, s.limits, s.chat, messages, fields, add_generation_prompt=add_gen,
                template_kwargs=kwargs)
        except InvalidArgument as e:
            if e.field == "logprobs":
                raise HttpError(400, "top_logprobs" + str(e).removeprefix("logprobs"),
                                "top_logprobs") from None
            raise HttpError(400, str(e), e.field) from None
        jobs = self._samples(tokens, params, n)
        show = _Show(as_ids=_flag(body, "return_tokens_as_token_ids"))
        cid = f"chatcmpl-{self._request_id(request, body)}"
        head = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": s.model_name}
        if stream:
            return await self._stream(request, jobs, n, cid, {**head, "object": "chat.completion.chunk"},
                                      include_usage, chat=True, show=show)
        return await self._complete(jobs, n, cid, head, chat=True, show=show)

    async def _complete(self, jobs, n: int, cid: str, head: dict, chat: bool = False,
                        show: _Show = _Show()) -> web.Response:
        async def one(i, tokens, params):
            pieces: list[RequestOutput] = []
            async with contextlib.aclosing(self.server.outputs(tokens, params, _engine_id(cid, i))) as st:
                async for out in st:
                    pieces.append(out)
            return pieces

        try:
            async with asyncio.TaskGroup() as tg:  # one fails: the others are cancelled (aborted)
                tasks = [tg.create_task(one(i, t, p)) for i, (t, p) in enumerate(jobs)]
        except BaseExceptionGroup as eg:
            raise _from_exception(eg.exceptions[0]) from None
        results = [task.result() for task in tasks]  # per job: its outputs
        for pieces in results:
            if self._failure(pieces[-1]) is not None:
                raise self._failure(pieces[-1])
        choices, prompt_toks, gen_toks = [], 0, 0
        for i, j in enumerate(_best_of(results, n, show.best_of) if show.best_of > n else range(len(jobs))):
            pieces = results[j]
            last = pieces[-1]
            ids = [t for p in pieces for t in p.token_ids]
            lps = [lp for p in pieces for lp in (p.logprobs or ())]
            text, want_lp = "".join(p.text for p in pieces), jobs[j][1].logprobs is not None
            finish = OPENAI_FINISH.get(last.finish_reason)
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": self._chat_logprobs(ids, lps, show.as_ids) if want_lp else None,
                                "finish_reason": finish, "stop_reason": last.stop_reason, "token_ids": None})
            else:
                choices.append(self._choice(i, show, jobs[j][1], ids, lps, text, finish, last.stop_reason, job=j))
            if i % n == 0:  # a prompt counts once, however many samples of it (OpenAI)
                prompt_toks += last.usage.prompt_tokens
            gen_toks += last.usage.completion_tokens
        body = {**head, "choices": choices, "system_fingerprint": self.fingerprint, "usage": {
            "prompt_tokens": prompt_toks, "completion_tokens": gen_toks, "total_tokens": prompt_toks + gen_toks}}
        if chat:  # vLLM's extra fields, null unless asked (none of them can be asked here yet)
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        return web.json_response(body)

    async def _stream(self, request: web.Request, jobs, n: int, cid: str, head: dict,
                      include_usage: bool, chat: bool = False, show: _Show = _Show()) -> web.StreamResponse:
        streams = [self.server.outputs(t, p, _engine_id(cid, i)) for i, (t, p) in enumerate(jobs)]
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        async def pump(i, st):
            async for out in st:
                await queue.put((i, out))

        tasks: list[asyncio.Task] = []
        wt = self.server.config.write_timeout_s
        try:
            # The headers wait for every choice's first output, so that a failed submission
            # still gets its own status (400/429/503) instead of an error inside a 200 stream.
            try:
                async with asyncio.TaskGroup() as tg:
                    firsts = [tg.create_task(anext(st)) for st in streams]
            except BaseExceptionGroup as eg:
                raise _from_exception(eg.exceptions[0]) from None
            for i, f in enumerate(firsts):
                queue.put_nowait((i, f.result()))
            tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
            rid = {"X-Request-Id": request.headers["X-Request-Id"]} if request.headers.get("X-Request-Id") else {}
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache", **rid})
            await resp.prepare(request)
            usage, left = [], len(jobs)
            if chat:  # OpenAI and vLLM: each choice's first delta names the role
                for i in range(len(jobs)):
                    await _sse(resp, {**head, "choices": [{
                        "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}], "prompt_token_ids": None, "prompt_text": None}, wt)
            text_offset = [0] * len(jobs)  # per choice: characters of token text sent so far
            started = [False] * len(jobs)  # per choice: its first chunk (echo, prompt ids) went
            while left:
                i, out = await queue.get()
                failed = self._failure(out) if out.finished else None
                if failed is not None:
                    await _sse(resp, failed.body(), wt)
                    break
                finish = OPENAI_FINISH.get(out.finish_reason) if out.finished else None
                if chat:
                    choice = self._chat_delta(i, out, jobs[i][1], finish, show.as_ids)
                else:
                    choice = self._choice(i, show, jobs[i][1], list(out.token_ids), list(out.logprobs or ()),
                                          out.text, finish, out.stop_reason, first=not started[i],
                                          offset=text_offset[i], stream=True)
                    started[i] = True
                    if choice["logprobs"] is not None:  # offsets run on from the previous chunk's
                        text_offset[i] += sum(map(len, choice["logprobs"]["tokens"]))
                    choice.pop("prompt_logprobs")  # not streamed (vLLM refuses it with stream)
                if choice is not None:  # vLLM stamps the fingerprint on the last chunk only
                    last = {"system_fingerprint": self.fingerprint} if finish and not include_usage else {}
                    await _sse(resp, {**head, "choices": [choice], **last}, wt)
                if out.finished:
                    left -= 1
                    usage.append((i, out.usage))
            if include_usage and not left:
                p = sum(u.prompt_tokens for i, u in usage if i % n == 0)  # once per prompt
                c = sum(u.completion_tokens for _, u in usage)
                await _sse(resp, {**head, "choices": [], "usage": {
                    "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
                    "system_fingerprint": self.fingerprint}, wt)
            await _write(resp, b"data: [DONE]\n\n", wt)
            await resp.write_eof()
            return resp
        except _SlowReader:  # a client that stops reading holds no stream (and no KV slot) for long
            log.warning("HTTP stream %s: the client took no data for %.0f s; closing it", cid, wt)
            if request.transport is not None:
                request.transport.abort()
            return resp  # aiohttp's closing write_eof meets the closed transport and stops quietly
        finally:  # disconnect, cancel or error: every unfinished request is aborted
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for st in streams:
                await st.aclose()

    # -- helpers --------------------------------------------------------------------------------

    def _failure(self, out: RequestOutput) -> HttpError | None:
        failed = self.server.failure(out)
        return None if failed is None else HttpError(failed[0].http_status, failed[1])

    async def _structured(self, body: dict):
        """The request's output constraint (`structured_outputs`, overridden by a JSON
        `response_format`, as vLLM), compiled in a worker thread so that a bad one is a 400 and
        the engine thread finds it compiled; None without one."""
        try:
            structured, field = structured_from_body(body)
        except InvalidArgument as e:
            raise HttpError(400, str(e), e.field) from None
        if structured is None:
            return None
        try:
            await in_prepare_pool(self.server.engine.engine.grammars.check, structured)
        except GrammarError as e:
            raise _invalid(field, f"does not compile: {e}") from None
        return structured

    def _chat_delta(self, i: int, out: RequestOutput, params, finish: str | None, as_ids: bool) -> dict | None:
        """A chat stream's chunk of choice `i` for output `out`, or None when it brings nothing."""
        lp = None
        if params.logprobs is not None and out.token_ids:
            lp = self._chat_logprobs(list(out.token_ids), list(out.logprobs or ()), as_ids)
        if not (out.text or lp is not None or out.finished):
            return None
        stop = {"stop_reason": out.stop_reason} if finish else {}  # vLLM: on the last chunk only
        return {"index": i, "delta": {"content": out.text} if out.text else {}, "logprobs": lp,
                "finish_reason": finish, **stop, "token_ids": None}

    async def _score(self, prompts: list[list[int]], top: int) -> list[list[dict | None]]:
        """Each prompt's log-probabilities (orca_jax/scoring.py), in a worker thread."""
        why = self._scorer.supported()
        if why is not None:
            raise _invalid("prompt_logprobs", f"prompt log-probabilities are not available here: {why}")
        return [await asyncio.to_thread(self._scorer, ids, top) for ids in prompts]

    def _choice(self, i: int, show: _Show, params, ids: list[int], lps: list[dict], text: str,
                finish: str | None, stop_reason, first: bool = True, offset: int = 0,
                job: int | None = None, stream: bool = False) -> dict:
        """Completions choice `i` (or a stream's chunk of it, `first` or not), from job `job`
        (default: `i`): the new text, the echoed prompt before it in the first, and vLLM's
        extra fields."""
        job = i if job is None else job
        prompt_ids, echoed = show.prompts[job] if show.prompts else ([], None)
        prompt_lps = show.prompt_lps[job] if show.prompt_lps else None
        if show.hide_logprobs:  # asked for best_of's ranking, not by the client
            params = dataclasses.replace(params, logprobs=None)
        new_ids = ids
        if show.prompt_only:
            ids, lps, text = [], [], ""
        if show.echo and first:
            text = echoed + text
            if params.logprobs is not None:
                ids, lps = prompt_ids + ids, list(prompt_lps) + lps
        return {"index": i, "text": text,
                "logprobs": None if params.logprobs is None else self._logprobs(ids, lps, offset, show.as_ids),
                "finish_reason": finish, "stop_reason": stop_reason,
                "prompt_logprobs": None if prompt_lps is None else [
                    None if lp is None else self._prompt_entry(lp) for lp in prompt_lps],
                # vLLM's first stream chunk of an echo carries them unasked
                "prompt_token_ids": prompt_ids if first and (show.token_ids or stream and show.echo) else None,
                "token_ids": new_ids if show.token_ids else None}

    def _prompt_entry(self, lp: dict) -> dict:
        """vLLM's prompt_logprobs entry: {token id: {logprob, rank, decoded_token}} for the
        prompt's token and the top alternatives."""
        dec = self.server.token_text
        out = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": dec(t)}
               for r, (t, v) in enumerate(lp["top"].items())}
        out[str(lp["token_id"])] = {"logprob": lp["logprob"], "rank": lp["rank"],
                                    "decoded_token": dec(lp["token_id"])}
        return out

    def _logprobs(self, ids: list[int], lps: list[dict | None], start: int = 0, as_ids: bool = False) -> dict:
        """OpenAI legacy logprobs: token strings, their logprobs, top alternatives (the sampled
        token among them, first, as vLLM: `logprobs: 0` gives just it), and each token's
        offset in the completion's text (from `start`: a stream's earlier chunks). A None
        entry (an echoed prompt's first token: nothing predicts it) has null logprobs;
        `as_ids` spells every token "token_id:N" (vLLM's return_tokens_as_token_ids)."""
        dec = (lambda t: f"token_id:{t}") if as_ids else self.server.token_text
        # An echoed prompt's first token (no logprob) is decoded alone, half characters too (vLLM).
        tokens = [dec(t) if lp is not None or as_ids else self.server.tokenizer.decode([t])
                  for t, lp in zip(ids, lps)]
        offsets, pos = [], start
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens,
                "token_logprobs": [None if lp is None else max(lp["logprob"], -9999.0) for lp in lps],
                "top_logprobs": [None if lp is None else {
                    dec(lp["token_id"]): max(lp["logprob"], -9999.0),
                    **{dec(t): max(v, -9999.0) for t, v in lp["top"].items()}} for lp in lps],
                "text_offset": offsets}

    def _chat_logprobs(self, ids: list[int], lps: list[dict], as_ids: bool = False) -> dict:
        """OpenAI chat logprobs: per token its text, logprob, UTF-8 bytes and top alternatives
        (`as_ids`: each token spelled "token_id:N", vLLM's return_tokens_as_token_ids)."""
        def entry(t: int, v: float, top: bool = False) -> dict:
            # Its bytes are its text's ("" for half a character); with `as_ids` an alternative's
            # are those of "token_id:N" while the sampled token's stay its text's (vLLM's, both).
            text = self.server.token_text(t)
            token = f"token_id:{t}" if as_ids else text
            return {"token": token, "logprob": v, "bytes": list((token if top else text).encode("utf-8"))}
        return {"content": [{**entry(t, lp["logprob"]),
                             "top_logprobs": [entry(a, v, top=True) for a, v in lp["top"].items()]}
                            for t, lp in zip(ids, lps)]}


class _SlowReader(Exception):
    """The client did not take a stream chunk within the write timeout."""


async def _write(resp: web.StreamResponse, data: bytes, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            await resp.write(data)  # waits while the client's socket and aiohttp's buffer are full
    except TimeoutError:
        raise _SlowReader from None


async def _sse(resp: web.StreamResponse, obj: dict, timeout_s: float) -> None:
    await _write(resp, b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n", timeout_s)
