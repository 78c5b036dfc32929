"""Every model family against Hugging Face: conversion, logits, and the real engine's tokens.

For each family a tiny random checkpoint is made with `transformers` (odd sizes: 6 heads of
12 dims, vocabulary 1001, fewer KV heads than heads where the family has them, the family's
options switched on: llama3 RoPE scaling, a sliding window, QKV biases, q/k norms, partial and
interleaved rotary, parallel residuals, learned positions with OPT's offset), converted with
`orca-jax convert`'s function, and then

* its logits on a 60-token prompt, in one prefill and token by token through the KV pages,
  are within 1e-4 of HF's (fp32);
* 24 concurrent greedy requests (prompts of 1 to 200 tokens, chunked at 64 per iteration,
  8 running at once) produce exactly HF `generate`'s tokens, with the sampled tokens'
  logprobs within 1e-4 of HF's log-softmax; on one device, and on `tensor=2`, `pipeline=2` and
  `tensor=2,pipeline=2` megatron meshes (Llama on the first two by default, the rest under -m slow);
* a bf16 checkpoint converts to bf16 (2 bytes per parameter in the Orbax files and on the
  device) and generates.
"""
from __future__ import annotations

import dataclasses
import gc
import json

import jax
import numpy as np
import pytest
from helpers import decode_logits, hf_logits, prefill_logits

from orca_jax.checkpoints.errors import UnsupportedCheckpointError
from orca_jax.checkpoints.hf import convert_hf, supported_architectures
from orca_jax.checkpoints.store import load_checkpoint
from orca_jax.engine import Engine, EngineConfig
from orca_jax.request import SamplingParams
from orca_jax.sharding.mesh import make_mesh

V, MAX_LEN = 1001, 256
ATTN = dict(vocab_size=V, hidden_size=72, num_hidden_layers=2, num_attention_heads=6, max_position_embeddings=MAX_LEN)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# name -> (transformers config class, model class, config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(ATTN, num_key_value_heads=2, intermediate_size=100, rope_parameters=LLAMA3, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(ATTN, num_key_value_heads=3, intermediate_size=100, sliding_window=40)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(ATTN, num_key_value_heads=1, intermediate_size=100, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(ATTN, num_key_value_heads=2, head_dim=16, intermediate_size=100)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(ATTN, intermediate_size=100, rotary_pct=0.5, use_parallel_residual=True)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(vocab_size=V, n_embd=72, n_layer=2, n_head=6, n_positions=MAX_LEN, rotary_dim=8,
                  bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(ATTN, ffn_dim=100, word_embed_proj_dim=72, bos_token_id=2, eos_token_id=2, pad_token_id=1)),
}
EC = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4, max_model_len=MAX_LEN,
                  kv_memory=int(64e6), warmup=False)


