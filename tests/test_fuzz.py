"""Fuzzing both ports with hostile input (the "Hardening" issue).

Random and adversarial JSON and protobuf: wrong types per field, huge integers, non-finite
floats, deep nesting, invalid Unicode, oversized fields, random byte mutations of a valid body.
Each example must get a 2xx or the right 4xx / INVALID_ARGUMENT, with OpenAI's JSON error body
naming the field; never a 5xx, a plain-text error, a reset connection or UNKNOWN. After every
test (one batch of examples) the engine is healthy, the three gauges are back to 0, no server
task leaked, and a normal request still returns the offline greedy tokens.

Hypothesis runs derandomized, without shrinking (an example that kills the engine would make
every later one fail for the same reason, so the first failure is the informative one) and
with a fixed number of examples, so the run is deterministic and bounded.

One server for the module (demo model, 8 KV slots x 128 tokens, the default 1 MiB request
limit). A test that kills its engine fails; the next test gets a fresh server, so one defect
does not hide the others.
"""
import concurrent.futures
import json
import random
import string
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from fuzz_helpers import (FLOAT_FIELDS, HTTP_FIELDS, HUGE_INTS, INT_FIELDS, INVALID_UTF8, NON_FINITE,
                          byte_mutations, check_any, check_grpc, check_reply, check_success,
                          field_values, grpc_raw, post_json, post_raw, with_lone_surrogate, wrong_type)
from orca_jax import LLM, SamplingParams
from orca_jax.async_engine import AsyncEngine
from orca_jax.client import Client
from orca_jax.engine import EngineConfig
from orca_jax.proto import generation_pb2 as pb
from orca_jax.request import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from orca_jax.server import BackgroundServer, ServerConfig
from test_server import CORPUS, metric, server_tasks, wait_idle, wait_tasks

MAX_LEN = 128
LIMIT = 1 << 20     # ServerConfig's default --max-request-bytes
# max_waiting 256: a request of 128 choices (the documented maximum) fits in the queue.
ENGINE = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4,
                      max_model_len=MAX_LEN, max_waiting=256)
NORMAL = ("The orca", 8)    # the request that must still be served right after each batch
BASE = {"model": "demo", "prompt": "The orca", "max_tokens": 2, "temperature": 0}


def fuzz(examples: int) -> settings:
    """Deterministic and bounded: derandomized, no database, no shrinking, no deadline."""
    return settings(derandomize=True, database=None, deadline=None, print_blob=False,
                    max_examples=examples, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


class Harness:
    """The module's server; `ensure()` replaces it when a test left its engine dead."""

    def __init__(self, model_dir):
        self.model_dir, self.bg, self.reference = model_dir, None, None

    def start(self):
        llm = LLM(self.model_dir, engine_config=ENGINE)
        if self.reference is None:
            prompt, n = NORMAL
            self.reference = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n),
                                          use_tqdm=False)[0]
        engine = AsyncEngine(llm.engine).start()
        self.bg = BackgroundServer(engine, ServerConfig(grpc_port=0, http_port=0), "demo").start()
        self.bg.reference = self.reference

    def stop(self):
        self.bg.stop()
        self.bg.engine.shutdown()

    def ensure(self):
        e = self.bg.engine
        if e.dead is not None or not e.healthy():
            print(f"\n[fuzz] the previous test left the engine dead ({e.dead}): a fresh server")
            self.stop()
            self.start()
        return self.bg


@pytest.fixture(scope="module")
def harness(demo_model_dir):
    h = Harness(demo_model_dir)
    h.start()
    yield h
    h.stop()


@pytest.fixture
def served(harness):
    """The server, and after the test: healthy, idle, no leaked task, still serving right."""
    bg = harness.ensure()
    baseline = server_tasks(bg)
    yield bg
    recovered(bg, baseline)


def recovered(served, baseline):
    e = served.engine
    assert e.dead is None and e.healthy(), f"the engine did not survive the batch: {e.dead}"
    wait_idle(served)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert metric(served, name) == 0, name
    wait_tasks(served, baseline)
    serves_right(served)
    wait_idle(served)


