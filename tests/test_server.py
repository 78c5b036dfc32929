"""A real server on loopback (gRPC + HTTP, random free ports) over the demo model.

One server for the module (engine warm-up is the slow part): a small engine, 8 KV slots, 128
tokens per slot, 64 waiting requests at most. The offline greedy reference is computed with
`LLM.generate` on the same Engine before the server takes it over.
"""
import asyncio
import math
import json
import random
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from orca_jax import LLM, SamplingParams
from orca_jax.async_engine import AsyncEngine
from orca_jax.client import AsyncClient, Client, make_request
from orca_jax.engine import EngineConfig
from orca_jax.proto import generation_pb2 as pb
from orca_jax.server import BackgroundServer, ServerConfig

MAX_LEN = 128
MAX_REQUEST_BYTES = 64 * 1024
ENGINE = EngineConfig(max_batch_size=8, max_num_batched_tokens=64, max_prefill_seqs=4,
                      max_model_len=MAX_LEN, max_waiting=64)
CORPUS = (Path(__file__).parent.parent / "orca_jax" / "demo_corpus.txt").read_text().split()


def workload(n: int, seed: int = 0):
    """Mixed prompt and output lengths that fit the 128-token context."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 40)
        start = rng.randrange(len(CORPUS) - k)
        out.append((" ".join(CORPUS[start:start + k]), rng.randint(1, 40)))
    return out


@pytest.fixture(scope="module")
def served(demo_model_dir):
    llm = LLM(demo_model_dir, engine_config=ENGINE)
    work = workload(64)
    tok = llm.tokenizer
    work = [(p, min(m, MAX_LEN - len(tok.encode(p)))) for p, m in work]
    ref = llm.generate([p for p, _ in work],
                       [SamplingParams(temperature=0.0, max_tokens=m) for _, m in work], use_tqdm=False)
    engine = AsyncEngine(llm.engine).start()
    bg = BackgroundServer(engine, ServerConfig(grpc_port=0, http_port=0,
                                               max_request_bytes=MAX_REQUEST_BYTES), "demo").start()
    bg.work, bg.reference, bg.tokenizer, bg.llm = work, ref, tok, llm
    yield bg
    bg.stop()
    engine.shutdown()


# -- helpers ----------------------------------------------------------------------------------


def http(served, path, body=None, method=None, headers=None):
    """(status, parsed JSON or text) of one HTTP request."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(served.http_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def metric(served, name) -> float:
    _, text = http(served, "/metrics")
    m = re.search(rf'^{re.escape(name)}{{engine="0",model_name="demo"}} (\S+)$', text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def aborts(served) -> float:
    _, text = http(served, "/metrics")
    m = re.search(r'^vllm:request_success_total{engine="0",finished_reason="abort",model_name="demo"} (\S+)$', text, re.M)
    assert m, "vllm:request_success_total{finished_reason=abort} missing"
    return float(m.group(1))


def server_tasks(served) -> int:
    async def count():
        return len(asyncio.all_tasks())
    return served.call(count())


def wait_idle(served, timeout=10.0):
    """Until /metrics shows no running or waiting request and no reserved KV slot."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(served, "vllm:num_requests_running") == 0 and metric(served, "vllm:num_requests_waiting") == 0
                and metric(served, "vllm:kv_cache_usage_perc") == 0 and served.engine.num_unfinished() == 0):
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle after {timeout} s: {served.engine.snapshot}, "
                         f"{served.engine.num_unfinished()} unfinished")


def describe_tasks(served) -> list[str]:
    """The server loop's tasks, each with its name and innermost frame (gRPC's own tasks are
    Cython coroutines: their repr says nothing, their name and frame say which they are)."""
    async def describe():
        out = []
        for t in asyncio.all_tasks():
            stack = t.get_stack(limit=1)
            where = f" at {stack[0].f_code.co_name}" if stack else ""
            out.append(f"{t.get_name()}: {t.get_coro()!r}{where}")
        return sorted(out)
    return served.call(describe())


def wait_tasks(served, baseline, timeout=5.0, settle=0.5):
    """Until the server loop is back to `baseline` tasks and stays there for `settle` seconds.

    A count that touches the baseline once is not enough: gRPC core can hand the server a call
    the client had already cancelled a little after the client gave up (measured on a loaded
    2-core machine: up to ~0.15 s after the client's cancel), and gRPC then runs two short-lived
    tasks for it (`rpc_task`, `HandleExceptions[...]`, gone within ~10-40 ms). Between two such
    calls the count is briefly at the baseline, so a single check could pass and the next one
    fail. A leaked task never ends, so the count never settles and this still fails."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while True:
        now = time.monotonic()
        if server_tasks(served) > baseline:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= settle:
            return
        if quiet_since is None and now > deadline:
            break
        time.sleep(0.01)
    raise AssertionError(f"server tasks leaked (baseline {baseline}): {describe_tasks(served)}")


def serves_normally(served):
    with Client(served.grpc_target, timeout=30) as c:
        out = c.generate("The orca", max_tokens=3, temperature=0)
    assert out.completion_tokens == 3 and out.finish_reason == "length"


def recovers(served, baseline):
    """After a test's disruption: nothing running or reserved, no leftover server task, the
    engine healthy and serving."""
    wait_idle(served)
    wait_tasks(served, baseline)
    assert served.engine.healthy()
    serves_normally(served)


async def cancel_all(tasks):
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def long_request(**kw):
    return dict(max_tokens=120, ignore_eos=True, temperature=0.0, **kw)


# -- the API surface --------------------------------------------------------------------------


def test_model_info_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message_factory import GetMessageClass

    with Client(served.grpc_target) as c:
        info = c.model_info()
    assert (info.model_name, info.max_model_len, info.vocab_size, info.max_batch_size) == ("demo", 128, 4096, 8)

    with grpc.insecure_channel(served.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "orca_jax.v1.Generation"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

        # What `grpcurl list` / `grpcurl describe` / `grpcurl -d ... Generate` do: no stubs,
        # only the descriptors the server hands out.
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"orca_jax.v1.Generation", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= services
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("orca_jax.v1.Generation")
        assert [m.name for m in svc.methods] == ["Generate", "GetModelInfo"]
        gen = svc.FindMethodByName("Generate")
        assert gen.server_streaming and not gen.client_streaming
        Req, Resp = GetMessageClass(gen.input_type), GetMessageClass(gen.output_type)
        req = Req(prompt="The orca")
        req.sampling.max_tokens, req.sampling.temperature = 2, 0.0
        call = ch.unary_stream("/orca_jax.v1.Generation/Generate", request_serializer=Req.SerializeToString,
                               response_deserializer=Resp.FromString)
        outs = list(call(req, timeout=30))
    assert outs[-1].finished and outs[-1].usage.completion_tokens == 2

    assert http(served, "/health")[0] == 200
    status, models = http(served, "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "demo"
    assert models["data"][0]["max_model_len"] == 128


def test_64_concurrent_streams_match_offline_greedy(served):
    """Every stream completes, and its tokens and text are the offline API's greedy output."""
    work, ref = served.work, served.reference
    baseline = server_tasks(served)

    async def one(prompt, max_tokens):  # one client (its own channel, connection) each
        async with AsyncClient(served.grpc_target, timeout=120) as client:
            return [d async for d in client.stream(prompt, max_tokens=max_tokens, temperature=0.0)]

    async def burst():
        return await asyncio.gather(*[one(p, m) for p, m in work])

    t0 = time.perf_counter()
    results = asyncio.run(burst())
    elapsed = time.perf_counter() - t0
    assert len(results) == 64
    for (prompt, _), deltas, expect in zip(work, results, ref):
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == list(expect.token_ids), prompt
        assert "".join(d.text for d in deltas) == expect.text
        assert deltas[-1].usage.completion_tokens == len(ids)
        assert deltas[-1].finish_reason == {"stop": pb.FINISH_REASON_STOP,
                                            "length": pb.FINISH_REASON_LENGTH}[expect.finish_reason.value]
    assert len({len(d) for d in results}) > 5, "the workload should mix lengths"
    print(f"64 streams in {elapsed:.2f} s")
    wait_idle(served)
    wait_tasks(served, baseline)


def test_openai_client(served):
    openai = pytest.importorskip("openai", reason="the openai package is in the [test] extra")
    client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["demo"]
    prompt, _ = served.work[3]
    expect = served.reference[3]
    n = len(expect.token_ids)

    done = client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0, logprobs=2)
    choice = done.choices[0]
    assert choice.text == expect.text
    assert done.usage.completion_tokens == n and done.usage.total_tokens == n + done.usage.prompt_tokens
    assert len(choice.logprobs.token_logprobs) == n and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)

    chunks = list(client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expect.text
    # streamed logprobs: text_offset runs on across chunks, as in the whole completion (vLLM)
    streamed = list(client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0,
                                              stream=True, logprobs=2))
    offsets = [o for c in streamed if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert offsets == choice.logprobs.text_offset and len(offsets) == n
    assert chunks[-1].usage.completion_tokens == n
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expect.finish_reason.value

    # seed: the same seed gives the same sample; stop strings end the text before them
    a, b = (client.completions.create(model="demo", prompt="The sea", max_tokens=12, temperature=1.0,
                                      seed=7).choices[0].text for _ in range(2))
    assert a == b
    stop = expect.text.strip()[:2]
    if stop:
        s = client.completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0, stop=[stop])
        assert s.choices[0].finish_reason == "stop" and stop not in s.choices[0].text

    many = client.completions.create(model="demo", prompt=[prompt, "The sea"], max_tokens=3, temperature=1.0,
                                     seed=3, n=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    with pytest.raises(openai.BadRequestError, match="n: must be 1 when using greedy sampling"):
        client.completions.create(model="demo", prompt="x", temperature=0, n=2)  # as vLLM
    # logprobs: 0 gives each sampled token's own entry (vLLM), not an empty dict
    zero = client.completions.create(model="demo", prompt=prompt, max_tokens=4, temperature=0, logprobs=0)
    lp = zero.choices[0].logprobs
    assert [list(t.items()) for t in lp.top_logprobs] == [[(s, v)] for s, v in zip(lp.tokens, lp.token_logprobs)]

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="demo", prompt="x", temperature=-1)
    wait_idle(served)


def test_metrics_use_vllm_names(served):
    iters0, count0 = served.engine.engine.stats.iterations, metric(served, "orca_jax:iteration_batch_size_count")
    serves_normally(served)
    wait_idle(served)
    _, text = http(served, "/metrics")
    for name in ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "orca_jax:iteration_batch_size_bucket",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "orca_jax:num_requests_swapped"]:
        assert re.search(rf"^{re.escape(name)}{{", text, re.M), name
    assert metric(served, "vllm:time_to_first_token_seconds_count") > 0
    # Every iteration of the serving loop is observed once (offline runs on the same engine,
    # outside the loop, are not).
    iters = served.engine.engine.stats.iterations - iters0
    assert iters > 0 and metric(served, "orca_jax:iteration_batch_size_count") - count0 == iters
    assert metric(served, "orca_jax:engine_healthy") == 1


