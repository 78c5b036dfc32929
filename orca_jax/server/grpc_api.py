"""The gRPC service `orca_jax.v1.Generation` (see orca_jax/proto/generation.proto).

`Generate` writes one GenerateResponse per engine delta with `context.write` from a plain
coroutine (not an async-generator handler), so a cancellation from gRPC (client cancel,
disconnect, deadline) always lands inside our `async with` and aborts the engine request.

Status codes: INVALID_ARGUMENT (bad field; the message starts with its name), RESOURCE_EXHAUSTED
(waiting queue full), UNAVAILABLE (draining, or the engine stopped before the request was
accepted, or the drain timed out while it ran), INTERNAL (the engine failed the request while
it ran; the server turns unhealthy).
"""
from __future__ import annotations

import contextlib
import uuid

import grpc
from google.protobuf.message import DecodeError

from ..proto import generation_pb2 as pb
from ..proto import generation_pb2_grpc as pb_grpc
from ..request import FinishReason, RequestOutput
from .inputs import (MAX_REQUEST_ID_CHARS, SAMPLING_FIELDS, InvalidArgument, Limits, prepare_async,
                     prepare_chat_async)
from .stream import classify

FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, FinishReason.STOP: pb.FINISH_REASON_STOP,
          FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.ABORT: pb.FINISH_REASON_ABORT}


def sampling_fields(s: pb.SamplingParameters) -> dict:
    """The fields the caller set (proto3 presence for scalars, non-empty for lists)."""
    out = {}
    for name in SAMPLING_FIELDS:
        field = s.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            continue
        if field.is_repeated:  # `label` is deprecated in protobuf >= 7
            if len(getattr(s, name)):
                out[name] = tuple(getattr(s, name))
        elif field.has_presence:
            if s.HasField(name):
                out[name] = getattr(s, name)
        elif getattr(s, name):  # plain bools: only True differs from the default
            out[name] = getattr(s, name)
    return out


def _largest_field(request: pb.GenerateRequest) -> str:
    sizes = {"prompt": len(request.prompt.encode()), "prompt_token_ids": 5 * len(request.prompt_token_ids),
             "sampling": request.sampling.ByteSize(), "request_id": len(request.request_id),
             "messages": sum(m.ByteSize() for m in request.messages)}
    return max(sizes, key=sizes.get)


def response(out: RequestOutput) -> pb.GenerateResponse:
    lps = [pb.TokenLogprob(token_id=lp["token_id"], logprob=lp["logprob"],
                           top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp["top"].items()])
           for lp in (out.logprobs or ())]
    u = out.usage
    r = out.stop_reason  # the `stop_reason` oneof: a stop string or a stop token id, or neither
    stop = {} if r is None else {"stop_string": r} if isinstance(r, str) else {"stop_token_id": r}
    return pb.GenerateResponse(
        request_id=out.request_id, token_ids=list(out.token_ids), text=out.text, logprobs=lps,
        finished=out.finished, finish_reason=FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                       total_tokens=u.total_tokens), **stop)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, server, model_info: pb.ModelInfo):
        self.server = server            # the owning Server: engine, tokenizer, limits, draining
        self.model_info = model_info

    @property
    def limits(self) -> Limits:
        return self.server.limits

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return self.model_info

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid "
                                f"orca_jax.v1.GenerateRequest ({request.error})")
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(InvalidArgument(
                "request_id", f"is {len(request.request_id)} characters; at most "
                f"{MAX_REQUEST_ID_CHARS}")))
        size = request.ByteSize()
        if size > self.limits.max_request_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(InvalidArgument(
                _largest_field(request), f"the request is {size} bytes, over the server's limit of "
                f"{self.limits.max_request_bytes} bytes (--max-request-bytes)")))
        try:
            ids, params = await self._prepare(request)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
        try:
            async with contextlib.aclosing(self.server.outputs(ids, params, rid)) as stream:
                async for out in stream:
                    failed = self.server.failure(out) if out.finished else None
                    if failed is not None:
                        await context.abort(getattr(grpc.StatusCode, failed[0].grpc_code), failed[1])
                    await context.write(response(out))
        except Exception as e:  # a submission error (before any output), or a bug: never UNKNOWN
            if isinstance(e, grpc.aio.AbortError):  # context.abort above: already answered
                raise
            kind = classify(e)
            await context.abort(getattr(grpc.StatusCode, kind.grpc_code), str(e))


    async def _prepare(self, request: pb.GenerateRequest):
        """(prompt ids, SamplingParams) of a prompt, token ids, or chat messages rendered with
        the chat template (the HTTP chat endpoint's path), or InvalidArgument."""
        fields = sampling_fields(request.sampling)
        if not request.messages:
            return await prepare_async(self.server.tokenizer, self.limits, request.prompt,
                                       request.prompt_token_ids, fields)
        if request.prompt or len(request.prompt_token_ids):
            raise InvalidArgument("messages", "give exactly one of prompt, prompt_token_ids and messages")
        if self.server.chat is None:
            raise InvalidArgument("messages", self.server.chat_problem)
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        add = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        ids, params, _ = await prepare_chat_async(self.server.tokenizer, self.limits, self.server.chat,
                                                  messages, fields, add_generation_prompt=add)
        return ids, params


class Malformed:
    """What a request that fails to parse becomes, so that the handler can answer it with
    INVALID_ARGUMENT (grpc's own answer to a deserializer error is UNKNOWN)."""

    def __init__(self, error: str):
        self.error = error


def _parse(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Malformed(str(e) or "DecodeError")
    return parse


def add_to_server(service: GenerationService, server: grpc.aio.Server) -> None:
    """The generated `add_GenerationServicer_to_server`, with parse errors handed to the
    methods instead of failing the call as UNKNOWN."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=_parse(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, request_deserializer=_parse(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
