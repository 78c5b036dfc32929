"""The Orca paper's evaluation setups (Yu et al., OSDI'22, §6), for the simulator.

Table 1: GPT-3 models with GPT-3's shapes (Brown et al. 2020, Table 2.1; head dim 128) on
Azure NDv4 nodes (8 x A100-SXM4-40GB over NVLink, one 200 Gb/s HDR InfiniBand NIC per GPU):
intra-layer (tensor) parallelism inside a node and inter-layer (pipeline) across nodes.

    model   layers  hidden  GPUs  mesh
    13B     40      5120    1     tensor=1
    101B    80      10240   8     tensor=8
    175B    96      12288   16    tensor=8,pipeline=2
    341B    120     15360   32    tensor=8,pipeline=4

§6.2's synthetic trace: Poisson arrivals, prompt length uniform in [32, 512], output length
uniform in [1, 128] (bench/workloads.py `orca`), every request generating exactly its output
length; FasterTransformer behind a request-level scheduler is the baseline (our `static`
policy), and the comparison is throughput against median normalized latency (end-to-end
latency / output tokens) at several max batch sizes. The reported headline: 36.9x the
baseline's throughput at the same latency for 175B.
"""
from __future__ import annotations

import dataclasses

from ..config import EngineConfig

# (Plain Python at import: `orca-jax --help` loads this; the model configs import JAX.)
MODELS = ("gpt3-13b", "gpt3-101b", "gpt3-175b", "gpt3-341b")
MESHES = {"gpt3-13b": "tensor=1", "gpt3-101b": "tensor=8", "gpt3-175b": "tensor=8,pipeline=2",
          "gpt3-341b": "tensor=8,pipeline=4"}
ACCELERATOR = "a100-40gb"
PROMPT_LEN, OUTPUT_LEN = "32:512", "1:128"
MAX_BATCH_SIZES = (8, 16, 32)          # each policy at each (the paper's figures vary max_bs)
REPORTED_RATIO = {"gpt3-175b": 36.9}   # iteration-level / FasterTransformer at equal latency
RATE_FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 1.0, 1.25)  # of the estimated capacity


def model_config(name: str):
    """A Table 1 model, or any engine preset."""
    from ..models import PRESETS
    if name == "gpt3-101b":  # not an engine preset (no checkpoint has its shape): here only
        from ..models.gpt2 import GPTConfig
        return GPTConfig(n_positions=2048, n_embd=10240, n_layer=80, n_head=80)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted({*MODELS, *PRESETS}))}")
    return PRESETS[name]


def paper_engine(max_batch_size: int, policy: str, kv_admission: str = "reserve",
                 max_model_len: int = 640, **changes) -> EngineConfig:
    """Orca's engine as ours runs it: reserve admission (prompt + max tokens up front, §4.5),
    no prefix caching (the paper has none), context of the trace's longest request."""
    return dataclasses.replace(EngineConfig(max_batch_size=max_batch_size, policy=policy,
                                            kv_admission=kv_admission, enable_prefix_caching=False,
                                            max_model_len=max_model_len, warmup=False), **changes)


def systems(batch_sizes=MAX_BATCH_SIZES, policies=("iteration", "static"), **engine) -> list:
    """Each policy at each max batch size (sweep.py `System`s)."""
    from .sweep import System
    names = {"iteration": "iteration-level", "static": "request-level"}
    return [System(f"{p}-bs{b}", f"{names[p]}, max batch {b}", paper_engine(b, p, **engine))
            for p in policies for b in batch_sizes]
