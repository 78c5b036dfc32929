"""Layouts, rules files, mesh placement and tensor parallelism of the real engine step.

* Layout rules and rules files: pure Python, milliseconds.
* The compiled step on a `tensor=4` megatron mesh: exactly two all-reduces per layer (after
  the attention out-projection and after the MLP; Megatron-LM §3), of [T, D] activations,
  none in the attention loops, and no all-gather of a weight.
* Greedy outputs of concurrent mixed requests (chunked prompts, late arrivals, decode and
  prefill in one step) equal the single-device engine's on `tensor=2` and `tensor=4` under
  every shipped layout.

One random HF GPT-2 (vocab 1000 and 4 heads: every megatron axis divides by 4) converted once
per module; engines compile lazily (`warmup=False`); the last one built is reused.
"""
from __future__ import annotations

import gc
import json
import re

import jax
import numpy as np
import pytest
from helpers import converted_gpt2, decode_logits

from orca_jax.checkpoints.store import load_checkpoint
from orca_jax.engine import Engine, EngineConfig
from orca_jax.plan import warmup_plan
from orca_jax.models.attention import KV_AXES
from orca_jax.models.gpt2 import PARAM_AXES
from orca_jax.request import SamplingParams
from orca_jax.sharding.layouts import LAYOUTS, get_layout, layout_from_dict, load_layout, spec_for
from orca_jax.sharding.mesh import axis_span, make_mesh, physical_order
from orca_jax.sharding.plan import make_plan, param_shapes
from orca_jax.llm import LLM

MODEL = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
EC = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4,
                  max_model_len=128, warmup=False)
MESHES = ["tensor=2", "tensor=4", "pipeline=2", "tensor=2,pipeline=2"]


# ----------------------------------------------------------------------------- layouts


def test_rules_may_name_several_mesh_axes():
    mesh = {"data": 2, "tensor": 4}
    slots = LAYOUTS["slots"]  # one layer's pages [H, P, B, K]: the pages split
    assert slots.resolve(KV_AXES, mesh, (4, 8, 64, 16)) == (None, ("data", "tensor"), None, None)
    # An axis that does not divide (with those already chosen) is skipped, the rest still split.
    assert slots.resolve(KV_AXES, mesh, (4, 4, 64, 16))[1] == "data"
    assert slots.resolve(KV_AXES, {"data": 3, "tensor": 4}, (4, 4, 64, 16))[1] == "tensor"
    assert slots.resolve(KV_AXES, mesh, (4, 3, 64, 16))[1] is None
    assert slots.resolve(KV_AXES, {"tensor": 4}, (4, 8, 64, 16))[1] == "tensor"
    assert spec_for(KV_AXES, "slots", make_mesh("data=2,tensor=4"), (4, 8, 64, 16)) == \
        jax.P(None, ("data", "tensor"), None, None)


def test_shipped_layouts():
    mesh = {"tensor": 4, "pipeline": 2}
    kernel = PARAM_AXES["h"]["attn"]["c_attn"]["kernel"]
    shape = (4, 64, 3, 4, 16)
    assert LAYOUTS["megatron"].resolve(kernel, mesh, shape) == ("pipeline", None, None, "tensor", None)
    assert LAYOUTS["megatron"].resolve(("vocab", "embed"), mesh, (1000, 64)) == ("tensor", None)
    assert LAYOUTS["megatron-vocab-replicated"].resolve(("vocab", "embed"), mesh, (1000, 64)) == (None, None)
    assert LAYOUTS["slots"].resolve(kernel, mesh, shape) == (None,) * 5
    assert LAYOUTS["replicated"].resolve(KV_AXES, mesh, (4, 8, 64, 16)) == (None,) * 4
    assert LAYOUTS["megatron"].resolve(KV_AXES, mesh, (4, 8, 64, 16)) == ("tensor", None, None, None)
    for layout in LAYOUTS.values():
        assert layout.description and get_layout(layout.name) is layout