def test_prefix_cache_counters_count_prompt_tokens(served):
    """The same long prompt twice: the second finds its full KV pages cached, and /metrics
    counts both lookups and the hit in tokens (vLLM's counters)."""
    page = served.engine.engine.kv.page_size
    prompt = "The orca is a toothed whale. " * 12
    n = len(served.engine.tokenizer.encode(prompt))
    assert n > page
    q0, h0 = metric(served, "vllm:prefix_cache_queries_total"), metric(served, "vllm:prefix_cache_hits_total")
    with Client(served.grpc_target, timeout=30) as c:
        first = c.generate(prompt, max_tokens=4, temperature=0)
        second = c.generate(prompt, max_tokens=4, temperature=0)
    assert first.text == second.text
    wait_idle(served)
    assert metric(served, "vllm:prefix_cache_queries_total") - q0 == 2 * n
    assert metric(served, "vllm:prefix_cache_hits_total") - h0 >= (n - 1) // page * page


# -- cancellation, disconnects, deadlines -----------------------------------------------------


def test_cancel_mid_stream_frees_the_slot(served):
    baseline = server_tasks(served)
    aborted = aborts(served)
    with Client(served.grpc_target, timeout=30) as c:
        stream = c.stream("The orca", **long_request())
        got = [next(stream) for _ in range(3)]
        assert metric(served, "vllm:num_requests_running") == 1
        stream.close()  # leaves the generator: the call is cancelled
    # mid-stream: every delta has tokens (a reader that falls behind gets them merged)
    assert all(d.token_ids for d in got) and 3 <= sum(len(d.token_ids) for d in got) < 120
    wait_idle(served)
    assert aborts(served) == aborted + 1
    wait_tasks(served, baseline)
    serves_normally(served)


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.02])
def test_async_cancel_before_the_first_token(served, delay):
    """Cancelled before any output (before or just after submission, or while queued): the
    engine survives and nothing leaks."""
    baseline = server_tasks(served)

    async def go():
        async with AsyncClient(served.grpc_target) as client:
            async def consume():
                async for _ in client.stream("The orca", **long_request()):
                    pass
            tasks = [asyncio.create_task(consume()) for _ in range(20)]
            await asyncio.sleep(delay)
            await cancel_all(tasks)

    asyncio.run(go())
    recovers(served, baseline)


