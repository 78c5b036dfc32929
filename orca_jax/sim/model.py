"""A model on a mesh of accelerators, as the simulator sees it: the cost of its iterations and
the KV pages its devices hold, per sharding layout; what turns a `System` (sweep.py) into a
`SimConfig` (run.py), and a first guess at its capacity for the sweep's rates."""
from __future__ import annotations

import dataclasses
import functools
import statistics

from ..sharding.mesh import parse_mesh_spec
from ..sharding.plan import Accelerator
from .accelerators import get_accelerator
from .cost import Efficiency, StepCost, StepWork, kv_pages_that_fit
from .paper import RATE_FRACTIONS, model_config
from .run import SimConfig
from .sweep import System


@functools.lru_cache(maxsize=32)
def _cost(config, mesh: str, layout: str, acc: Accelerator, dtype: str) -> StepCost:
    return StepCost.build(config, mesh, layout, acc, dtype)


@dataclasses.dataclass(frozen=True)
class SimModel:
    config: object            # the model config (models/)
    mesh: str                 # mesh spec, e.g. "tensor=8,pipeline=2"
    accelerator: Accelerator
    dtype: str
    efficiency: Efficiency
    kv_pages: int | None      # None: what fits after the weights (per layout)
    page_size: int

    @staticmethod
    def build(model: str, mesh: str, accelerator: str | Accelerator, dtype: str, efficiency: Efficiency,
              kv_pages: int | None = None, page_size: int = 64) -> "SimModel":
        parse_mesh_spec(mesh)  # a bad spec fails here, with its message
        return SimModel(model_config(model), mesh, get_accelerator(accelerator), dtype, efficiency,
                        kv_pages, page_size)

    def cost(self, layout: str) -> StepCost:
        return _cost(self.config, self.mesh, layout, self.accelerator, self.dtype)

    def pages(self, layout: str) -> int:
        if self.kv_pages is not None:
            return self.kv_pages
        return kv_pages_that_fit(self.config, self.mesh, layout, self.accelerator, self.page_size, self.dtype)

    def sim_config(self, system: System) -> SimConfig:
        ec = dataclasses.replace(system.engine, page_size=self.page_size)
        return SimConfig(ec, self.cost(system.layout), self.efficiency, self.pages(system.layout),
                         ec.max_model_len, padded_attention=self.accelerator.name == "cpu-here")

    def capacity(self, trace, system: System) -> float:
        """Requests/s at full batches, roughly: each request's prompt as one prefill plus its
        outputs decoded in batches of max_batch_size (split over the pipeline's iterations in
        flight) at the trace's mean context."""
        cost, eff = self.cost(system.layout), self.efficiency
        prompt = statistics.mean(r.prompt_len for r in trace.requests)
        out = statistics.mean(r.output_len for r in trace.requests)
        rows = max(1, system.engine.max_batch_size // cost.stages)
        ctx = int(prompt + out / 2)
        decode = cost.stage_s(StepWork(rows, rows, rows * ctx, rows * ctx), eff) + cost.handoff_s(StepWork(rows, 0, 0, 0))
        p = int(prompt)
        prefill = cost.stage_s(StepWork(p, 1, p * p // 2, 0), eff)
        return 1.0 / (out * decode / rows + prefill / cost.stages)

    def auto_rates(self, trace, systems: list[System]) -> list[float]:
        """RATE_FRACTIONS of the largest capacity of the systems, rounded to 3 digits."""
        top = max(self.capacity(trace, s) for s in systems)
        return [float(f"{f * top:.3g}") for f in RATE_FRACTIONS]