def test_layout_rules_file_json_and_toml(tmp_path):
    (tmp_path / "dp.json").write_text(json.dumps({
        "name": "megatron-dp", "base": "megatron", "description": "megatron plus KV pages over data",
        "rules": {"pages": "data", "vocab": None}}))
    (tmp_path / "mine.toml").write_text('description = "2D"\n[rules]\nmlp = ["tensor", "data"]\nheads = "tensor"\n')
    dp = get_layout(str(tmp_path / "dp.json"))
    assert dp.name == "megatron-dp" and dp.mesh_axis("pages") == "data" and dp.mesh_axis("vocab") is None
    assert dp.mesh_axis("heads") == "tensor" and dp.mesh_axis("layers") == "pipeline"
    mine = load_layout(tmp_path / "mine.toml")
    assert mine.name == "mine" and mine.description == "2D"
    assert mine.resolve(("embed", "mlp"), {"data": 2, "tensor": 4}, (64, 256)) == (None, ("tensor", "data"))
    # A file layout drives placement like a shipped one, and round-trips through to_dict.
    mesh = make_mesh("data=2,tensor=4")
    assert spec_for(KV_AXES, tmp_path / "dp.json", mesh, (4, 8, 64, 16)) == jax.P("tensor", "data", None, None)
    assert layout_from_dict(dp.to_dict()) == dp


@pytest.mark.parametrize("content, match", [
    ({"rules": {"head": "tensor"}}, "unknown logical axis 'head'"),
    ({"rules": {"slots": "data"}}, "'slots' is now 'pages'"),
    ({"rules": {"heads": 4}}, "must be a mesh axis name"),
    ({"rules": {"heads": ["tensor", "tensor"]}}, "names a mesh axis twice"),
    ({"rules": {"heads": "ten sor"}}, "not an identifier"),
    ({"base": "nope"}, "not a shipped layout"),
    ({"rulez": {}}, "unknown layout keys"),
    ({"rules": [["heads", "tensor"]]}, "must map logical axis"),
])
def test_layout_file_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        get_layout(str(path))


def test_layout_file_syntax_and_missing(tmp_path):
    (tmp_path / "broken.toml").write_text("rules = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_layout(tmp_path / "broken.toml")
    with pytest.raises(ValueError, match="does not exist"):
        get_layout(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown layout 'nope'.*rules file"):
        get_layout("nope")


def test_shipped_example_layout_files_load():
    from pathlib import Path
    files = sorted((Path(__file__).parent.parent / "launch" / "layouts").glob("*.*"))
    assert files, "launch/layouts/ ships example rules files"
    for f in files:
        layout = load_layout(f)
        assert layout.rules and layout.description


def test_mesh_places_tensor_innermost_and_pipeline_outermost():
    axes = {"tensor": 4, "pipeline": 2}
    assert physical_order(axes) == ["pipeline", "tensor"]
    assert physical_order({"data": 2, "tensor": 2, "x": 2}) == ["data", "x", "tensor"]
    assert axis_span({"tensor": 8, "pipeline": 2}, "tensor") == 8
    assert axis_span({"tensor": 8, "pipeline": 2}, "pipeline") == 16
    mesh = make_mesh("tensor=4,pipeline=2")
    assert tuple(mesh.axis_names) == ("tensor", "pipeline")
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # Each tensor group is 4 neighbouring devices; the stages are the two halves.
    np.testing.assert_array_equal(ids, [[0, 4], [1, 5], [2, 6], [3, 7]])


# ----------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return converted_gpt2(tmp_path_factory.mktemp("sharding-model"), seed=1, **MODEL)


@pytest.fixture(scope="module")
def engines(ckpt):
    """engines(mesh_spec or None, layout) -> Engine; the last one is kept for the next call.
    Only one: XLA:CPU maps 3 memory regions per compiled kernel, and 17 engines' programs
    alive at once passed the kernel's vm.max_map_count (65530) and crashed the test process."""
    last: dict = {}

    def get(spec: str | None, layout: str) -> Engine:
        key = (spec, layout)
        if key not in last:
            last.clear()
            gc.collect()
            last[key] = Engine.from_checkpoint(ckpt, EC, mesh=make_mesh(spec) if spec else None, layout=layout)
        return last[key]

    return get


# (arrival iteration, prompt length, max new tokens): 9 requests for 8 slots, prompts longer
# than the 64-token budget (chunked), arrivals while others decode.
SCHEDULE = [(0, 1, 12), (0, 17, 10), (0, 64, 8), (0, 100, 6), (2, 3, 12), (2, 30, 9),
            (5, 9, 7), (5, 50, 5), (7, 2, 10)]


def run_greedy(engine: Engine) -> list[list[int]]:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, MODEL["vocab_size"], size=n).tolist() for _, n, _ in SCHEDULE]
    ids: dict[str, int] = {}
    out: list[list[int]] = [[] for _ in SCHEDULE]
    it = 0
    while it <= max(a for a, _, _ in SCHEDULE) or engine.has_unfinished():
        for i, (arrive, _, max_tokens) in enumerate(SCHEDULE):
            if arrive == it:
                req = engine.add_request(prompts[i], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                    ignore_eos=True))
                ids[req.request_id] = i
        for o in engine.step():
            out[ids[o.request_id]].extend(o.token_ids)
        it += 1
    assert [len(o) for o in out] == [m for _, _, m in SCHEDULE]
    return out


