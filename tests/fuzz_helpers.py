"""Raw senders, response checks and Hypothesis strategies for tests/test_fuzz.py.

The senders put exact bytes on the wire (literal `NaN`, invalid UTF-8, a lone `\\ud800`
escape, a body nested 100 000 deep, a protobuf that does not parse), which `json.dumps` and the
generated gRPC stubs would never produce.
"""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
from hypothesis import strategies as st

from orca_jax.proto import generation_pb2 as pb

GENERATE = "/orca_jax.v1.Generation/Generate"

# The /v1/completions fields and the JSON type each takes (docs/serving.md, HTTP API). `null`
# means "the default" for every field but `prompt`, so it never counts as a wrong type here.
HTTP_FIELDS = {
    "prompt": "prompt", "max_tokens": "integer", "temperature": "number", "top_p": "number",
    "top_k": "integer", "min_p": "number", "repetition_penalty": "number",
    "presence_penalty": "number", "frequency_penalty": "number", "seed": "integer",
    "stop": "stop", "stop_token_ids": "ids", "ignore_eos": "boolean", "min_tokens": "integer",
    "logprobs": "integer", "include_stop_str_in_output": "boolean", "n": "integer",
    "stream": "boolean",
}
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")
INT_FIELDS = ("max_tokens", "top_k", "seed", "min_tokens", "logprobs", "n")
PROTO_FIELDS = set(pb.GenerateRequest.DESCRIPTOR.fields_by_name) | set(
    pb.SamplingParameters.DESCRIPTOR.fields_by_name)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def right_type(kind: str, v) -> bool:
    """Whether `v` has the JSON type `kind` wants (whatever its range)."""
    if kind == "integer":
        return _is_int(v)
    if kind == "number":
        return _is_int(v) or isinstance(v, float)
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "stop":
        return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
    if kind == "ids":
        return isinstance(v, list) and all(_is_int(x) for x in v)
    if kind == "prompt":
        return isinstance(v, str) or (isinstance(v, list) and (
            all(isinstance(x, str) for x in v) or all(_is_int(x) for x in v)
            or all(isinstance(x, list) and all(_is_int(t) for t in x) for x in v)))
    raise ValueError(kind)


def ambiguous(kind: str, v) -> bool:
    """Values a lenient server may take or refuse: `null` outside `prompt` (the default),
    integral floats for integer fields (pydantic's lax mode, vLLM's parser, takes 2.0 for 2)."""
    if v is None:
        return kind != "prompt"
    return kind == "integer" and isinstance(v, float) and v.is_integer()


# -- HTTP ---------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int | None            # None: no HTTP response at all (reset, closed, timed out)
    body: object                  # parsed JSON, or the raw text
    content_type: str = ""
    error: str | None = None      # why there was no response

    def __repr__(self):
        b = self.body if not isinstance(self.body, str) else self.body[:300]
        return f"Reply({self.status}, {b!r}{', ' + self.error if self.error else ''})"