def serves_right(served):
    """A normal greedy request on both ports returns the offline reference."""
    prompt, n = NORMAL
    ref = served.reference
    with Client(served.grpc_target, timeout=30) as c:
        out = c.generate(prompt, max_tokens=n, temperature=0)
    assert list(out.token_ids) == list(ref.token_ids), (out.token_ids, ref.token_ids)
    r = post_json(served.http_url, {"model": "demo", "prompt": prompt, "max_tokens": n, "temperature": 0})
    check_success(r)
    assert r.body["choices"][0]["text"] == ref.text, r


def alive(served):
    """Per example: a hostile request must not take the engine down, even if it got a 4xx."""
    assert served.engine.dead is None, f"the engine died: {served.engine.dead}"


def with_field(key: str, raw_value: bytes, base=BASE) -> bytes:
    """BASE as JSON with `key` set to the raw JSON text `raw_value` (NaN, 1e309, nesting...)."""
    rest = json.dumps({k: v for k, v in base.items() if k != key}).encode()
    return rest[:-1] + b', ' + json.dumps(key).encode() + b': ' + raw_value + b'}'


# -- HTTP: types and ranges -----------------------------------------------------------------------


@fuzz(250)
@given(field=st.sampled_from(sorted(HTTP_FIELDS)), data=st.data())
def test_http_wrong_types(served, field, data):
    """A value of the wrong JSON type for any field: 400 naming that field."""
    value = data.draw(wrong_type(HTTP_FIELDS[field]), label="value")
    r = post_json(served.http_url, {**BASE, field: value})
    check_reply(r, {field})
    alive(served)


WRONG_ELEMENTS = [("stop", ["x", 1]), ("stop", ["x", 1.5]), ("stop", ["x", None]), ("stop", [["x"]]),
                  ("stop", ["x", {"s": "y"}]), ("stop_token_ids", [1, "2"]), ("stop_token_ids", [1, 1.5]),
                  ("stop_token_ids", [True]), ("stop_token_ids", [[1]]), ("prompt", ["a", 1]),
                  ("prompt", [1, "a"]), ("prompt", [[1], 2]), ("prompt", [[1, "a"]]), ("prompt", [True]),
                  ("prompt", [1.5]), ("prompt", [None])]


@pytest.mark.parametrize("field,value", WRONG_ELEMENTS)
def test_http_wrong_element_types(served, field, value):
    """A list field with one element of the wrong type: 400 naming the field."""
    check_reply(post_json(served.http_url, {**BASE, field: value}), {field})
    alive(served)


# prompt length and max_tokens are checked together: either may be named.
ALSO_NAMED = {"prompt": {"max_tokens"}, "max_tokens": {"prompt"}}


@fuzz(150)
@given(field=st.sampled_from(sorted(HTTP_FIELDS)), data=st.data())
def test_http_any_field_values(served, field, data):
    """Any JSON value for one field (its own type in and out of range, or any other type):
    a whole completion, or 400 naming that field."""
    value = data.draw(field_values(HTTP_FIELDS[field]), label="value")
    r = post_json(served.http_url, {**BASE, field: value})
    check_any(r, {field} | ALSO_NAMED.get(field, set()))
    alive(served)


# (field, how a huge integer is placed in the body, the field the error names)
HUGE_PLACES = [(f, lambda v: v, f) for f in INT_FIELDS] + [
    ("stop_token_ids", lambda v: [v], "stop_token_ids"),
    ("prompt", lambda v: [v], "prompt"),
    ("prompt", lambda v: [[1, 2], [v]], "prompt"),
]


@pytest.mark.parametrize("field,place,param", HUGE_PLACES,
                         ids=[f"{p[0]}-{i}" for i, p in enumerate(HUGE_PLACES)])
def test_http_huge_ints(served, field, place, param):
    """Integers past int32 / int64 (what the device and the seed hold): 400 naming the field;
    a seed in [0, 2**63) is valid."""
    for v in HUGE_INTS:
        r = post_json(served.http_url, {**BASE, field: place(v)})
        if field == "seed" and 0 <= v < 2**63:
            check_success(r)
        else:
            check_reply(r, {param})
        alive(served)


