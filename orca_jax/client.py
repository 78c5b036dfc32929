"""A small Python client for `orca-jax serve` (gRPC), blocking and asyncio.

    from orca_jax.client import Client
    with Client("localhost:50051") as c:
        for delta in c.stream("The orca", max_tokens=32, temperature=0):
            print(delta.text, end="", flush=True)
        done = c.generate("The orca", max_tokens=32)     # Completion: text, token_ids, ...

    async with AsyncClient("localhost:50051") as c:
        async for delta in c.stream("The orca", max_tokens=32): ...

Sampling keywords are the fields of `orca_jax.SamplingParams` (max_tokens, temperature, top_k,
top_p, seed, stop, logprobs, ...). Server errors raise `grpc.RpcError` (sync) or
`grpc.aio.AioRpcError` with the server's status code and message. Leaving a stream early
(break, exception, task cancel) cancels the call, and the server frees the request's slot.
"""
from __future__ import annotations

import dataclasses
from typing import AsyncIterator, Iterator, Sequence

import grpc

from .proto import generation_pb2 as pb
from .proto import generation_pb2_grpc as pb_grpc

FINISH_NAMES = {pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_STOP: "stop",
                pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


@dataclasses.dataclass
class Completion:
    """A whole response, accumulated from the stream."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None          # "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[pb.TokenLogprob] | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
                                          # (None: EOS, length, abort), as vLLM's

    @classmethod
    def from_deltas(cls, deltas: Sequence[pb.GenerateResponse]) -> "Completion":
        last = deltas[-1]
        lps = [lp for d in deltas for lp in d.logprobs]
        which = last.WhichOneof("stop_reason")
        return cls(last.request_id, "".join(d.text for d in deltas),
                   [t for d in deltas for t in d.token_ids], FINISH_NAMES[last.finish_reason],
                   last.usage.prompt_tokens, last.usage.completion_tokens, lps or None,
                   getattr(last, which) if which else None)


def make_request(prompt: str | Sequence[int] | Sequence[dict], request_id: str = "",
                 **sampling) -> pb.GenerateRequest:
    """A GenerateRequest; `prompt` is text, token ids, or chat messages ({"role", "content"}
    dicts, rendered by the server's chat template); keywords are sampling fields."""
    fields = pb.SamplingParameters.DESCRIPTOR.fields_by_name
    unknown = sorted(set(sampling) - set(fields))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}")
    s = pb.SamplingParameters(**{k: v for k, v in sampling.items() if v is not None})
    if isinstance(prompt, str):
        return pb.GenerateRequest(request_id=request_id, prompt=prompt, sampling=s)
    if prompt and isinstance(prompt[0], dict):
        messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]
        return pb.GenerateRequest(request_id=request_id, messages=messages, sampling=s)
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=list(prompt), sampling=s)


def sampling_kwargs(params) -> dict:
    """An `orca_jax.SamplingParams` as keywords for `stream`/`generate` (every field explicit)."""
    out = {}
    for name in pb.SamplingParameters.DESCRIPTOR.fields_by_name:
        v = getattr(params, name)
        if v is not None:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def _channel_args(token, tls, root_certificates):
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    creds = grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None
    return metadata, creds


class Client:
    """Blocking client over one channel (thread-safe, like the channel)."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None):
        """`target` "host:port"; `token` for servers started with an auth token; `tls` (or
        `root_certificates`, PEM bytes of the CA to trust) for servers with TLS; `timeout` is
        each call's deadline in seconds."""
        self._metadata, creds = _channel_args(token, tls, root_certificates)
        self._channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self.timeout = timeout

    def stream(self, prompt: str | Sequence[int], *, request_id: str = "",
               timeout: float | None = None, **sampling) -> Iterator[pb.GenerateResponse]:
        call = self._stub.Generate(make_request(prompt, request_id, **sampling),
                                   timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream has ended; else aborts the request

    def generate(self, prompt: str | Sequence[int], **kw) -> Completion:
        return Completion.from_deltas(list(self.stream(prompt, **kw)))

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                       metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio); create and use it inside one event loop."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None):
        self._metadata, creds = _channel_args(token, tls, root_certificates)
        self._channel = (grpc.aio.secure_channel(target, creds) if creds
                         else grpc.aio.insecure_channel(target))
        self._stub = pb_grpc.GenerationStub(self._channel)
        self.timeout = timeout

    async def stream(self, prompt: str | Sequence[int], *, request_id: str = "",
                     timeout: float | None = None, **sampling) -> AsyncIterator[pb.GenerateResponse]:
        call = self._stub.Generate(make_request(prompt, request_id, **sampling),
                                   timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for delta in call:
                yield delta
        finally:
            call.cancel()

    async def generate(self, prompt: str | Sequence[int], **kw) -> Completion:
        return Completion.from_deltas([d async for d in self.stream(prompt, **kw)])

    async def model_info(self) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                             metadata=self._metadata)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