def post_raw(base_url: str, body: bytes, path: str = "/v1/completions", timeout: float = 30,
             chunked: bool = False, headers: dict | None = None) -> Reply:
    """POSTs exactly `body` (one fresh connection) and returns the reply, parsed when JSON."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            hdrs["Transfer-Encoding"] = "chunked"
            conn.putrequest("POST", path)
            for k, v in hdrs.items():
                conn.putheader(k, v)
            conn.endheaders()
            for i in range(0, len(body), 64 * 1024):
                piece = body[i:i + 64 * 1024]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.request("POST", path, body=body, headers=hdrs)
        r = conn.getresponse()
        raw, ctype = r.read(), r.getheader("Content-Type", "")
        status = r.status
    except (OSError, http.client.HTTPException) as e:
        return Reply(None, None, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    text = raw.decode("utf-8", "replace")
    if ctype.startswith("application/json"):
        try:
            return Reply(status, json.loads(text), ctype)
        except ValueError:
            pass
    return Reply(status, text, ctype)


def post_json(base_url: str, obj, **kw) -> Reply:
    """`obj` as JSON; ensure_ascii keeps lone surrogates as `\\udXXX` escapes."""
    return post_raw(base_url, json.dumps(obj, ensure_ascii=True, allow_nan=True).encode(), **kw)


def check_reply(r: Reply, params: set[str] | None, statuses=frozenset({400})) -> None:
    """A 4xx in `statuses` with OpenAI's error body; `param` in `params` (None: any non-empty
    field name) and at the start of the message."""
    assert r.status is not None, f"no HTTP response: {r}"
    assert r.status < 500, f"server error: {r}"
    assert r.status in statuses, f"expected {sorted(statuses)}: {r}"
    assert r.content_type.startswith("application/json") and isinstance(r.body, dict), \
        f"error body is not JSON: {r}"
    err = r.body.get("error")
    assert isinstance(err, dict) and {"message", "type", "param", "code"} <= set(err), \
        f"not OpenAI's error shape: {r}"
    assert isinstance(err["message"], str) and err["message"], r
    if r.status == 429:
        return
    assert isinstance(err["param"], str) and err["param"], f"param does not name a field: {r}"
    if params is not None:
        assert err["param"] in params, f"param should be one of {sorted(params)}: {r}"
    assert err["message"].startswith(f"{err['param']}:"), f"message does not start with the field: {r}"


def check_success(r: Reply) -> None:
    """A 200 that is a whole completion: JSON with choices, or an SSE stream ending [DONE]."""
    assert r.status == 200, r
    if r.content_type.startswith("text/event-stream"):
        events = [line[6:] for line in r.body.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"stream did not end with [DONE]: {r}"
        for e in events[:-1]:
            assert "error" not in json.loads(e), f"error inside a 200 stream: {r}"
    else:
        assert isinstance(r.body, dict) and r.body.get("choices"), r


def check_any(r: Reply, params: set[str] | None, statuses=frozenset({400})) -> None:
    """Either a whole completion or a well-formed refusal (`check_reply`)."""
    if r.status == 200:
        check_success(r)
    else:
        check_reply(r, params, statuses)


# -- gRPC ---------------------------------------------------------------------------------------


def grpc_raw(channel: grpc.Channel, payload: bytes, timeout: float = 30):
    """Sends `payload` as the serialized GenerateRequest; (status code, details, responses)."""
    call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
    try:
        outs = [pb.GenerateResponse.FromString(b) for b in call(payload, timeout=timeout)]
        return grpc.StatusCode.OK, "", outs
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []


def check_grpc(code, details: str, outs, fields: set[str] | None, allow_ok: bool = False) -> None:
    """INVALID_ARGUMENT whose message starts with a field in `fields` (None: any proto field);
    or, with allow_ok, a normal finished stream."""
    if allow_ok and code == grpc.StatusCode.OK:
        assert outs and outs[-1].finished, f"stream ended without a finished response: {outs[-1:]}"
        return
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code}: {details!r}"
    name = details.split(":", 1)[0]
    want = PROTO_FIELDS if fields is None else fields
    assert ":" in details and name in want, f"message should start with one of {sorted(want)}: {details!r}"


# -- strategies ---------------------------------------------------------------------------------

HUGE_INTS = (2**31, -2**31 - 1, 2**32, 2**63, -2**63 - 1, 2**64, 10**30, -10**30)
NON_FINITE = (b"NaN", b"Infinity", b"-Infinity", b"1e309", b"-1e309", b"1e400")
SURROGATES = ("\ud800", "\udbff", "\udc00", "\udfff")

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE_INTS),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)


# A right element for each list-valued kind: a wrong one is mixed in beside it.
LIST_ELEMENTS = {"stop": "xyz", "ids": 1, "prompt": "a"}


@st.composite
def wrong_type(draw, kind: str):
    v = draw(json_value)
    if kind in LIST_ELEMENTS and draw(st.booleans()):  # a list with one element of another type
        v = draw(st.permutations([LIST_ELEMENTS[kind], draw(json_value)]))
    if kind == "prompt" and draw(st.booleans()):  # lists that mix the prompt forms
        v = draw(st.permutations(["a", 1, [2], draw(json_value)]))[: draw(st.integers(2, 4))]
    if right_type(kind, v) or ambiguous(kind, v):
        v = {"unexpected": v}  # an object is the wrong type for every field
    return v


def field_values(kind: str):
    """Any value for a field: its own type (in range or not) and every other JSON type."""
    own = {
        "integer": st.one_of(st.integers(-3, 20), st.integers(), st.sampled_from(HUGE_INTS)),
        "number": st.one_of(st.floats(-3, 3), st.floats(allow_nan=False, allow_infinity=False),
                            st.integers(-3, 3)),
        "boolean": st.booleans(),
        "stop": st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=5)),
        "ids": st.lists(st.one_of(st.integers(0, 5000), st.integers()), max_size=17),
        "prompt": st.one_of(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=8), max_size=3),
                            st.lists(st.integers(-5, 5000), max_size=8)),
    }[kind]
    return st.one_of(own, json_value)


def with_lone_surrogate(text_strategy=st.text(max_size=20)):
    """A string with at least one lone UTF-16 surrogate somewhere in it."""
    @st.composite
    def build(draw):
        s = draw(text_strategy)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(s)))
            s = s[:i] + draw(st.sampled_from(SURROGATES)) + s[i:]
        return s
    return build()


INVALID_UTF8 = (b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                b"\xe2\x82", b"\xf0\x9f\x98")  # bad start, overlong, CESU surrogate, > U+10FFFF,
                                                # lone continuation, truncated sequences


@st.composite
def byte_mutations(draw, valid: bytes) -> bytes:
    """`valid` with a few random byte edits: replace, insert, delete, duplicate a slice."""
    b = bytearray(valid)
    specials = [b"NaN", b"Infinity", b"\\ud800", b"\xff", b"[", b"{", b"}", b"]", b",", b":", b'"',
                b"\\", b"1e999", b"-", b"null", b"9" * 30, b"\x00"]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "duplicate", "special"]))
        i = draw(st.integers(0, len(b)))
        if op == "replace" and i < len(b):
            b[i] = draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del b[i:i + draw(st.integers(1, 8))]
        elif op == "duplicate":
            j = draw(st.integers(i, min(len(b), i + 16)))
            b[i:i] = b[i:j]
        else:
            b[i:i] = draw(st.sampled_from(specials))
    return bytes(b)