@pytest.fixture(scope="module")
def reference(engines) -> list[list[int]]:
    return run_greedy(engines(None, "replicated"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("spec", MESHES)
def test_greedy_outputs_equal_single_device(engines, reference, spec, layout):
    assert run_greedy(engines(spec, layout)) == reference


@pytest.mark.parametrize("placement", [dict(mesh="tensor=2,pipeline=2", layout="megatron"),
                                       dict(tensor_parallel_size=4, layout="megatron-vocab-replicated")])
def test_offline_llm_on_a_mesh_matches_one_device(ckpt, placement):
    """`LLM(path, mesh=..., layout=...)` (or vLLM's tensor_parallel_size) places the model
    as `orca-jax generate --mesh` does and returns the 1-device engine's greedy tokens."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, MODEL["vocab_size"], size=n).tolist() for n in (1, 17, 70, 5)]
    sp = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    one = LLM(ckpt, engine_config=EC).generate(prompts, sp, use_tqdm=False)
    llm = LLM(ckpt, engine_config=EC, **placement)
    assert dict(llm.engine.runner.mesh.shape) == ({"tensor": 2, "pipeline": 2} if "mesh" in placement
                                           else {"tensor": 4, "pipeline": 1})
    got = llm.generate(prompts, sp, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in one]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_engine_places_state_by_layout(engines, layout):
    eng = engines("tensor=4", layout)
    mesh = eng.runner.mesh
    kernel = eng.runner.params[0]["h"][1]["mlp"]["c_fc"]["kernel"]  # layer 1 of the per-layer arrays
    axes = PARAM_AXES["h"]["mlp"]["c_fc"]["kernel"][1:]        # the stacked axes less "layers"
    assert kernel.shape == (MODEL["n_embd"], 4 * MODEL["n_embd"])
    assert kernel.sharding.spec == spec_for(axes, layout, mesh, kernel.shape)
    for k in eng.runner.device_states[0].kv.k:  # each layer's pages
        assert k.sharding.spec == spec_for(KV_AXES, layout, mesh, k.shape)


def test_slot_split_kv_gives_the_same_logits(ckpt):
    """The `slots` layout's KV buffer through the model's scatter and per-slot gathers (GSPMD
    partitions them over the slot axis): same logits as an unsplit buffer."""
    mesh = make_mesh("tensor=4")
    config, params = load_checkpoint(ckpt, mesh=mesh, layout="slots")
    ids = list(range(5, 75))  # 70 tokens: two attention blocks
    kv4 = jax.NamedSharding(mesh, spec_for(KV_AXES, "slots", mesh, (4, 4 * 8, 16, 16)))
    assert kv4.spec[1] == "tensor"
    got = decode_logits(config, params, ids, kv_sharding=kv4)
    config1, params1 = load_checkpoint(ckpt)
    np.testing.assert_allclose(got, decode_logits(config1, params1, ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- compiled HLO


def _computations(hlo: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: instruction lines}; the entry is '__entry__'."""
    comps, name = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = "__entry__" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and line.strip():
            comps[name].append(line.strip())
    return comps


def _closure(comps, root: str, skip_while_bodies: bool = False) -> list[str]:
    """Instruction lines of `root` and every computation it calls (fusions, reductions, loops)."""
    seen, todo, lines = set(), [root], []
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        for ins in comps[c]:
            lines.append(ins)
            if skip_while_bodies and " while(" in ins:
                continue
            todo += [n for n in re.findall(r"%([\w.\-]+)", ins) if n in comps]
    return lines


COLLECTIVE = re.compile(r"= (\(?[^=]*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


def _collectives(lines):
    return [(m.group(2), m.group(1)) for m in map(COLLECTIVE.search, lines) if m]


def _step_hlo(engine: Engine, td: int, tp: int, stage: int = 0) -> str:
    """The compiled forward program of one pipeline stage (the whole model without stages)."""
    st = engine.runner.stages[stage]
    plan = warmup_plan(td, tp, engine.buckets, engine.num_slots, engine.kv, engine.runner.host_decode_tokens)
    x = None if st.first else jax.device_put(np.zeros((td + tp, MODEL["n_embd"]), np.float32), st.replicated)
    return engine.runner.compiled_step(stage, plan, x)


def _split_loops(comps) -> tuple[list[str], list[str]]:
    """(what the entry runs outside any loop: the unrolled layers, and what the loops it runs
    hold: the attention block loops)."""
    top = _closure(comps, "__entry__", skip_while_bodies=True)
    bodies = [re.search(r"body=%([\w.\-]+)", ins).group(1) for ins in top if " while(" in ins]
    return top, [ins for b in bodies for ins in _closure(comps, b)]


def test_pipeline_stages_run_their_layers_with_megatron_inside_and_no_weight_traffic(engines):
    """tensor=2,pipeline=2: each stage's program holds its layer loop with the two Megatron
    all-reduces of [T, D] and nothing else: no collective crosses stages (the hand-off is a
    device_put between programs) and no weight is gathered."""
    eng = engines("tensor=2,pipeline=2", "megatron-vocab-replicated")
    T, D = 8 + 16, MODEL["n_embd"]
    for stage in range(2):  # one layer per stage
        comps = _computations(_step_hlo(eng, 8, 16, stage))
        everything = _collectives([ins for lines in comps.values() for ins in lines])
        assert [kind for kind, _ in everything] == ["all-reduce", "all-reduce"], everything
        assert all(shape.startswith(f"f32[{T},{D}]") for _, shape in everything), everything


@pytest.mark.parametrize("layout", ["megatron", "megatron-vocab-replicated"])
def test_megatron_step_has_two_all_reduces_per_layer_and_gathers_no_weight(engines, layout):
    eng = engines("tensor=4", layout)
    td, tp = 8, 16
    comps = _computations(_step_hlo(eng, td, tp))
    layers, attention_loops = _split_loops(comps)
    T, D = td + tp, MODEL["n_embd"]
    reduces = [(kind, shape) for kind, shape in _collectives(layers) if kind == "all-reduce"]
    # Megatron-LM §3: one all-reduce after the attention out-projection, one after the MLP
    # (and, with the vocabulary split, one after the embedding lookup).
    assert len(reduces) == 2 * MODEL["n_layer"] + (layout == "megatron"), reduces
    assert all(shape.startswith(f"f32[{T},{D}]") for _, shape in reduces), reduces
    # ... of exactly the message size `orca-jax plan` charges for (float32 here).
    plan = make_plan(eng.model_config, "tensor=4", layout, "a100-40gb", dtype="float32",
                     prefill_tokens=T, batch=8, context=128)
    assert plan["prefill"]["communication"]["allreduce_message_bytes"] == T * D * 4
    assert _collectives(attention_loops) == []  # heads split with the KV buffer: local attention
    everything = _collectives([ins for lines in comps.values() for ins in lines])
    gathers = [shape for kind, shape in everything if kind == "all-gather"]
    weight_shapes = {s for shp in jax.tree.leaves(param_shapes(eng.model_config),
                                                  is_leaf=lambda x: isinstance(x, tuple))
                     for s in (shp, shp[1:])}
    for shape in gathers:
        dims = tuple(int(x) for x in re.search(r"\[([\d,]*)\]", shape).group(1).split(",") if x)
        assert dims not in weight_shapes, f"all-gather of a weight-shaped array {shape}"
    R = eng.buckets.num_sample_rows(td, tp)
    if layout == "megatron":  # vocab-split LM head: the float32 logits [R, V] are gathered once
        assert [s.split("{")[0] for s in gathers] == [f"f32[{R},{MODEL['vocab_size']}]"]
    else:
        assert gathers == [] and len(everything) == 2 * MODEL["n_layer"]
