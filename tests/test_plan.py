"""`orca-jax plan` arithmetic against real arrays on virtual CPU meshes, and by hand.

The plan's per-device parameter, KV and slot-state bytes must equal the sum of the
`addressable_shards` of the arrays the engine places (`param_shardings`, `Engine`) on the
same mesh and layout; its communication and roofline numbers are checked against formulas
worked out here independently.
"""
from __future__ import annotations

import argparse
import collections
import json
import math

import jax
import numpy as np
import pytest

from orca_jax.cli import plan as plan_cli
from orca_jax.engine import Engine, EngineConfig
from orca_jax.models.attention import KV_AXES
from orca_jax.models import family
from orca_jax.models.decoder import DecoderConfig
from orca_jax.models.gpt2 import PRESETS, GPTConfig
from orca_jax.sharding.layouts import param_shardings, spec_for
from orca_jax.sharding.mesh import make_mesh
from orca_jax.kv_pages import PAGE_SIZE, pool_pages_for
from orca_jax.models.attention import KVCache
from orca_jax.plan import PagedKV
from orca_jax.sharding.plan import ACCELERATORS, fit_kv_pages, format_plan, kv_placement, make_plan
from orca_jax.step import init_device_state

CFG = GPTConfig(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
ODD = CFG.replace(vocab_size=1001)  # vocab not divisible: the embedding stays replicated
# Grouped-query Llama shape: 8 query heads, 2 KV heads (split over tensor=2, replicated on 4).
GQA = DecoderConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                    intermediate_size=96, max_positions=128, tie_embeddings=False)


def zeros_params(config) -> dict:
    """Host arrays of the params' shapes (values do not matter for placement)."""
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), family(config).abstract_params(config))


def per_device_bytes(tree) -> dict:
    out = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return dict(out)


CASES = [(CFG, "data=1", "replicated"), (CFG, "tensor=4", "megatron"), (ODD, "tensor=4", "megatron"),
         (CFG, "data=2,tensor=4", "megatron"), (CFG, "tensor=2,pipeline=2", "megatron"),
         (CFG, "tensor=4", "megatron-vocab-replicated"), (CFG, "data=2,tensor=2", "slots"),
         (CFG, "tensor=8", "slots"), (GQA, "tensor=2", "megatron"), (GQA, "tensor=4", "megatron"),
         (GQA, "tensor=2,pipeline=2", "megatron")]