@pytest.mark.parametrize("field,value", [("top_k", 2**31 - 1), ("top_k", -1), ("seed", 2**63 - 1),
                                         ("seed", 0), ("stop_token_ids", [4095] * 15), ("logprobs", 20),
                                         ("temperature", 1e-320), ("n", 16)])
def test_http_edges_that_are_valid(served, field, value):
    sampled = {"temperature": 1.0} if field == "n" else {}  # n > 1 needs sampling (greedy: 400)
    check_success(post_json(served.http_url, {**BASE, field: value, **sampled}))


NON_FINITE_PLACES = [(f, lambda lit: lit, {f, "body"}) for f in FLOAT_FIELDS + INT_FIELDS] + [
    ("stop", lambda lit: b'["x", ' + lit + b']', {"stop", "body"}),
    ("stop_token_ids", lambda lit: b'[1, ' + lit + b']', {"stop_token_ids", "body"}),
    ("prompt", lambda lit: b'[464, ' + lit + b']', {"prompt", "body"}),
]


@pytest.mark.parametrize("field,place,params", NON_FINITE_PLACES,
                         ids=[f"{p[0]}-{i}" for i, p in enumerate(NON_FINITE_PLACES)])
def test_http_non_finite(served, field, place, params):
    """JSON's NaN/Infinity literals and numbers that overflow a double (1e309): 400 naming the
    field or the body."""
    for lit in NON_FINITE:
        check_reply(post_raw(served.http_url, with_field(field, place(lit))), params)
        alive(served)


def test_http_non_finite_in_an_ignored_field(served):
    """Unknown fields are ignored (as vLLM does): a NaN there may be refused as a bad body or
    ignored, never a 5xx."""
    for lit in NON_FINITE:
        check_any(post_raw(served.http_url, with_field("user", lit)), {"body"})


# -- HTTP: nesting, Unicode, size ------------------------------------------------------------------


@fuzz(30)
@given(depth=st.one_of(st.sampled_from([1, 2, 50, 990, 1000, 5000, 100_000]), st.integers(1, 150_000)),
       opener=st.sampled_from([b"[", b'{"a":']),
       where=st.sampled_from(["top", "prompt", "stop", "stop_token_ids", "user"]),
       closed=st.booleans())
@example(depth=100_000, opener=b"[", where="top", closed=False)
@example(depth=100_000, opener=b"[", where="user", closed=True)
@example(depth=100_000, opener=b'{"a":', where="top", closed=True)
def test_http_deep_nesting(served, depth, opener, where, closed):
    """Nesting up to 150 000 deep, closed or not, as the body or inside a field: 400 naming the
    body (too deep, not JSON, not an object) or the field."""
    inner = b"1" if opener != b"[" else b""
    closer = b"]" if opener == b"[" else b"}"
    nest = opener * depth + (inner + closer * depth if closed else b"")
    if where == "top":
        r = post_raw(served.http_url, nest)
        # a closed {"a": {...}} is an object without a prompt: refused for that, or as too deep
        check_reply(r, {"body", "prompt"} if closed and opener != b"[" else {"body"})
    elif where == "user":
        r = post_raw(served.http_url, with_field("user", nest))
        (check_any if closed else check_reply)(r, {"body"})
    else:
        r = post_raw(served.http_url, with_field(where, nest))
        # `[]` is a valid (empty) stop list or id list; anything nested deeper is not
        empty_list = closed and opener == b"[" and depth == 1
        (check_any if empty_list else check_reply)(r, {where, "body"})
    alive(served)


@fuzz(40)
@given(where=st.sampled_from(["prompt", "prompt list", "stop", "stop list", "model", "user", "key"]),
       s=with_lone_surrogate())
@example(where="prompt", s="\ud800")
@example(where="stop", s="\ud800")
def test_http_lone_surrogates(served, where, s):
    """A lone surrogate (`"\\ud800"`, valid JSON, not a Unicode string) in the prompt or a stop
    string: 400 naming it. In `model`: refused naming `model`. In an ignored field or key:
    ignored or refused as a bad body."""
    body = {
        "prompt": {**BASE, "prompt": s}, "prompt list": {**BASE, "prompt": ["The orca", s]},
        "stop": {**BASE, "stop": s}, "stop list": {**BASE, "stop": ["xyz", s]},
        "model": {**BASE, "model": s}, "user": {**BASE, "user": s}, "key": {**BASE, s: 1},
    }[where]
    r = post_json(served.http_url, body)
    if where in ("user", "key"):
        check_any(r, {"body"})
    elif where == "model":
        check_reply(r, {"model"}, statuses={400, 404})
    else:
        check_reply(r, {where.split()[0]})
    alive(served)


