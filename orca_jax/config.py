"""The engine's knobs: one frozen dataclass, the one source of the `serve`, `generate` and
`bench` flags (`orca_jax.cli.flags` derives them from the fields' metadata), and the one place
that turns them into the scheduler's limits."""
from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from .kv_pages import PAGE_SIZE
from .scheduler import SchedulerConfig


def _knob(default, help: str, flag: bool = True):
    """A config field with its command-line help: `orca_jax.cli.flags` derives the flags of
    generate, serve and bench from these fields (one source for names, defaults and help)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine knobs (the CLI flags of `serve`, `generate` and `bench`)."""

    max_batch_size: int = _knob(64, "requests per iteration (Orca's max_bs)")
    max_num_batched_tokens: int = _knob(512, "token budget per iteration; longer prompts are "
                                             "prefilled in chunks")
    max_prefill_seqs: int = _knob(16, "prompt segments per iteration")
    max_waiting: int = _knob(1024, "waiting-queue bound; beyond it requests are refused (retry later)")
    policy: Literal["iteration", "static"] = _knob(
        "iteration", "iteration-level scheduling (Orca) or the static request-level baseline")
    max_model_len: int | None = _knob(None, "longest sequence, prompt + output (default: the "
                                             "model's context: n_positions, max_position_embeddings)")
    kv_memory: int | None = _knob(None, "KV pages budget in bytes (e.g. 2e9); default: "
                                        "--kv-memory-fraction")
    kv_memory_fraction: float | None = _knob(
        None, "fraction for the KV pages: on accelerators of what XLA's allocator can still give "
              "after the weights (default 0.9; XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default, is "
              "the allocator's share of HBM: the rest stays for NCCL and cuBLAS workspaces), on "
              "CPU of RAM (default 0.5)")
    page_size: int = _knob(PAGE_SIZE, "tokens per KV page")
    kv_admission: Literal["on-demand", "reserve"] = _knob(
        "on-demand", "on-demand: pages as tokens arrive, preempting the newest request when "
                     "they run out; reserve: Orca's, prompt + max_tokens up front, never preempted")
    enable_prefix_caching: bool = _knob(True, "reuse the KV pages of prompt prefixes seen before")
    bucket_chunking: bool = _knob(True, "cut a step's prompt chunks back to a prefill bucket when "
                                        "that pads less than rounding up to the next (fewer padded "
                                        "rows, shorter stalls of the decoding streams)")
    swap_space: float = _knob(0.0, "GiB of host memory for the KV pages of preempted requests "
                                   "(0: preempted requests recompute)")
    preemption_mode: Literal["auto", "recompute", "swap"] = _knob(
        "auto", "how a preempted request resumes with --swap-space: whichever is cheaper for it "
                "(auto), or always one way")
    attention_backend: Literal["auto", "xla", "xla-static", "pallas", "cpu"] = _knob(
        "auto", "attention: xla (loops over pages as far as each step's longest context: least "
                "work), xla-static (static shapes, no loop: XLA:GPU would wait on the host "
                "for each loop's trip count), pallas (the Pallas GPU paged-attention kernel for "
                "decode rows, CUDA only), cpu (a C++ kernel for every row, built at first use "
                "with the system's compiler: float32, one device per pipeline stage); auto: on "
                "CUDA pallas for 16-bit models and xla-static for float32 (the kernel's dots run "
                "in TF32), on CPU cpu where it fits and builds, else xla")
    matmul_backend: Literal["auto", "xla", "cpu"] = _knob(
        "auto", "dense layers and the LM head: xla (XLA's own GEMMs) or cpu (a C++ kernel over "
                "weights packed once at start-up in place of the arrays, built at first use with "
                "the system's compiler: float32, one device per pipeline stage; faster at decode's "
                "few rows); auto: cpu on CPU where it fits and builds, else xla")
    sampling_control: Literal["auto", "device", "host"] = _knob(
        "auto", "who switches the sampler's optional stages (penalties, top-k/p/min-p, random "
                "draws, logprobs) per iteration: device (lax.cond in one program per row bucket: "
                "skips unused work, for CPU) or host (a greedy and a full program per bucket, "
                "no conditional: XLA:GPU would wait on the host for each predicate); auto: host on GPU")
    matmul_precision: Literal["auto", "highest", "high", "default"] = _knob(
        "auto", "precision of float32 matmuls (jax_default_matmul_precision): highest is full "
                "float32; default lets NVIDIA GPUs use TF32 (faster, ~1e-3 relative error); auto: "
                "highest for float32 models, default for 16-bit ones")
    warmup: bool = _knob(True, "compile every bucket program at start-up (else: when first used)")
    seed: int = _knob(0, "draws the seeds of requests that give none", flag=False)

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_memory is not None and self.kv_memory <= 0:
            raise ValueError(f"kv_memory must be a positive number of bytes, got {self.kv_memory}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        for name, kind in typing.get_type_hints(EngineConfig).items():  # the Literal fields' choices
            choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
            if choices and getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.kv_memory_fraction is not None and not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


def scheduler_config(config: EngineConfig, num_slots: int, n_stages: int = 1) -> SchedulerConfig:
    """The scheduler's limits once the runner is built: a batch never has more requests than
    sequence slots, and the token budget always lets every running request decode."""
    return SchedulerConfig(
        max_batch_size=num_slots,
        max_num_batched_tokens=max(config.max_num_batched_tokens, num_slots),
        max_prefill_seqs=min(config.max_prefill_seqs, num_slots),
        max_waiting=config.max_waiting, policy=config.policy, n_stages=n_stages,
        kv_admission=config.kv_admission)
