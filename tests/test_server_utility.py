"""vLLM's utility endpoints and response fields on a real server over loopback: /tokenize,
/detokenize, /version, /ping, stop_reason and system_fingerprint, with the demo model (a chat
template added) and vLLM's request and response shapes."""
import re

import pytest
from test_chat import CHATML, MESSAGES, with_template
from test_server import http

from orca_jax import LLM, SamplingParams, __version__
from orca_jax.async_engine import AsyncEngine
from orca_jax.engine import EngineConfig
from orca_jax.server import BackgroundServer, ServerConfig


@pytest.fixture(scope="module")
def served(demo_model_dir, tmp_path_factory):
    model = with_template(demo_model_dir, tmp_path_factory.mktemp("util") / "model", CHATML)
    llm = LLM(str(model), engine_config=EngineConfig(max_batch_size=2, max_num_batched_tokens=32,
                                                     max_prefill_seqs=2, max_model_len=64))
    engine = AsyncEngine(llm.engine).start()
    bg = BackgroundServer(engine, ServerConfig(grpc_port=None, http_port=0), "demo").start()
    bg.tok, bg.model_dir = llm.tokenizer, model
    yield bg
    bg.stop()
    engine.shutdown()


def test_tokenize_prompt_and_messages_as_generation_sees_them(served):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(served.model_dir))
    st, out = http(served, "/tokenize", {"model": "demo", "prompt": "The sea is wide", "return_token_strs": True})
    assert st == 200, out
    ids = hf("The sea is wide")["input_ids"]
    assert out == {"count": len(ids), "max_model_len": 64, "tokens": ids,
                   "token_strs": hf.convert_ids_to_tokens(ids)}
    st, out = http(served, "/tokenize", {"messages": MESSAGES})
    want = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert st == 200 and out["tokens"] == want and out["token_strs"] is None
    # The chat endpoint's usage counts exactly these tokens.
    st, chat = http(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert st == 200 and chat["usage"]["prompt_tokens"] == out["count"]
    st, out = http(served, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert st == 200 and out["count"] < len(want)
    st, out = http(served, "/tokenize", {"prompt": ""})
    assert st == 200 and out["count"] == 0 and out["tokens"] == []


def test_detokenize_round_trips(served):
    st, out = http(served, "/tokenize", {"prompt": "Orcas hunt in pods."})
    st, text = http(served, "/detokenize", {"tokens": out["tokens"]})
    assert st == 200 and text == {"prompt": "Orcas hunt in pods."}


@pytest.mark.parametrize("path, body, field, status", [
    ("/tokenize", {}, "prompt", 400),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt", 400),
    ("/tokenize", {"prompt": 5}, "prompt", 400),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens", 400),
    ("/tokenize", {"messages": []}, "messages", 400),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model", 404),
    ("/detokenize", {"tokens": [1, "x"]}, "tokens", 400),
    ("/detokenize", {"tokens": [10**6]}, "tokens", 400),
    ("/detokenize", {}, "tokens", 400),
])
def test_bad_requests_name_the_field(served, path, body, field, status):
    st, out = http(served, path, body)
    assert st == status and out["error"]["param"] == field, out


def test_version_and_ping(served):
    assert http(served, "/version") == (200, {"version": __version__})
    st, _ = http(served, "/ping")
    assert st == 200
    st, _ = http(served, "/ping", b"", method="POST")
    assert st == 200
    st, out = http(served, "/no/such/path")
    assert st == 404 and out == {"detail": "Not Found"}  # JSON, as vLLM's (FastAPI's) answer


def test_stop_reason_and_system_fingerprint(served):
    """vLLM's choices[].stop_reason: the stop string or stop token id that ended the text
    (None for EOS and length), and its top-level system_fingerprint (the same string on every
    response of one server: version and a hash of the model and settings)."""
    prompt = "The orca"
    ids = LLM(str(served.model_dir), engine_config=EngineConfig(max_batch_size=2, max_num_batched_tokens=32,
                                                                max_prefill_seqs=2, max_model_len=64, warmup=False)
              ).generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)[0].token_ids
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    st, full = http(served, "/v1/completions", body)
    fingerprint = full["system_fingerprint"]
    assert st == 200 and re.fullmatch(r"orca-jax-[\w.+-]+-[0-9a-f]{8}", fingerprint), fingerprint
    assert full["choices"][0]["finish_reason"] == "length" and full["choices"][0]["stop_reason"] is None
    st, out = http(served, "/v1/completions", {**body, "stop_token_ids": [ids[3]]})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == ids[3]
    assert out["usage"]["completion_tokens"] == ids.index(ids[3]) + 1
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2:][:2]
    if stop.strip():
        st, out = http(served, "/v1/completions", {**body, "stop": [stop, "\x00never"]})
        assert out["choices"][0]["stop_reason"] == stop and out["choices"][0]["text"] == text[:text.index(stop)]
    st, chat = http(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0})
    assert st == 200 and chat["system_fingerprint"] == fingerprint and "stop_reason" in chat["choices"][0]


def test_request_id_header_and_field(served):
    """vLLM's request ids: the X-Request-Id header (echoed back), else the body's request_id,
    name the response (cmpl-<id>); the same id twice at once is fine."""
    import json
    import urllib.request
    body = {"prompt": "The orca", "max_tokens": 2, "temperature": 0}
    req = urllib.request.Request(served.http_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Request-Id": "abc-1"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["X-Request-Id"] == "abc-1" and json.loads(r.read())["id"] == "cmpl-abc-1"
    st, out = http(served, "/v1/completions", {**body, "request_id": "mine"})
    assert st == 200 and out["id"] == "cmpl-mine"
    st, out = http(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "request_id": "c1"})
    assert st == 200 and out["id"] == "chatcmpl-c1"
    st, out = http(served, "/v1/completions", {**body, "request_id": 7})
    assert st == 400 and out["error"]["param"] == "request_id"
    stream = urllib.request.Request(served.http_url + "/v1/completions",
                                    data=json.dumps({**body, "stream": True, "n": 1}).encode(),
                                    headers={"Content-Type": "application/json", "X-Request-Id": "s-2"})
    with urllib.request.urlopen(stream, timeout=30) as r:
        assert r.headers["X-Request-Id"] == "s-2" and b"cmpl-s-2" in r.read()
    import concurrent.futures  # the same id twice at once: both answered
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: http(served, "/v1/completions", {**body, "request_id": "dup"}), range(2)))
    assert [st for st, _ in outs] == [200, 200]
