"""Host time per engine iteration, with the device taken out.

    python -m orca_jax.bench.host --running 1,4,16,64,256

On a GPU a GPT-2-sized step takes well under a millisecond, so the host's share of an
iteration (schedule + plan + input packing and transfer + reading ids back + detokenize, stop
checks, deltas) decides whether the device waits. This runs the real `Engine` over a runner
whose "device" answers at once: `run` packs the step's inputs as `ModelRunner.run` does
(`step.pack_inputs`) and dispatches two stand-in programs that take them as the runner's
forward and sampling programs do (numpy, `in_shardings` on this machine's first device),
together with as many other arrays as GPT-2 small's programs take (`PARAM_ARRAYS`,
`STATE_ARRAYS`, `SLOT_ARRAYS`; the state donated and returned), so the transfer and the
dispatch's per-argument cost are counted; it returns random token ids. Everything else is
the production host path. For each number of running requests (all decoding, sampled with
temperature 0.8 and top-p 0.9, a stop string, the embedded demo model's byte-level BPE
tokenizer, or `--model`'s), it reports the median and p90 wall time of `Engine.step()` over
`--steps` iterations.
"""
from __future__ import annotations

import argparse
import types

import numpy as np

from ..config import EngineConfig
from ..engine import Engine, freeze_startup_heap
from ..outputs import Sampled
from ..kv_pages import PAGE_SIZE, pages_for
from ..plan import Buckets, PagedKV, SamplingTensors, StepPlan
from ..request import SamplingParams

PROMPT = 16
# The arrays GPT-2 small's programs take besides the packed inputs: its forward program the
# parameters and the state (KV pages of 12 layers, last tokens, history), sampling the slots'
# last tokens and history (runner.py `_slot_state`).
PARAM_ARRAYS, STATE_ARRAYS, SLOT_ARRAYS = 148, 26, 2


class HostOnlyRunner:
    """The runner interface (runner.py) with an instant device: real input packing, transfer
    and dispatch of programs that take GPT-2 small's number of arrays, random sampled ids."""

    def __init__(self, tokenizer, num_slots: int, max_len: int, seed: int = 0, page_size: int = PAGE_SIZE):
        import jax
        self.model_config = types.SimpleNamespace(vocab_size=tokenizer.vocab_size,
                                                  eos_token_id=tokenizer.eos_token_id)
        self.num_slots, self.max_len, self.n_stages = num_slots, max_len, 1
        self.kv = PagedKV.make(num_slots * pages_for(max_len, page_size), page_size, max_len)
        self.keep_in_flight, self.host_decode_tokens, self.num_compiles = 1, False, 0
        on = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        tiny = lambda n: [jax.device_put(np.zeros(1, np.float32), on) for _ in range(n)]
        self._params, self._state, self._slots = tiny(PARAM_ARRAYS), tiny(STATE_ARRAYS), tiny(SLOT_ARRAYS)
        # the stand-ins of the forward and the sampling program
        self._step = jax.jit(lambda params, state, ints, floats: (state, ints[:1]), donate_argnums=1,
                             in_shardings=(on,) * 4)
        self._sample = jax.jit(lambda state, ints, floats: (state, ints[:1]), donate_argnums=0,
                               in_shardings=(on,) * 3)
        self._rng = np.random.default_rng(seed)
        self._vocab = tokenizer.vocab_size

    def warmup(self, buckets: Buckets) -> None:
        pass

    def run(self, plan: StepPlan, sampling: SamplingTensors) -> np.ndarray:
        from ..step import pack_inputs
        (ints, floats, _), (s_ints, s_floats, _) = pack_inputs(plan, sampling)
        self._state, _ = self._step(self._params, self._state, ints, floats)
        self._slots, _ = self._sample(self._slots, s_ints, s_floats)
        return self._rng.integers(256, self._vocab, plan.num_sample_rows).astype(np.int32)

    def fetch(self, out: np.ndarray, logprobs: bool) -> Sampled:
        return Sampled(out.tolist(), None, None, None)


def host_step_times(tokenizer, running: int, steps: int, seed: int = 0) -> np.ndarray:
    """Seconds of each of `steps` Engine.step() calls with `running` requests decoding."""
    import time
    ec = EngineConfig(max_batch_size=running, max_num_batched_tokens=max(512, running),
                      max_model_len=PROMPT + steps + 64, warmup=False)
    engine = Engine(HostOnlyRunner(tokenizer, running, ec.max_model_len, seed), ec, tokenizer)
    freeze_startup_heap()  # as `serve` does once its engine is built
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=steps + 32, temperature=0.8, top_p=0.9, stop=["\n\n"],
                            ignore_eos=True)
    for _ in range(running):
        engine.add_request(rng.integers(256, tokenizer.vocab_size, PROMPT).tolist(), params)
    while engine.scheduler.waiting or any(r.in_prefill for r in engine.scheduler.running):
        engine.step()
    engine.step()  # untimed: the stand-in programs compile for the decode shape here
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return np.array(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orca_jax.bench.host", description=__doc__.splitlines()[0])
    p.add_argument("--running", default="1,4,16,64,256", help="running requests, comma-separated")
    p.add_argument("--steps", type=int, default=200, help="iterations timed per count")
    p.add_argument("--model", default=None, help="checkpoint whose tokenizer to use (default: the demo model's)")
    args = p.parse_args(argv)
    from ..demo_model import ensure_demo_model
    from ..tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.model or ensure_demo_model())
    for n in (int(x) for x in args.running.split(",")):
        t = host_step_times(tokenizer, n, args.steps) * 1e3
        print(f"{n:4d} running: host {np.median(t):.3f} ms per iteration (p90 {np.percentile(t, 90):.3f} ms, "
              f"{args.steps} iterations)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
