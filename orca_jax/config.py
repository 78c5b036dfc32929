"""The engine's knobs: one frozen dataclass, the one source of the `serve`, `generate` and
`bench` flags (`orca_jax.cli.flags` derives them from the fields' metadata), and the one place
that turns them into the scheduler's limits."""
from __future__ import annotations

import dataclasses
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
    kv_memory_fraction: float = _knob(0.5, "fraction of free device memory (CPU: of RAM) for the "
                                           "KV pages")
    page_size: int = _knob(PAGE_SIZE, "tokens per KV page")
    kv_admission: Literal["on-demand", "reserve"] = _knob(
        "on-demand", "on-demand: pages as tokens arrive, preempting the newest request when "
                     "they run out; reserve: Orca's, prompt + max_tokens up front, never preempted")
    enable_prefix_caching: bool = _knob(True, "reuse the KV pages of prompt prefixes seen before")
    swap_space: float = _knob(0.0, "GiB of host memory for the KV pages of preempted requests "
                                   "(0: preempted requests recompute)")
    preemption_mode: Literal["auto", "recompute", "swap"] = _knob(
        "auto", "how a preempted request resumes with --swap-space: whichever is cheaper for it "
                "(auto), or always one way")
    attention_backend: Literal["auto", "xla", "pallas"] = _knob(
        "auto", "decode attention: the Pallas GPU paged-attention kernel (pallas, CUDA only) or "
                "XLA; auto: pallas on CUDA, else xla")
    warmup: bool = _knob(True, "compile every bucket program at start-up (else: when first used)")
    seed: int = _knob(0, "draws the seeds of requests that give none", flag=False)

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_memory is not None and self.kv_memory <= 0:
            raise ValueError(f"kv_memory must be a positive number of bytes, got {self.kv_memory}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.kv_admission not in ("on-demand", "reserve"):
            raise ValueError(f"kv_admission must be 'on-demand' or 'reserve', got {self.kv_admission!r}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            raise ValueError(f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")
        if self.attention_backend not in ("auto", "xla", "pallas"):
            raise ValueError(f"attention_backend must be auto, xla or pallas, got {self.attention_backend!r}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
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
