"""The engine's knobs: one frozen dataclass, the one source of the `serve`, `generate` and
`bench` flags (`orca_jax.cli.flags` derives them from the fields' metadata), and the one place
that turns them into the scheduler's limits."""
from __future__ import annotations

import dataclasses
from typing import Literal

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
    max_model_len: int | None = _knob(None, "tokens per KV slot (default: the model's n_positions)")
    kv_memory: int | None = _knob(None, "KV buffer budget in bytes (e.g. 2e9); default: "
                                        "--kv-memory-fraction")
    kv_memory_fraction: float = _knob(0.5, "fraction of free device memory (CPU: of RAM) for the "
                                           "KV buffer")
    warmup: bool = _knob(True, "compile every bucket program at start-up (else: when first used)")
    seed: int = _knob(0, "draws the seeds of requests that give none", flag=False)

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_memory is not None and self.kv_memory <= 0:
            raise ValueError(f"kv_memory must be a positive number of bytes, got {self.kv_memory}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


def scheduler_config(config: EngineConfig, num_slots: int, n_stages: int = 1) -> SchedulerConfig:
    """The scheduler's limits once the KV buffer is sized: a batch never has more requests
    than slots, and the token budget always lets every running request decode."""
    return SchedulerConfig(
        max_batch_size=num_slots,
        max_num_batched_tokens=max(config.max_num_batched_tokens, num_slots),
        max_prefill_seqs=min(config.max_prefill_seqs, num_slots),
        max_waiting=config.max_waiting, policy=config.policy, n_stages=n_stages)