def make_hf(path, name: str, seed: int = 0, dtype=None, **overrides):
    """A random HF model of family `name` saved (safetensors) to `path`; norms and biases
    perturbed so that a mis-mapped one shows."""
    import torch
    import transformers
    cfg_cls, model_cls, kwargs = FAMILIES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(
        **{**kwargs, **overrides}, initializer_range=0.2)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") or "norm" in n or "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # references never stop early
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, converted checkpoint dir, config)."""
    d = tmp_path_factory.mktemp(request.param)
    hf = make_hf(d / "hf", request.param)
    config = convert_hf(d / "hf", d / "ckpt", progress=False)
    return request.param, hf, str(d / "ckpt"), config


def test_logits_match_hf_prefill_and_decode(family):
    name, hf, ckpt, config = family
    assert config.model_type == name and config.dtype == "float32"
    _, params = load_checkpoint(ckpt)
    ids = np.random.default_rng(1).integers(0, V, 60)
    ref = hf_logits(hf, ids)
    np.testing.assert_allclose(prefill_logits(config, params, ids), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decode_logits(config, params, ids), ref, atol=1e-4, rtol=0)


def _workload():
    rng = np.random.default_rng(7)
    lengths = [1, 2, 200, 199] + rng.integers(1, 201, 20).tolist()
    return [(rng.integers(0, V, n).tolist(), int(rng.integers(1, 17))) for n in lengths]


def _run(engine: Engine, work) -> list[tuple[list[int], list[float]]]:
    """All of `work` added at once (8 run, the rest wait); greedy with logprobs."""
    reqs = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0))
            for p, n in work]
    out = {r.request_id: ([], []) for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id][0].extend(o.token_ids)
            out[o.request_id][1].extend(lp["logprob"] for lp in o.logprobs or [])
    return [out[r.request_id] for r in reqs]


def _check_against_hf(hf, work, got) -> None:
    """Tokens equal HF `generate`'s, logprobs within 1e-4 of the log-softmax of the logits
    generate computed for them (its prefill, then one token at a time with its KV cache)."""
    import torch
    for (prompt, n), (ids, lps) in zip(work, got):
        ids_t = torch.tensor([prompt])
        with torch.no_grad():  # an explicit mask: generate would mask prompt tokens equal to pad_token_id
            out = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ref = out.sequences[0, len(prompt):].tolist()
        assert ids == ref, f"prompt of {len(prompt)} tokens"
        lsm = torch.log_softmax(torch.cat(out.logits).float(), -1).numpy()                # [n, V]
        np.testing.assert_allclose(lps, lsm[np.arange(n), ref], atol=1e-4, rtol=0)


def test_24_concurrent_greedy_requests_match_hf_generate(family):
    name, hf, ckpt, _ = family
    work = _workload()
    _check_against_hf(hf, work, _run(Engine.from_checkpoint(ckpt, EC), work))
    gc.collect()


MESH_CASES = [pytest.param(name, mesh, marks=[] if name == "llama" and mesh != "tensor=2,pipeline=2" else [pytest.mark.slow])
              for name in FAMILIES for mesh in ("tensor=2", "pipeline=2", "tensor=2,pipeline=2")]


@pytest.mark.parametrize("name, mesh", MESH_CASES)
def test_tensor_and_pipeline_meshes_match_hf(name, mesh, tmp_path):
    """megatron on `tensor=2`, `pipeline=2` and both: query heads split 3 + 3 and, where they
    divide, KV heads too (Llama: 2 KV heads, one per device; Mistral's 3 and Qwen2's 1 stay
    replicated); 2 stages of one layer each. Llama in the default suite, the rest under -m slow."""
    hf = make_hf(tmp_path / "hf", name)
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    work = _workload()[:12]
    engine = Engine.from_checkpoint(str(tmp_path / "ckpt"), EC, mesh=make_mesh(mesh), layout="megatron")
    _check_against_hf(hf, work, _run(engine, work))


def test_gpu_path_with_a_sliding_window_and_gqa_matches_hf(tmp_path):
    """The GPU path (static-shape attention, host-switched sampling; tests/test_gpu_path.py)
    on Mistral: 3 KV heads for 6 query heads, a 40-position window over 200-token prompts
    chunked by 64 (history read from pages), tokens and logprobs as HF's."""
    hf = make_hf(tmp_path / "hf", "mistral")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    work = _workload()[:12]
    ec = dataclasses.replace(EC, attention_backend="xla-static", sampling_control="host")
    _check_against_hf(hf, work, _run(Engine.from_checkpoint(str(tmp_path / "ckpt"), ec), work))


