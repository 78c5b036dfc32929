"""Offline batched generation, shaped like vLLM's `LLM` API.

    from orca_jax import LLM, SamplingParams
    llm = LLM("ckpt/gpt2")               # None: the embedded demo model
    outs = llm.generate(["Hello", "The sky"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
    llm.prompt_logprobs(["Hello world"], top_n=5)  # per prompt token: its log-probability
"""
from __future__ import annotations

import collections
import functools
import numbers
from typing import Sequence

import jax
from tqdm.auto import tqdm

from .config import EngineConfig
from .engine import Engine
from .sharding.layouts import Layout
from .sharding.mesh import make_mesh
from .request import RequestOutput, SamplingParams, Usage
from .scheduler import QueueFullError
from .scoring import PromptScorer

Prompt = str | Sequence[int]


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> Sequence[Prompt]:
    """`prompts` as a list of prompts: one prompt (text, or token ids as a list or numpy
    array) becomes a list of one."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], numbers.Integral)):
        return [prompts]
    return prompts


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str | None = None,
                 mesh: str | dict | jax.sharding.Mesh | None = None, layout: str | Layout = "megatron",
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 engine_config: EngineConfig | None = None, **engine_kwargs):
        """`model`: a checkpoint directory made by `orca-jax convert`; None = embedded demo
        model. `mesh` (`"tensor=2,pipeline=2"`, a dict or a Mesh; default: one device, or
        vLLM's `tensor_parallel_size` / `pipeline_parallel_size`) and the sharding `layout`
        place it as `orca-jax generate --mesh --layout` does. `engine_kwargs` are EngineConfig
        fields (max_batch_size=..., ...)."""
        if model is None:
            from .demo_model import ensure_demo_model
            model = ensure_demo_model()
        if mesh is None and tensor_parallel_size * pipeline_parallel_size > 1:
            mesh = {"tensor": tensor_parallel_size, "pipeline": pipeline_parallel_size}
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            mesh = make_mesh(mesh)
        cfg = engine_config or EngineConfig(**engine_kwargs)
        self.engine = Engine.from_checkpoint(model, cfg, dtype=dtype, mesh=mesh, layout=layout)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @functools.cached_property
    def scorer(self) -> PromptScorer:
        return PromptScorer(self.engine)

    def prompt_logprobs(self, prompts: Prompt | Sequence[Prompt], top_n: int = 0) -> list[list[dict | None]]:
        """Per prompt, per token: None for the first, then {"token_id", "logprob", "rank",
        "top": {id: logprob} of the `top_n` most likely} given the tokens before it
        (orca_jax/scoring.py; vLLM's `prompt_logprobs`). Text prompts are tokenized first."""
        encode = self.engine.tokenizer.encode
        return [self.scorer(encode(p) if isinstance(p, str) else list(p), top_n) for p in _prompt_list(prompts)]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One final output per prompt, in order. Prompts are text or token-id lists."""
        prompts = _prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = [f"offline-{i}" for i in range(len(prompts))]
        todo = collections.deque(zip(ids, prompts, params))
        acc: dict[str, dict] = {rid: {"ids": [], "text": [], "lp": []} for rid in ids}
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm)
        eng = self.engine
        while len(done) < len(prompts):
            while todo:  # keep the waiting queue fed without overflowing it
                try:
                    eng.add_request(todo[0][1], todo[0][2], request_id=todo[0][0])
                except QueueFullError:
                    break
                todo.popleft()
            for out in eng.step():
                a = acc[out.request_id]
                a["ids"] += out.token_ids
                a["text"].append(out.text)
                a["lp"] += out.logprobs or []
                if out.finished:
                    done[out.request_id] = RequestOutput(
                        out.request_id, a["ids"], "".join(a["text"]), True, out.finish_reason,
                        Usage(out.usage.prompt_tokens, len(a["ids"])),
                        a["lp"] if out.logprobs is not None else None, out.error, out.metrics)
                    bar.update(1)
        bar.close()
        return [done[rid] for rid in ids]
