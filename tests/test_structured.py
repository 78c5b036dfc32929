"""Structured output, allowed_token_ids and logit_bias: masks and biases applied on the device.

The demo model (random weights, its own 4k BPE vocabulary) is the hard case: nothing makes it
want to write JSON, so every valid output comes from the mask. One engine for the module.
"""
import json

import jsonschema
import numpy as np
import pytest

from orca_jax import LLM, SamplingParams
from orca_jax.engine import EngineConfig
from orca_jax.request import FinishReason
from orca_jax.structured import Grammars, Structured, allowed_mask, constraint_tensors

ENGINE = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4, max_model_len=256)

SCHEMA = {  # every string and number bounded: a complete object fits in max_tokens
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["orca", "seal", "gull"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(demo_model_dir):
    return LLM(demo_model_dir, engine_config=ENGINE)


def test_bitmask_layout_matches_llguidance(llm):
    """Bit t % 32 of word t // 32, as llguidance writes its masks and the sampler reads them."""
    V = llm.engine.model_config.vocab_size
    ids = [0, 5, 31, 32, 33, V - 1]
    bits = np.unpackbits(allowed_mask(ids, V).view(np.uint8), bitorder="little")
    assert np.flatnonzero(bits).tolist() == ids
    g = Grammars(llm.tokenizer, V, llm.engine.eos_token_ids)
    row = np.zeros(allowed_mask([], V).shape, np.int32)
    g.matcher(Structured("regex", "[0-9]")).fill(row)
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:V])
    assert allowed.size and all(llm.tokenizer.decode([int(t)]) in "0123456789" for t in allowed)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 1), (1.0, 2), (1.5, 3)])
def test_json_schema_output_always_validates(llm, temperature, seed):
    before = llm.engine.runner.num_compiles
    params = SamplingParams(max_tokens=120, temperature=temperature, seed=seed,
                            structured=Structured("json", json.dumps(SCHEMA)))
    outs = llm.generate(["The orca", "Once upon a time", "x"], params, use_tqdm=False)
    for out in outs:
        assert out.finish_reason is FinishReason.STOP, out.text  # the object closed, then EOS
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert llm.engine.runner.num_compiles == before  # the constrained programs were warmed up


def test_constrained_and_free_requests_share_iterations(llm):
    """A batch mixing constrained and free rows: the free ones give the tokens they give alone."""
    free = SamplingParams(max_tokens=12, temperature=0.0)
    alone = llm.generate(["The orca swims", "A seal"], free, use_tqdm=False)
    mixed = llm.generate(["The orca swims", "A seal", "x", "y"],
                         [free, free, SamplingParams(max_tokens=60, structured=Structured("json_object")),
                          SamplingParams(max_tokens=20, structured=Structured("regex", "(ab|cd){1,4}!"))],
                         use_tqdm=False)
    assert [o.token_ids for o in mixed[:2]] == [o.token_ids for o in alone]
    assert isinstance(json.loads(mixed[2].text), dict)
    import re
    assert re.fullmatch(r"(ab|cd){1,4}!", mixed[3].text), mixed[3].text


def test_choice(llm):
    choices = ["yes", "no", "maybe later"]
    outs = llm.generate(["Is it?"] * 4, [SamplingParams(max_tokens=10, temperature=1.0, seed=s,
                                                        structured=Structured("choice", json.dumps(choices)))
                                         for s in range(4)], use_tqdm=False)
    assert all(o.text in choices for o in outs), [o.text for o in outs]


def test_allowed_token_ids_and_logit_bias(llm):
    allowed = (7, 11, 300)
    outs = llm.generate(["The orca"] * 2, [
        SamplingParams(max_tokens=16, temperature=1.0, seed=0, allowed_token_ids=allowed),
        SamplingParams(max_tokens=16, temperature=1.0, seed=0, logit_bias={"42": 100.0})], use_tqdm=False)
    assert set(outs[0].token_ids) <= set(allowed) and len(outs[0].token_ids) == 16
    assert outs[1].token_ids == [42] * 16  # +100 outweighs any logit of this model
    # A bias of -100 on the greedy choice moves greedy decoding elsewhere, nothing more.
    greedy = llm.generate("The orca", SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)[0]
    banned = llm.generate("The orca", SamplingParams(max_tokens=1, temperature=0.0,
                                                     logit_bias={greedy.token_ids[0]: -100}), use_tqdm=False)[0]
    assert banned.token_ids != greedy.token_ids


def test_logprobs_stay_raw(llm):
    """vLLM's raw logprobs: the sampled token's logprob is the model's, before masks and biases."""
    free = llm.generate("The orca", SamplingParams(max_tokens=1, temperature=0.0, logprobs=5), use_tqdm=False)[0]
    forced = llm.generate("The orca", SamplingParams(max_tokens=1, temperature=0.0, logprobs=5,
                                                     logit_bias={"42": 100.0}), use_tqdm=False)[0]
    assert forced.token_ids == [42]
    assert forced.logprobs[0]["top"] == pytest.approx(free.logprobs[0]["top"], abs=1e-5)
    assert forced.logprobs[0]["logprob"] < free.logprobs[0]["logprob"]


def test_bad_grammar_is_refused_before_admission(llm):
    with pytest.raises(ValueError, match="regex"):
        llm.engine.add_request("x", SamplingParams(structured=Structured("regex", "(")))
    assert not llm.engine.has_unfinished()


def test_constraint_tensors_unconstrained_rows_are_all_ones(llm):
    V = llm.engine.model_config.vocab_size
    st = constraint_tensors([], 4, V)
    assert (st["allow"] == -1).all() and (st["bias_ids"] == V).all() and not st["bias"].any()