def test_gpu_path_on_a_tensor_and_pipeline_mesh_matches_hf(tmp_path):
    """The GPU path's static-shape gathers and host-chosen sampling programs over KV pages
    split by head (tensor=2) and over two pipeline stages."""
    hf = make_hf(tmp_path / "hf", "llama")
    convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    work = _workload()[:8]
    ec = dataclasses.replace(EC, attention_backend="xla-static", sampling_control="host")
    engine = Engine.from_checkpoint(str(tmp_path / "ckpt"), ec, mesh=make_mesh("tensor=2,pipeline=2"),
                                    layout="megatron")
    _check_against_hf(hf, work, _run(engine, work))


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    import torch
    hf = make_hf(tmp_path / "hf", "llama", dtype=torch.bfloat16)
    config = convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert config.dtype == "bfloat16"
    _, params = load_checkpoint(tmp_path / "ckpt")
    leaves = jax.tree.leaves(params)
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    assert sum(x.nbytes for x in leaves) == 2 * config.num_params()
    prompt = list(range(1, 100))  # chunked by 64: history read from pages
    gpu_path = dataclasses.replace(EC, attention_backend="xla-static", sampling_control="host")
    for ec in (EC, gpu_path):
        engine = Engine.from_checkpoint(str(tmp_path / "ckpt"), ec)
        assert engine.runner.kv_bytes > 0 and engine.runner._states[0].kv.k[0].dtype == jax.numpy.bfloat16
        (ids, _), = _run(engine, [(prompt, 8)])
        # Each token is HF bf16's argmax given the same context (teacher-forced), up to one
        # bf16 step at logits ~5 (0.03): bf16 logits tie often, and HF's generate, decoding
        # one token at a time, rounds differently from its own full forward, so comparing
        # with its greedy continuation would test the rounding, not the model.
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()  # [8, V]
        gap = logits.max(-1).values - logits[torch.arange(8), torch.tensor(ids)]
        assert len(ids) == 8 and gap.max().item() <= 0.05, (ec.attention_backend, gap.tolist())
    # --dtype float32 widens it.
    assert convert_hf(tmp_path / "hf", tmp_path / "f32", dtype="float32", progress=False).dtype == "float32"


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "dynamic", "factor": 2.0}])
def test_rope_scalings_match_hf(tmp_path, rope):
    """Trained on 40 positions, stretched x2 (the context becomes 80, vLLM's rule). Linear:
    logits everywhere; dynamic NTK: inside the trained context, then decoding token by token
    past it, as HF does (each new token rotated with the frequencies of its own length)."""
    hf = make_hf(tmp_path / "hf", "llama", rope_parameters={"rope_theta": 10000.0, **rope},
                 max_position_embeddings=40)
    config = convert_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert dict(config.rope_scaling)["rope_type"] == rope["rope_type"] and config.max_positions == 80
    _, params = load_checkpoint(tmp_path / "ckpt")
    ids = np.random.default_rng(2).integers(0, V, 36 if rope["rope_type"] == "dynamic" else 70)
    np.testing.assert_allclose(prefill_logits(config, params, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    work = [(ids[:30].tolist(), 40)]  # 30 + 40 positions: 30 past the trained context
    _check_against_hf(hf, work, _run(Engine.from_checkpoint(str(tmp_path / "ckpt"), EC), work))


def test_unknown_architectures_and_options_are_refused_by_name(tmp_path):
    make_hf(tmp_path / "hf", "llama")
    cfg_file = tmp_path / "hf" / "config.json"
    original = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**original, "architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    with pytest.raises(UnsupportedCheckpointError, match="FalconForCausalLM.*supported architectures:.*LlamaForCausalLM"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPTNeoXForCausalLM",
            "GPTJForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel"} <= set(supported_architectures())
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 64}
    cfg_file.write_text(json.dumps({**original, "rope_parameters": yarn}))
    with pytest.raises(UnsupportedCheckpointError, match="rope scaling 'yarn' is not supported"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    cfg_file.write_text(json.dumps({**original, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                    "use_sliding_window": True}))
    with pytest.raises(UnsupportedCheckpointError, match="use_sliding_window=True is not supported"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    cfg_file.write_text(json.dumps({**original, "hidden_act": "gelu_10"}))
    with pytest.raises(UnsupportedCheckpointError, match="activation 'gelu_10' is not supported"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    cfg_file.write_text(json.dumps({**original, "num_key_value_heads": 4}))  # 6 heads: not a multiple
    with pytest.raises(UnsupportedCheckpointError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        convert_hf(tmp_path / "hf", tmp_path / "out")
    cfg_file.write_text(json.dumps({**original, "intermediate_size": 99}))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(100, 72\).*\(99, 72\)"):
        convert_hf(tmp_path / "hf", tmp_path / "out")


# ----------------------------------------------------------------------------- tokenizers and chat

LLAMA2_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
               "{% elif m['role'] == 'system' %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
               "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
TEXTS = ["The sea is wide.", " leading space", "ünïcödé and emoji 🐋", "a\nb\n\nc", "x"]


def sentencepiece_like_tokenizer(path, add_bos: bool = True):
    """A Llama-2-style tokenizer.json (BPE over '▁'-joined words, byte fallback) whose
    post-processor puts `<s>` before the text, as Llama's does; chat template as Llama 2's."""
    from pathlib import Path

    import tokenizers
    from tokenizers import decoders, models, normalizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    corpus = (Path(__file__).parents[1] / "orca_jax" / "demo_corpus.txt").read_text()[:6000]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                                          show_progress=False))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": add_bos, "chat_template": LLAMA2_CHAT}))
    return tok


@pytest.fixture(scope="module")
def llama_chat_dir(tmp_path_factory):
    """A converted Llama with a Llama-2-style tokenizer and chat template, and generation EOS ids [2, 5]."""
    d = tmp_path_factory.mktemp("llama-chat")
    make_hf(d / "hf", "llama", bos_token_id=1, eos_token_id=2)
    sentencepiece_like_tokenizer(d / "hf")
    # transformers 5 saves the template beside the tokenizer: the converter must carry it along.
    cfg = json.loads((d / "hf" / "tokenizer_config.json").read_text())
    (d / "hf" / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (d / "hf" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "hf" / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    convert_hf(d / "hf", d / "ckpt", progress=False)
    return d


def test_text_prompts_tokenize_as_transformers(llama_chat_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from orca_jax.tokenizer import load_tokenizer
    ours, theirs = load_tokenizer(llama_chat_dir / "ckpt"), transformers.AutoTokenizer.from_pretrained(llama_chat_dir / "hf")
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"] and ours.encode(text)[0] == 1
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        ids = theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    for flags in ({"legacy": True}, {"add_prefix_space": False}):  # the other Metaspace schemes
        cfg = json.loads((llama_chat_dir / "hf" / "tokenizer_config.json").read_text())
        d = tmp_path / str(flags)
        d.mkdir()
        (d / "tokenizer.json").write_bytes((llama_chat_dir / "hf" / "tokenizer.json").read_bytes())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, **flags}))
        ours, theirs = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
        for text in TEXTS:
            assert ours.encode(text) == theirs(text)["input_ids"], (flags, text)
    # vocab.json + merges.txt only (OPT's files): add_bos_token decides, as HF's GPT2Tokenizer.
    import tokenizers
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 3, vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    for add_bos in (True, False):
        d = tmp_path / f"opt-{add_bos}"
        d.mkdir()
        bpe.save_model(str(d))
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>",
                                                             "eos_token": "</s>", "add_bos_token": add_bos}))
        ours, theirs = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
        for text in TEXTS:
            assert ours.encode(text) == theirs(text)["input_ids"], (add_bos, text)