@pytest.mark.parametrize("config, spec, layout", CASES)
def test_plan_param_and_kv_bytes_equal_real_shards(config, spec, layout):
    mesh = make_mesh(spec)
    n = mesh.devices.size
    slots, max_len = 8, 128
    plan = make_plan(config, spec, layout, "a100-40gb", batch=slots, context=max_len, dtype="float32")
    mem = plan["memory"]

    params = jax.device_put(zeros_params(config), param_shardings(config, mesh, layout))
    got = per_device_bytes(params)
    assert len(got) == n and set(got.values()) == {mem["param_bytes_per_device"]}
    assert mem["param_bytes_total"] == sum(a.nbytes for a in jax.tree.leaves(params))

    # The KV pages and sequence state as placed by the layout (what the step is compiled for):
    # one array per layer of a stage (pipeline stages hold their own layers' pages).
    kv = PagedKV.make(pool_pages_for(slots * -(-max_len // PAGE_SIZE)), PAGE_SIZE, max_len)  # as the engine sizes it
    shape = KVCache.shape(kv.num_pages, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    stages = dict(mesh.shape).get("pipeline", 1)
    state = init_device_state(config.num_layers // stages, kv, slots, config.num_kv_heads, config.head_dim,
                              config.jnp_dtype, jax.NamedSharding(mesh, spec_for(KV_AXES, layout, mesh, shape)),
                              jax.NamedSharding(mesh, jax.P()))
    assert set(per_device_bytes(state.kv).values()) == {mem["kv_bytes_per_device"]}
    assert set(per_device_bytes((state.history, state.last_token)).values()) == {mem["slot_state_bytes_per_device"]}
    assert mem["kv_spec"][1:] == [None if a is None else [a] if isinstance(a, str) else list(a)
                                  for a in state.kv.k[0].sharding.spec]


@pytest.mark.parametrize("spec, layout", [("tensor=4", "megatron"), ("tensor=2,pipeline=2", "megatron"),
                                          ("data=2,tensor=4", "megatron-vocab-replicated")])
def test_plan_kv_bytes_equal_the_engines_buffer(spec, layout):
    ec = EngineConfig(max_batch_size=8, max_model_len=128, kv_memory=1 << 30, warmup=False)
    eng = Engine.build(CFG, zeros_params(CFG), ec, mesh=make_mesh(spec), layout=layout)
    mem = make_plan(CFG, spec, layout, "h100", batch=eng.num_slots, context=eng.max_len, dtype="float32")["memory"]
    assert set(per_device_bytes(eng.runner.device_states[0].kv).values()) == {mem["kv_bytes_per_device"]}
    state = eng.runner.device_states[-1]  # the sampling (last) stage keeps the slot state
    assert set(per_device_bytes((state.history, state.last_token)).values()) == {mem["slot_state_bytes_per_device"]}


def test_fit_kv_pages_respects_even_tiling():
    # One page of 16 tokens: K and V of 2 layers x 16 tokens x 64 wide x 4 bytes.
    page = 2 * 2 * 16 * 64 * 4
    # Pages split over 4 devices: a quarter each, in multiples of 4 (even tiling).
    assert fit_kv_pages(CFG, "slots", {"tensor": 4}, 16, 2 * page) == 8
    assert fit_kv_pages(CFG, "slots", {"tensor": 4}, 16, 2 * page + page // 2) == 8
    assert kv_placement(CFG, "slots", {"tensor": 4}, 8, 16, 4).spec == (None, None, "tensor", None, None)
    assert fit_kv_pages(CFG, "replicated", {"tensor": 4}, 16, 2 * page) == 2
    assert fit_kv_pages(CFG, "replicated", {"tensor": 4}, 16, page - 1) == 0
    # Megatron splits the pages by KV head: every device holds every page, a quarter of it.
    assert kv_placement(CFG, "megatron", {"tensor": 4}, 8, 16, 4).spec == (None, "tensor", None, None, None)
    assert fit_kv_pages(CFG, "megatron", {"tensor": 4}, 16, 2 * page) == 8


def test_plan_slot_state_is_what_the_engine_allocates_at_any_context():
    """Sequence state rows are padded to whole pages, in the plan as in the engine."""
    from orca_jax.sharding.plan import kv_bytes_per_device, slot_state_bytes
    mem = make_plan(CFG, "tensor=2", "megatron", "h100", batch=8, context=100, dtype="float32")["memory"]
    # 8 slots x 2 pages, plus the 1-page admission watermark (kv_pages.pool_pages_for)
    assert mem["kv_bytes_per_device"] == kv_bytes_per_device(CFG, "megatron", {"tensor": 2}, 8 * 2 + 1, 64, 4)
    assert mem["slot_state_bytes_per_device"] == slot_state_bytes(8, 100, 64) == 4 * 8 * 128 + 4 * 8


def test_communication_and_roofline_by_hand():
    b, D, V, T = 4, 64, 1000, 8
    p = make_plan(CFG, "tensor=4", "megatron", "a100-40gb", batch=T, context=128, dtype="float32", prefill_tokens=24)
    comm = p["decode"]["communication"]
    msg = T * D * b
    assert comm["allreduce_message_bytes"] == msg and comm["allreduces_per_layer"] == 2
    assert comm["tensor_bytes_per_layer"] == 2 * msg * 2 * 3 / 4          # ring: 2(n-1)/n of each message
    assert comm["tensor_bytes"] == 2 * comm["tensor_bytes_per_layer"]    # 2 layers
    assert comm["vocab_bytes"] == msg * 2 * 3 / 4 + T * V * 4 * 3 / 4    # embedding all-reduce + logits all-gather
    assert comm["pipeline_handoff_bytes"] == 0 and p["parallelism"]["tensor_link"] == "NVLink"
    acc = ACCELERATORS["a100-40gb"]
    for phase in ("decode", "prefill"):
        d = p[phase]
        assert d["compute_s"] == pytest.approx(d["flops_per_device"] / acc.flops_32)
        assert d["memory_s"] == pytest.approx(d["bytes_per_device"] / acc.hbm_bw)
        assert d["stage_s"] == pytest.approx(max(d["compute_s"], d["memory_s"]) + d["comm_s"])
    # Decode FLOPs: 2 T x (matmul weights / 4) + 4 x T x 128 positions x D x L / 4 + 2 T V D / 4.
    mm = 2 * (3 * D * D + D * D + 2 * D * 4 * D) // 4
    assert p["decode"]["flops_per_device"] == 2 * T * mm + 4 * T * 128 * D * 2 // 4 + 2 * T * V * D // 4

    pp = make_plan(CFG, "tensor=2,pipeline=2", "megatron", "h100", batch=T, context=128, dtype="float32")
    assert pp["parallelism"]["stages"] == 2
    micro = T // 2  # one micro-batch per stage in flight
    assert pp["decode"]["rows"] == micro
    assert pp["decode"]["communication"]["pipeline_handoff_bytes"] == micro * D * b
    assert pp["decode"]["communication"]["tensor_bytes"] == 2 * micro * D * b * 1.0 * 1  # 1 layer per stage
    d = pp["decode"]
    assert d["iteration_latency_s"] == pytest.approx(2 * d["stage_s"] + d["handoff_s"])


def test_gpt3_175b_on_16_a100_40gb_the_papers_setup():
    c = PRESETS["gpt3-175b"]
    p = make_plan("gpt3-175b", "tensor=8,pipeline=2", "megatron", "a100-40gb", batch=16, context=2048)
    D, L, F, V, P = c.n_embd, c.n_layer, c.mlp_dim, c.vocab_size, c.n_positions
    per_device = (2 * (4 * D * D + 2 * D * F) * L // 16        # QKV, out-proj, MLP kernels: tensor x pipeline
                  + 2 * (3 * D + F) * L // 16                 # QKV and MLP-in biases: tensor x pipeline
                  + 2 * 6 * D * L // 2                        # LayerNorms, out-proj biases: pipeline only
                  + 2 * (V * D + P * D + 2 * D))              # vocab 50257 does not divide by 8: replicated
    m = p["memory"]
    assert m["param_bytes_per_device"] == per_device
    assert m["kv_bytes_per_slot_per_device"] == 2 * L * 2048 * D * 2 // 16 == 576 * 2**20
    assert m["fits"] and 20 <= m["max_slots"] <= 30
    assert p["parallelism"] == {"devices": 16, "tensor_heads": 8, "tensor_mlp": 8, "vocab": 1, "stages": 2,
                                "kv_slots": 1, "tensor_link": "NVLink", "pipeline_link": "inter-node network",
                                "slot_link": "none"}
    assert p["decode"]["bound"] == "memory" and p["prefill"]["bound"] == "compute"
    assert any("vocab=50257" in n for n in p["notes"])
    alone = make_plan("gpt3-175b", "data=1", "replicated", "a100-40gb")
    assert not alone["memory"]["fits"] and alone["memory"]["max_slots"] == 0
    assert any("exceed the usable HBM" in n for n in alone["notes"])
    text = format_plan(p, explain=True)
    assert "fits" in text and "2(n-1)/n" in text and "h.mlp.c_fc.kernel" in text


def test_plan_cli(tmp_path, capsys):
    assert plan_cli.main(["--model", "gpt3-175b", "--mesh", "tensor=8,pipeline=2", "--batch", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory"]["fits"] and "explain" not in out
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(CFG.to_json())
    (tmp_path / "lay.toml").write_text('base = "megatron"\n[rules]\nvocab = []\n')
    assert plan_cli.main(["--model", str(tmp_path / "ckpt"), "--mesh", "tensor=4", "--layout",
                          str(tmp_path / "lay.toml"), "--accelerator", "H100", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "layout 'lay'" in text and "arithmetic:" in text and "vocab/1" in text
    assert plan_cli.main(["--list"]) == 0 and "h200" in capsys.readouterr().out
    assert plan_cli.main(["--model", "nope", "--mesh", "tensor=2"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert plan_cli.main(["--model", "gpt2-small", "--mesh", "tensor=2", "--accelerator", "tpu"]) == 2
    assert "unknown accelerator" in capsys.readouterr().err
    ap = argparse.ArgumentParser()
    plan_cli.add_parser(ap.add_subparsers(dest="cmd"))
    assert ap.parse_args(["plan", "--model", "gpt2-small", "--mesh", "tensor=2"]).fn is plan_cli.cmd_plan


def test_numbers_scale_as_expected():
    one = make_plan("gpt2-small", "data=1", "replicated", "h100", batch=8)["memory"]
    four = make_plan("gpt2-small", "tensor=4", "megatron", "h100", batch=8)["memory"]
    # Heads split 4 ways: the per-slot KV is a quarter; gpt2-small's vocab 50257 stays whole.
    assert four["kv_bytes_per_slot_per_device"] * 4 == one["kv_bytes_per_slot_per_device"]
    assert four["param_bytes_per_device"] < one["param_bytes_per_device"]
    assert math.isclose(make_plan("gpt2-small", "data=1", "replicated", "h200", batch=8)["decode"]["memory_s"] * 4800,
                        make_plan("gpt2-small", "data=1", "replicated", "h100", batch=8)["decode"]["memory_s"] * 3350)


def test_llama_presets_plan_grouped_query_kv():
    """Llama-3-8B: 8 of 32 heads hold K and V, so a token's KV is 2 x 32 layers x 8 x 128 x 2 B
    = 128 KiB (a quarter of multi-head attention's); 70B's 8 KV heads split over tensor=8 and
    are replicated, with a note, over tensor=16."""
    p = make_plan("llama-3-8b", "tensor=1", "megatron", "h100", batch=1, context=8192, dtype="bfloat16")
    assert p["model"]["n_kv_head"] == 8 and abs(p["model"]["params"] - 8.03e9) < 0.01e9
    assert p["memory"]["kv_bytes_per_slot_per_device"] == 8192 * 2 * 32 * 8 * 128 * 2
    p8 = make_plan("llama-3-70b", "tensor=8", "megatron", "h100", batch=1, context=8192, dtype="bfloat16")
    assert p8["memory"]["kv_spec"][1] == ["tensor"]
    assert p8["memory"]["kv_bytes_per_slot_per_device"] == 8192 * 2 * 80 * 8 * 128 * 2 // 8
    p16 = make_plan("llama-3-70b", "tensor=16", "megatron", "h100", batch=1, context=8192, dtype="bfloat16")
    assert p16["memory"]["kv_spec"][1] is None
    assert any("kv_heads=8" in n and "replicated" in n for n in p16["notes"])