@fuzz(30)
@given(bad=st.sampled_from(INVALID_UTF8), where=st.sampled_from(["prompt", "stop", "model", "user", "key"]),
       at=st.integers(0, 8))
def test_http_invalid_utf8(served, bad, where, at):
    """Bytes that are not UTF-8 inside a string of the body: 400 naming the body (JSON text is
    UTF-8) or the field."""
    text = "The orca"[:at].encode() + bad + "The orca"[at:].encode()
    raw = json.dumps({**BASE, where: "@@"} if where != "key" else {**BASE, "@@": 1}).encode()
    r = post_raw(served.http_url, raw.replace(b"@@", text))
    check_reply(r, {"body", where} if where not in ("user", "key") else {"body"},
                statuses={400, 404} if where == "model" else {400})
    alive(served)


# The largest stop list allowed: MAX_STOP_STRINGS distinct strings of MAX_STOP_STRING_CHARS.
STOP_MAX = [f"{i:03d}" + "abcdefgh" * (MAX_STOP_STRING_CHARS // 8) for i in range(MAX_STOP_STRINGS)]
STOP_MAX = [s[:MAX_STOP_STRING_CHARS] for s in STOP_MAX]
TOO_MANY_STOPS = ["x"] * (MAX_STOP_STRINGS + 1)
TOO_LONG_STOP = "a" * (MAX_STOP_STRING_CHARS + 1)

# (case, body or raw bytes, expected: "ok" or the set of fields the 400 may name)
OVERSIZED = [
    ("2 MiB body", {**BASE, "prompt": "orca " * ((2 << 20) // 5)}, {"body"}),
    ("limit + 1 byte", None, {"body"}),
    ("2 MiB chunked", "chunked", {"body"}),
    ("100 stop strings", {**BASE, "stop": ["ab"] * 100}, {"stop"}),
    ("one stop string too many", {**BASE, "stop": TOO_MANY_STOPS}, {"stop"}),
    ("the largest stop list", {**BASE, "stop": STOP_MAX}, "ok"),
    ("10000-char stop", {**BASE, "stop": "a" * 10_000}, {"stop"}),
    ("a stop string too long", {**BASE, "stop": [TOO_LONG_STOP]}, {"stop"}),
    ("16 stop_token_ids", {**BASE, "stop_token_ids": [1] * 16}, {"stop_token_ids"}),
    ("n 17", {**BASE, "n": 17}, {"n"}),
    ("logprobs 21", {**BASE, "logprobs": 21}, {"logprobs"}),
    ("9 prompts x n 16", {**BASE, "prompt": ["a"] * 9, "n": 16, "max_tokens": 1}, {"prompt", "n"}),
    ("129 prompts", {**BASE, "prompt": ["a"] * 129, "max_tokens": 1}, {"prompt", "n"}),
    ("10000 prompts", {**BASE, "prompt": ["a"] * 10_000, "max_tokens": 1}, {"prompt", "n"}),
    ("8 prompts x n 16", {**BASE, "prompt": ["a"] * 8, "n": 16, "max_tokens": 1, "temperature": 1.0}, "ok"),
    ("100k token ids", {**BASE, "prompt": [464] * 100_000}, {"input_tokens"}),
    ("20 kB of text", {**BASE, "prompt": " ".join(CORPUS)}, {"prompt"}),
    ("prompt + max_tokens over the context", {**BASE, "max_tokens": MAX_LEN}, "ok"),  # cut to the room left
    ("50 000 unknown fields", {**BASE, **{f"x{i}": i for i in range(50_000)}}, "ok"),
]


@pytest.mark.parametrize("case,body,want", OVERSIZED, ids=[c[0] for c in OVERSIZED])
def test_http_oversized(served, case, body, want):
    if body == "chunked":
        raw = json.dumps({**BASE, "prompt": "orca " * ((2 << 20) // 5)}).encode()
        r = post_raw(served.http_url, raw, chunked=True)
    elif body is None:
        raw = json.dumps(BASE).encode()
        r = post_raw(served.http_url, raw[:-1] + b" " * (LIMIT + 1 - len(raw)) + b"}")
    else:
        raw = json.dumps(body).encode()
        r = post_raw(served.http_url, raw)
    if want == "ok":
        check_success(r)
    else:
        check_reply(r, want)


def test_http_body_not_an_object(served):
    for raw in (b"", b"null", b"1", b'"prompt"', b"[]", b'[{"prompt": "x"}]', b"true", b"{}{}",
                b'{"prompt": "x"} trailing', b"\xef\xbb\xbf" + json.dumps(BASE).encode()):
        r = post_raw(served.http_url, raw)
        if raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte-order mark: taken or refused, cleanly
            check_any(r, {"body"})
        else:
            check_reply(r, {"body", "prompt"} if raw == b"{}" else {"body"})


VALID_RICH = json.dumps({"model": "demo", "prompt": "The orca", "max_tokens": 2, "temperature": 0.5,
                         "top_p": 0.9, "top_k": 5, "stop": ["xyz"], "seed": 3, "n": 1, "logprobs": 1,
                         "stream": False}).encode()


@fuzz(150)
@given(raw=byte_mutations(VALID_RICH))
def test_http_random_mutations(served, raw):
    """A valid body with a few random byte edits: a completion, 400 naming a field or the body,
    or 404 for a mangled model name."""
    check_any(post_raw(served.http_url, raw), None, statuses={400, 404})
    alive(served)


# -- gRPC -----------------------------------------------------------------------------------------

MALFORMED = [
    ("not a message", b"\xff"),
    ("truncated varint", b"\x08"),
    ("field 0", b"\x00"),
    ("length past the end", b"\x12\x10abc"),
    ("prompt not UTF-8", b"\x12\x02\xff\xfe"),
    ("stop not UTF-8", b"\x22\x04\x52\x02\xff\xfe"),
    ("varint too long", b"\x1a\x0b" + b"\xff" * 10 + b"\x01"),
    ("sampling truncated", b"\x22\x03\x08\x80"),
    ("wrong wire type for sampling", b"\x20\x05"),
    ("open group", b"\x13"),
    ("nested length bomb", b"\x22\xff\xff\xff\xff\x0f"),
]


@pytest.mark.parametrize("case,payload", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_grpc_malformed_bytes(served, case, payload):
    """Bytes that do not parse as a GenerateRequest: INVALID_ARGUMENT (not UNKNOWN)."""
    with grpc.insecure_channel(served.grpc_target) as ch:
        code, details, _ = grpc_raw(ch, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code}: {details!r}"
    assert details, "INVALID_ARGUMENT without a message"


@fuzz(60)
@given(payload=st.one_of(st.binary(max_size=64),
                         byte_mutations(pb.GenerateRequest(prompt="The orca", sampling=pb.SamplingParameters(
                             max_tokens=2, temperature=0.0, stop=["xyz"], top_k=3)).SerializeToString())))
def test_grpc_random_bytes(served, payload):
    """Random bytes, and random edits of a valid request: a finished stream or INVALID_ARGUMENT
    (bytes that happen to parse may be a valid request, or name a bad field)."""
    with grpc.insecure_channel(served.grpc_target) as ch:
        code, details, outs = grpc_raw(ch, payload)
    if code == grpc.StatusCode.OK:
        check_grpc(code, details, outs, None, allow_ok=True)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code}: {details!r}"
    alive(served)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_grpc_non_finite_floats(served, field):
    with Client(served.grpc_target, timeout=30) as c:
        for v in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(grpc.RpcError) as e:
                c.generate("The orca", max_tokens=2, **{field: v})
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (v, e.value.details())
            assert e.value.details().startswith(f"{field}:"), (v, e.value.details())
            alive(served)


VOCAB = 4096
int32 = st.integers(-2**31, 2**31 - 1)
# In-range values for every sampling field (a random subset is set)...
SAMPLING_OK = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_k": st.integers(0, 50),
    "top_p": st.floats(0.01, 1), "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.5, 2),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "seed": st.integers(0, 2**63 - 1), "stop": st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=15), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1), "logprobs": st.integers(0, 20),
    "include_stop_str_in_output": st.booleans(),
})
# ...and at most one field over its whole protobuf range.
any_double = st.one_of(st.sampled_from([float("inf"), float("-inf"), float("nan"), 3.5e38, 1e300,
                                         -0.0, 5e-324]), st.floats())
SAMPLING_WILD = {
    "max_tokens": st.one_of(st.integers(-2, 130), int32), "temperature": any_double,
    "top_k": int32, "top_p": any_double, "min_p": any_double, "repetition_penalty": any_double,
    "presence_penalty": any_double, "frequency_penalty": any_double,
    "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.lists(st.text(max_size=300), max_size=70),
    "stop_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=17),
    "min_tokens": st.one_of(st.integers(-2, 4), int32), "logprobs": int32,
}
# Values that are invalid whatever else the request says (docs/serving.md, the issue's limits);
# NaN fails every comparison, so every range below refuses it.
CLEARLY_BAD = {
    "max_tokens": lambda v: v < 1 or v >= MAX_LEN,
    "temperature": lambda v: not 0 <= v < float("inf"),
    "top_k": lambda v: v < -1,
    "top_p": lambda v: not 0 < v <= 1,
    "min_p": lambda v: not 0 <= v <= 1,
    "repetition_penalty": lambda v: not 0 < v < float("inf"),
    "presence_penalty": lambda v: not -2 <= v <= 2,
    "frequency_penalty": lambda v: not -2 <= v <= 2,
    "seed": lambda v: v < 0,
    "stop": lambda v: len(v) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_STRING_CHARS for s in v),
    "stop_token_ids": lambda v: len(v) > 15 or any(t >= VOCAB for t in v),
    "min_tokens": lambda v: v < 0,
    "logprobs": lambda v: not 0 <= v <= 20,
}


@st.composite
def wild_sampling(draw):
    """(sampling fields, the wild field or None)."""
    fields = draw(SAMPLING_OK)
    wild = draw(st.sampled_from([None, *sorted(SAMPLING_WILD)]))
    if wild is not None:
        fields[wild] = draw(SAMPLING_WILD[wild])
    return fields, wild


@fuzz(100)
@given(prompt=st.one_of(st.text(min_size=1, max_size=40).filter(str.strip),
                        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10)),
       drawn=wild_sampling(), request_id=st.one_of(st.just(""), st.text(max_size=20)))
def test_grpc_sampling_fuzz(served, prompt, drawn, request_id):
    """Valid requests with at most one field drawn from its whole protobuf range (int32, int64,
    any double including inf and nan, long stop lists): a finished stream or INVALID_ARGUMENT
    naming a field; when the wild value is out of bounds on its own, INVALID_ARGUMENT naming it
    (or the prompt or max_tokens, which the length checks may name first)."""
    sampling, wild = drawn
    sampling.setdefault("max_tokens", 2)
    req = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParameters(**sampling))
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(prompt)
    bad = wild is not None and CLEARLY_BAD[wild](sampling[wild])
    with grpc.insecure_channel(served.grpc_target) as ch:
        code, details, outs = grpc_raw(ch, req.SerializeToString())
    check_grpc(code, details, outs, {wild, "prompt", "prompt_token_ids", "max_tokens"} if bad else None,
               allow_ok=not bad)
    alive(served)


GRPC_OVERSIZED = [
    ("100 stop strings", dict(stop=["ab"] * 100), "stop"),
    ("one stop string too many", dict(stop=TOO_MANY_STOPS), "stop"),
    ("the largest stop list", dict(stop=STOP_MAX), None),
    ("10000-char stop", dict(stop=["a" * 10_000]), "stop"),
    ("a stop string too long", dict(stop=[TOO_LONG_STOP]), "stop"),
    ("16 stop_token_ids", dict(stop_token_ids=[1] * 16), "stop_token_ids"),
    ("logprobs 21", dict(logprobs=21), "logprobs"),
    ("top_k int32 min", dict(top_k=-2**31), "top_k"),
    ("seed int64 min", dict(seed=-2**63), "seed"),
    ("min_tokens int32 max", dict(min_tokens=2**31 - 1), "min_tokens"),
    ("max_tokens int32 max", dict(max_tokens=2**31 - 1), "max_tokens"),
    ("top_k int32 max", dict(top_k=2**31 - 1), None),
]


@pytest.mark.parametrize("case,fields,field", GRPC_OVERSIZED, ids=[c[0] for c in GRPC_OVERSIZED])
def test_grpc_limits(served, case, fields, field):
    with Client(served.grpc_target, timeout=30) as c:
        if field is None:
            assert c.generate("The orca", **{"max_tokens": 2, **fields}).completion_tokens >= 1
            return
        with pytest.raises(grpc.RpcError) as e:
            c.generate("The orca", **{"max_tokens": 2, **fields})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith(f"{field}:"), e.value.details()


def test_grpc_oversized_messages(served):
    """Over --max-request-bytes: INVALID_ARGUMENT naming the largest field; over gRPC's own
    receive limit (4 x the limit): RESOURCE_EXHAUSTED before parsing (docs/serving.md)."""
    with Client(served.grpc_target, timeout=30) as c:
        for prompt, field in (("orca " * (LIMIT // 4), "prompt"), ([464] * 300_000, "prompt_token_ids")):
            with pytest.raises(grpc.RpcError) as e:
                c.generate(prompt, max_tokens=2)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert e.value.details().startswith(f"{field}:"), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            c.generate("orca " * LIMIT, max_tokens=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()


# -- both ports at once ----------------------------------------------------------------------------


def hostile_batch():
    """One of each kind of hostile request, as thunks that check their own reply."""
    def http_case(raw, params, statuses=frozenset({400})):
        return lambda s: check_reply(post_raw(s.http_url, raw), params, statuses)

    def grpc_case(payload):
        def run(s):
            with grpc.insecure_channel(s.grpc_target) as ch:
                code, details, _ = grpc_raw(ch, payload)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code}: {details!r}"
        return run
    cases = [
        http_case(json.dumps({**BASE, "top_k": 2**31}).encode(), {"top_k"}),
        http_case(json.dumps({**BASE, "seed": 2**63}).encode(), {"seed"}),
        http_case(with_field("temperature", b"Infinity"), {"temperature", "body"}),
        http_case(with_field("repetition_penalty", b"1e309"), {"repetition_penalty", "body"}),
        http_case(b"[" * 100_000, {"body"}),
        http_case(json.dumps({**BASE, "prompt": "\ud800"}).encode(), {"prompt"}),
        http_case(json.dumps({**BASE, "stop": ["\udfff"]}).encode(), {"stop"}),
        http_case(with_field("prompt", b'"\xff"'), {"body", "prompt"}),
        http_case(json.dumps({**BASE, "stop": ["ab"] * 100}).encode(), {"stop"}),
        http_case(json.dumps({**BASE, "prompt": ["a"] * 200}).encode(), {"prompt", "n"}),
        http_case(json.dumps({**BASE, "prompt": "orca " * ((2 << 20) // 5)}).encode(), {"body"}),
        grpc_case(b"\x12\x10abc"),
        grpc_case(pb.GenerateRequest(prompt="The orca", sampling=pb.SamplingParameters(
            temperature=float("nan"))).SerializeToString()),
        grpc_case(pb.GenerateRequest(prompt="The orca", sampling=pb.SamplingParameters(
            repetition_penalty=float("inf"))).SerializeToString()),
    ]
    return cases


def test_hostile_batch_alongside_normal_streams(served):
    """Normal greedy streams running while a pool of clients sends every kind of hostile
    request on both ports: the streams finish with the reference tokens."""
    prompt, n = NORMAL
    ref = list(served.reference.token_ids)
    errors, results = [], []

    def normal():
        with Client(served.grpc_target, timeout=60) as c:
            for _ in range(3):
                results.append(list(c.generate(prompt, max_tokens=n, temperature=0).token_ids))

    def hostile(case):
        try:
            case(served)
        except AssertionError as e:
            errors.append(str(e))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        normals = [pool.submit(normal) for _ in range(3)]
        for f in [pool.submit(hostile, c) for _ in range(2) for c in hostile_batch()]:
            f.result()
        for f in normals:
            f.result()
    assert not errors, "\n".join(errors)
    assert results == [ref] * 9


# -- latency under the largest requests the limits allow -------------------------------------------


@pytest.mark.slow
def test_worst_stream_gap_under_largest_requests(served):
    """An unrelated greedy stream keeps flowing while other clients send the largest requests
    the limits allow: a ~1 MiB text prompt (refused as over the context), the longest text
    that is tokenized before it is refused, and the largest stop list, a new random one each
    time (so that each builds its own automaton; served). Prints the worst gap between two
    chunks, unloaded and loaded; asserts only a loose bound."""
    text = " ".join(CORPUS)
    big = (text * (LIMIT // len(text) + 1))[: LIMIT - 200]
    big_body = json.dumps({**BASE, "prompt": big}).encode()
    assert len(big_body) <= LIMIT
    rng = random.Random(0)

    def stops_body():
        stops = ["".join(rng.choice(string.ascii_letters) for _ in range(MAX_STOP_STRING_CHARS))
                 for _ in range(MAX_STOP_STRINGS)]
        return json.dumps({**BASE, "max_tokens": 100, "ignore_eos": True, "stop": stops}).encode()

    longest = served.server.limits.max_model_len * served.server.tokenizer.max_token_bytes
    tokenized_body = json.dumps({**BASE, "prompt": (text * (longest // len(text) + 1))[:longest]}).encode()

    def gaps(seconds: float) -> list[float]:
        """Gaps between the chunks of back-to-back 100-token streams, for `seconds`."""
        out, end = [], time.monotonic() + seconds
        with Client(served.grpc_target, timeout=60) as c:
            while time.monotonic() < end:
                last = None
                for _ in c.stream("The orca", max_tokens=100, ignore_eos=True, temperature=0):
                    now = time.monotonic()
                    if last is not None:
                        out.append(now - last)
                    last = now
        return out

    def summary(g: list[float]) -> str:
        g = sorted(g)
        return (f"worst {g[-1] * 1e3:.0f} ms, p99 {g[int(0.99 * (len(g) - 1))] * 1e3:.0f} ms, "
                f"mean {sum(g) / len(g) * 1e3:.1f} ms over {len(g)} gaps")

    # vLLM names an over-long prompt "input_tokens" over HTTP (docs/serving.md, the length rule)
    too_long = lambda r: check_reply(r, {"prompt", "input_tokens", "max_tokens"})
    floods = {"1 MiB prompts": (lambda: big_body, too_long),
              "longest tokenized prompts": (lambda: tokenized_body, too_long),
              "largest stop lists": (stops_body, check_success)}
    bad: list[str] = []

    def under(kinds: list[str], seconds: float) -> tuple[list[float], dict]:
        """Gaps while two clients per kind send that kind of request back to back."""
        stop, sent = threading.Event(), dict.fromkeys(kinds, 0)

        def flood(kind):
            body, check = floods[kind]
            while not stop.is_set():
                r = post_raw(served.http_url, body(), timeout=60)
                sent[kind] += 1
                try:
                    check(r)
                except AssertionError as e:
                    bad.append(str(e))

        threads = [threading.Thread(target=flood, args=(k,)) for k in kinds for _ in range(2)]
        for t in threads:
            t.start()
        try:
            return gaps(seconds), sent
        finally:
            stop.set()
            for t in threads:
                t.join(120)

    print(f"\ninter-chunk gaps, unloaded: {summary(gaps(3.0))}")
    worst = 0.0
    for kinds in (["1 MiB prompts"], ["longest tokenized prompts"], ["largest stop lists"], list(floods)):
        g, sent = under(kinds, 6.0)
        worst = max(worst, max(g))
        print(f"inter-chunk gaps under {' + '.join(kinds)}: {summary(g)} (sent {sent})")
    assert not bad, bad[:3]
    assert worst < 2.0, f"a stream stalled {worst:.2f} s behind the largest allowed requests"