def test_client_disconnect_frees_the_slot(served):
    baseline = server_tasks(served)
    # gRPC: the channel goes away mid-stream
    ch = grpc.insecure_channel(served.grpc_target)
    from orca_jax.proto import generation_pb2_grpc as pb_grpc
    it = pb_grpc.GenerationStub(ch).Generate(make_request("The orca", **long_request()))
    next(it)
    ch.close()
    wait_idle(served)

    # HTTP streaming and non-streaming: the socket closes before the response is complete
    host, port = served.http_url.removeprefix("http://").split(":")
    for stream in (True, False):
        body = json.dumps({"prompt": "The orca", "stream": stream, **long_request()}).encode()
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while metric(served, "vllm:num_requests_running") == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        if stream:
            assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.close()
        wait_idle(served)
    wait_tasks(served, baseline)
    serves_normally(served)


def test_deadline_exceeded_frees_the_slot(served, slow_steps):
    baseline = server_tasks(served)
    with Client(served.grpc_target) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("The orca", timeout=0.15, **long_request())
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    recovers(served, baseline)


@pytest.fixture
def slow_steps(served, monkeypatch):
    """Each engine iteration takes >= 20 ms, so long requests stay in their slots for seconds."""
    eng = served.engine.engine
    step = eng.step

    def slow():
        time.sleep(0.02)
        return step()
    monkeypatch.setattr(eng, "step", slow)