def test_generation_config_eos_ids_all_stop(llama_chat_dir):
    engine = Engine.from_checkpoint(str(llama_chat_dir / "ckpt"), EC)
    assert engine.eos_token_ids == (2, 5) and engine.eos_token_id == 2
    out = engine.output
    assert out.eos_token_ids == {2, 5}


def test_chat_on_a_llama_checkpoint_equals_completions_and_streams(llama_chat_dir):
    openai = pytest.importorskip("openai")
    transformers = pytest.importorskip("transformers")
    from orca_jax.async_engine import AsyncEngine
    from orca_jax.server import BackgroundServer, ServerConfig
    from test_server import http
    messages = [{"role": "system", "content": "You are an orca."}, {"role": "user", "content": "The sea"}]
    want = transformers.AutoTokenizer.from_pretrained(llama_chat_dir / "hf").apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want)
    assert want[0] == 1 and want.count(1) == 1  # one BOS: the template's
    engine = AsyncEngine(Engine.from_checkpoint(str(llama_chat_dir / "ckpt"), EC)).start()
    served = BackgroundServer(engine, ServerConfig(grpc_port=None, http_port=0), "llama").start()
    try:
        body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
        st, chat = http(served, "/v1/chat/completions", {"messages": messages, **body})
        assert st == 200, chat
        st, ref = http(served, "/v1/completions", {"prompt": want, **body})
        assert st == 200, ref
        assert chat["usage"]["prompt_tokens"] == len(want)
        assert chat["choices"][0]["message"]["content"] == ref["choices"][0]["text"]
        client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="llama", messages=messages, stream=True, max_tokens=12,
                                                temperature=0, extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == ref["choices"][0]["text"]
    finally:
        served.stop()
        engine.shutdown()


def test_convert_cli_names_the_family(tmp_path, capsys):
    from orca_jax.cli import main
    make_hf(tmp_path / "hf", "qwen2")
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "qwen2 with 2 layers, d=72, 6 heads (1 KV heads), vocab 1001" in out and "(float32)" in out
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["BloomForCausalLM"]}))
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 2
    assert "BloomForCausalLM" in capsys.readouterr().err