def test_full_queue_is_resource_exhausted_and_429(served, slow_steps):
    """8 running + 64 waiting fill the engine; the next request is refused, then all cancel."""
    baseline = server_tasks(served)
    snap = lambda: served.engine.snapshot

    async def go():
        async with AsyncClient(served.grpc_target, timeout=60) as client:
            async def hold():
                async for _ in client.stream("The orca", **long_request()):
                    pass

            async def until(cond, what):
                deadline = time.monotonic() + 20
                while not cond():
                    assert time.monotonic() < deadline, f"timed out waiting for {what}: {snap()}"
                    await asyncio.sleep(0.01)

            # Admission happens at the next iteration: fill the slots first, then the queue.
            tasks = [asyncio.create_task(hold()) for _ in range(8)]
            await until(lambda: snap().num_running == 8, "8 running")
            tasks += [asyncio.create_task(hold()) for _ in range(64)]
            await until(lambda: snap().num_waiting == 64, "64 waiting")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.generate("The orca", max_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in e.value.details()
            status, body = await asyncio.to_thread(http, served, "/v1/completions",
                                                   {"prompt": "The orca", "max_tokens": 2})
            assert status == 429 and "queue is full" in body["error"]["message"]
            assert not any(t.done() for t in tasks)
            await cancel_all(tasks)

    asyncio.run(go())
    recovers(served, baseline)


# -- bad input --------------------------------------------------------------------------------

LONG_PROMPT = " ".join(CORPUS[:200])        # well over 128 tokens
HUGE_PROMPT = "orca " * (MAX_REQUEST_BYTES // 4)

# (case, prompt or token ids, sampling fields, field the message must start with)
BAD = [
    ("empty prompt", "", {}, "prompt"),
    ("prompt over context", LONG_PROMPT, {}, "prompt"),
    ("max_tokens 0", "The orca", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", "The orca", {"max_tokens": -3}, "max_tokens"),
    ("max_tokens over context", "The orca", {"max_tokens": 500}, "max_tokens"),
    ("temperature < 0", "The orca", {"temperature": -0.5}, "temperature"),
    ("top_p 0", "The orca", {"top_p": 0.0}, "top_p"),
    ("top_p > 1", "The orca", {"top_p": 1.5}, "top_p"),
    ("unknown token ids", [1, 2, 99999], {}, "prompt_token_ids"),
    ("logprobs over max", "The orca", {"logprobs": 21}, "logprobs"),
    ("negative seed", "The orca", {"seed": -1}, "seed"),
    ("presence_penalty", "The orca", {"presence_penalty": 3.0}, "presence_penalty"),
    ("stop_token_ids outside vocab", "The orca", {"stop_token_ids": [5000]}, "stop_token_ids"),
    ("oversize message", HUGE_PROMPT, {}, "prompt"),
    # Every number must fit the step's device arrays (int32, finite float32): one such request
    # used to fail inside the step and take the engine down for everyone.
    ("top_k over int32", "The orca", {"top_k": 2**31}, "top_k"),
    ("max_tokens over int32", "The orca", {"max_tokens": 2**31}, "max_tokens"),
    ("temperature infinite", "The orca", {"temperature": float("inf")}, "temperature"),
    ("repetition_penalty infinite", "The orca", {"repetition_penalty": float("inf")}, "repetition_penalty"),
    ("top_p nan", "The orca", {"top_p": float("nan")}, "top_p"),
    ("too many stop strings", "The orca", {"stop": [f"s{i}" for i in range(33)]}, "stop"),
    ("stop string too long", "The orca", {"stop": ["x" * 129]}, "stop"),
]


@pytest.mark.parametrize("case,prompt,fields,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_grpc(served, case, prompt, fields, field):
    if any(isinstance(v, int) and v >= 2**31 for v in fields.values()):
        pytest.skip("the proto's int32 fields cannot carry it")
    with Client(served.grpc_target, timeout=30) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate(prompt, **fields)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith(f"{field}:"), e.value.details()
    serves_normally(served)


# HTTP spells token-id prompts as `prompt` (OpenAI), so the field named is `prompt` there.
HTTP_FIELD = {"prompt_token_ids": "prompt"}
HTTP_ONLY = [
    ("temperature not a number", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("NaN literal", b'{"prompt": "x", "temperature": NaN}', "body"),
    ("Infinity literal", b'{"prompt": "x", "repetition_penalty": Infinity}', "body"),
    ("number over float range", b'{"prompt": "x", "temperature": 1e400}', "temperature"),
    ("deep nesting", b"[" * 100_000, "body"),
    ("lone surrogate in the prompt", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("lone surrogate in a stop string", b'{"prompt": "x", "stop": ["\\udfff"]}', "stop"),
    ("too many choices", {"prompt": ["a"] * 9, "n": 16}, "prompt"),
    ("max_tokens a word", {"prompt": "x", "max_tokens": "eight"}, "max_tokens"),
    ("max_tokens fractional", {"prompt": "x", "max_tokens": 8.5}, "max_tokens"),
    ("prompt of mixed types", {"prompt": ["a", 1]}, "prompt"),
    ("n 0", {"prompt": "x", "n": 0}, "n"),
    ("beam search", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("stream_options without stream", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("suffix", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("not JSON", b"{nope", "body"),
]


@pytest.mark.parametrize("case,prompt,fields,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_http(served, case, prompt, fields, field):
    if any(isinstance(v, float) and not math.isfinite(v) for v in fields.values()):
        pytest.skip("JSON has no non-finite numbers (HTTP_ONLY sends the literals)")
    status, body = http(served, "/v1/completions", {"model": "demo", "prompt": prompt, **fields})
    assert status == 400, body
    # The body, not a field, is over the size limit; token-id prompts are `prompt` in OpenAI's API.
    field = "body" if case == "oversize message" else HTTP_FIELD.get(field, field)
    if case == "prompt over context":  # vLLM's HTTP name for it
        field = "input_tokens"
    assert body["error"]["param"] == field and body["error"]["message"].startswith(f"{field}:"), body
    serves_normally(served)


@pytest.mark.parametrize("case,body,field", HTTP_ONLY, ids=[b[0] for b in HTTP_ONLY])
def test_bad_input_http_only(served, case, body, field):
    status, resp = http(served, "/v1/completions", body)
    assert status == 400 and resp["error"]["message"].startswith(f"{field}:"), resp
    assert resp["error"]["param"] == field, resp
    serves_normally(served)


def test_unknown_model_is_404(served):
    status, body = http(served, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert status == 404 and body["error"]["param"] == "model"


# -- TLS and the bearer token -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "cert.pem"), str(d / "key.pem")


def test_tls_and_bearer_token(served, tls_files):
    """A second front end over the same engine, with TLS and a token on both ports."""
    import ssl

    cert, key = tls_files
    bg = BackgroundServer(served.engine, ServerConfig(grpc_port=0, http_port=0, tls_cert=cert, tls_key=key,
                                                      auth_token="s3cret"), "demo").start()
    try:
        ca = Path(cert).read_bytes()
        with Client(bg.grpc_target, root_certificates=ca, token="s3cret", timeout=30) as c:
            assert c.generate("The orca", max_tokens=2).completion_tokens == 2
        for token in (None, "wrong"):
            with Client(bg.grpc_target, root_certificates=ca, token=token, timeout=30) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.generate("The orca", max_tokens=2)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    c.model_info()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.secure_channel(bg.grpc_target, grpc.ssl_channel_credentials(ca)) as ch:
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING  # probes need no token

        ctx = ssl.create_default_context(cafile=cert)

        def get(path, token=None, body=None):
            req = urllib.request.Request(bg.http_url + path, data=body and json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {token}"} if token else {})})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert get("/health") == 200 and get("/metrics") == 200
        assert get("/v1/models") == 401 and get("/v1/models", "wrong") == 401
        assert get("/v1/models", "s3cret") == 200
        assert get("/v1/completions", "s3cret", {"prompt": "x", "max_tokens": 2}) == 200
        assert get("/v1/completions", None, {"prompt": "x", "max_tokens": 2}) == 401
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the TLS port
            urllib.request.urlopen(bg.http_url.replace("https", "http") + "/health", timeout=5)
    finally:
        bg.stop()
    wait_idle(served)


# -- vLLM's completions fields (issue 17) -------------------------------------------------------


def completion(served, **body):
    status, out = http(served, "/v1/completions", {"model": "demo", **body})
    assert status == 200, out
    return out


def test_max_tokens_is_cut_to_the_room_the_prompt_leaves(served):
    """vLLM's rule: prompt + max_tokens over the context is answered, up to the context."""
    ids = [5] * (MAX_LEN - 4)
    out = completion(served, prompt=ids, max_tokens=50, temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "length"
    status, err = http(served, "/v1/completions", {"prompt": "x", "max_tokens": MAX_LEN + 1})
    assert status == 400 and err["error"]["param"] == "max_tokens"


def test_truncate_prompt_tokens_keeps_the_last_tokens(served):
    ids = list(range(10, 10 + MAX_LEN + 20))  # longer than the context
    out = completion(served, prompt=ids, max_tokens=2, temperature=0, truncate_prompt_tokens=16,
                     return_token_ids=True)
    assert out["choices"][0]["prompt_token_ids"] == ids[-16:] and out["usage"]["prompt_tokens"] == 16
    ref = completion(served, prompt=ids[-16:], max_tokens=2, temperature=0)
    assert out["choices"][0]["text"] == ref["choices"][0]["text"]


def test_echo_and_token_ids(served):
    out = completion(served, prompt="The orca swims", max_tokens=3, temperature=0, echo=True,
                     return_token_ids=True)
    plain = completion(served, prompt="The orca swims", max_tokens=3, temperature=0)
    c, p = out["choices"][0], plain["choices"][0]
    assert c["text"] == p["text"]  # with return_token_ids vLLM echoes "" (the ids carry the prompt)
    assert c["prompt_token_ids"] == served.tokenizer.encode("The orca swims")
    assert len(c["token_ids"]) == 3
    echoed = completion(served, prompt="The orca swims", max_tokens=3, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == "The orca swims" + p["text"]
    assert echoed["choices"][0]["token_ids"] is None and echoed["choices"][0]["prompt_token_ids"] is None


def test_return_tokens_as_token_ids(served):
    out = completion(served, prompt="The orca", max_tokens=3, temperature=0, logprobs=2,
                     return_tokens_as_token_ids=True, return_token_ids=True)
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in out["choices"][0]["token_ids"]]
    assert all(k.startswith("token_id:") for top in lp["top_logprobs"] for k in top)


def test_lenient_numbers_and_booleans(served):
    """pydantic's lax mode, as vLLM parses: "3" and 3.0 are 3, "0" is 0.0, "false" is False."""
    a = completion(served, prompt="The orca", max_tokens="3", temperature="0", stream="false")
    b = completion(served, prompt="The orca", max_tokens=3.0, temperature=0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["usage"]["completion_tokens"] == 3


def test_structured_output_over_http(served):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for body in ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}},
                 {"structured_outputs": {"json": schema}}):
        out = completion(served, prompt="The orca", max_tokens=30, temperature=1.0, seed=3, **body)
        assert json.loads(out["choices"][0]["text"])["n"] in range(10)
    out = completion(served, prompt="x", max_tokens=5, structured_outputs={"choice": ["left", "right"]})
    assert out["choices"][0]["text"] in ("left", "right")
    out = completion(served, prompt="x", max_tokens=6, temperature=1.0, logit_bias={"42": 100},
                     return_token_ids=True)
    assert out["choices"][0]["token_ids"] == [42] * 6
    for body, param in (({"structured_outputs": {"regex": "("}}, "structured_outputs"),
                        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
                        ({"response_format": {"type": "json_schema"}}, "response_format"),
                        ({"response_format": {"type": "yaml"}}, "response_format"),
                        ({"allowed_token_ids": []}, "allowed_token_ids"),
                        ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
                        ({"logit_bias": {"x": 1}}, "logit_bias")):
        status, err = http(served, "/v1/completions", {"prompt": "x", **body})
        assert status == 400 and err["error"]["param"] == param, (body, err)
    serves_normally(served)


def test_best_of_returns_the_most_likely_samples(served):
    """best_of draws that many samples per prompt and returns the n with the highest
    cumulative logprob: each returned one scores at least as high as every sample left out."""
    body = dict(prompt=["The orca", "A seal"], max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    drawn = completion(served, n=4, logprobs=0, **body)["choices"]  # the same 4 seeds, all of them
    best = completion(served, n=2, best_of=4, **body)
    score = lambda c: sum(c["logprobs"]["token_logprobs"])
    for g in range(2):
        ranked = sorted(drawn[4 * g:4 * g + 4], key=score, reverse=True)[:2]
        assert [c["text"] for c in best["choices"][2 * g:2 * g + 2]] == [c["text"] for c in ranked]
    assert all(c["logprobs"] is None for c in best["choices"])  # not asked for: not shown
    assert [c["index"] for c in best["choices"]] == [0, 1, 2, 3]
    greedy = completion(served, prompt="The orca", max_tokens=4, temperature=0, best_of=3)  # vLLM: ignored
    assert len(greedy["choices"]) == 1 and greedy["usage"]["completion_tokens"] == 4
    for extra, param in (({"best_of": 1, "n": 2}, "best_of"), ({"best_of": 3, "stream": True}, "best_of")):
        status, err = http(served, "/v1/completions", {**body, **extra})
        assert status == 400 and err["error"]["param"] == param, (extra, err)


def test_echo_scoring_returns_prompt_logprobs(served):
    """lm-eval-harness's log-likelihood request: echo + logprobs + max_tokens 0 gives the
    prompt's own log-probabilities (orca_jax/scoring.py, checked against HF in test_scoring)."""
    ids = served.tokenizer.encode("The orca swims in the cold sea")
    want = served.llm.prompt_logprobs([ids], top_n=1)[0]
    out = completion(served, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    c, lp = out["choices"][0], out["choices"][0]["logprobs"]
    assert c["text"] == served.tokenizer.decode(ids) and out["usage"]["prompt_tokens"] == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([w["logprob"] for w in want[1:]], abs=1e-5)
    assert lp["tokens"] == [served.llm.engine.tokenizer.decode([t]) for t in ids]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(ids))]
    assert all(len(top) in (1, 2) for top in lp["top_logprobs"][1:])  # the token and the best one
    assert len(c["prompt_logprobs"]) == len(ids) and c["prompt_logprobs"][0] is None
    # With generation: the prompt's entries, then the completion's; prompt_logprobs alone, too.
    gen = completion(served, prompt=ids, max_tokens=3, echo=True, logprobs=0, temperature=0)
    assert len(gen["choices"][0]["logprobs"]["tokens"]) == len(ids) + 3
    alone = completion(served, prompt=ids, max_tokens=1, prompt_logprobs=2, temperature=0)["choices"][0]
    entry = alone["prompt_logprobs"][2]
    assert str(ids[2]) in entry and entry[str(ids[2])]["rank"] == want[2]["rank"]
    assert len(entry) in (2, 3) and alone["logprobs"] is None
    status, err = http(served, "/v1/completions", {"prompt": ids, "prompt_logprobs": 1, "stream": True})
    assert status == 400 and err["error"]["param"] == "prompt_logprobs"
