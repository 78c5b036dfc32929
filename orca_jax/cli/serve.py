"""`orca-jax serve`, `orca-jax demo` and `orca-jax generate --server` (the network commands).

    orca-jax serve --model DIR --grpc-port 50051 --http-port 8000      # until SIGTERM
    orca-jax generate --server localhost:50051 --prompt "The orca"     # streams to the terminal
    orca-jax demo                                                      # server + client burst

Secrets stay out of argv (visible in `ps`): the server reads its bearer token from
--auth-token-file or $ORCA_JAX_AUTH_TOKEN; `generate --server` sends $ORCA_JAX_AUTH_TOKEN and
trusts the CA in $ORCA_JAX_TLS_CA (a PEM file; setting it turns TLS on).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .flags import add_engine_flags, add_multiprocess_flags, build_engine, engine_config, sampling_params


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over gRPC (and OpenAI-compatible HTTP)",
                       description="Serve until SIGTERM/SIGINT, then drain: refuse new requests, "
                                   "let in-flight ones finish (up to --drain-timeout), exit 0.")
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded demo model)")
    p.add_argument("--served-model-name", default=None,
                   help="name in /v1/models and GetModelInfo (default: the checkpoint folder's name)")
    add_server_flags(p)
    add_engine_flags(p)
    add_multiprocess_flags(p)
    add_replica_flags(p)
    p.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="start a server on the demo model and stream a burst of requests",
                       description="Starts the gRPC server on the embedded random-weight model, sends "
                                   "a burst of concurrent streaming requests, shows them streaming "
                                   "and prints a latency/throughput summary.")
    d.add_argument("--model", default=None, help="checkpoint directory (default: embedded demo model)")
    d.add_argument("--requests", type=int, default=32, help="requests in the burst")
    d.add_argument("--max-tokens", type=int, default=64, help="longest output (outputs are 1/4 to 1x)")
    d.add_argument("--seed", type=int, default=0, help="workload and sampling seed")
    d.add_argument("--no-live", dest="live", action="store_false",
                   help="no live table (the default when stdout is not a terminal)")
    add_engine_flags(d)
    # A small engine by default: fewer bucket programs to compile on the first run.
    d.set_defaults(fn=cmd_demo, max_batch_size=16, max_num_batched_tokens=128, max_prefill_seqs=8)


def add_server_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
    g.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: any free port)")
    g.add_argument("--http-port", type=int, default=None,
                   help="OpenAI-compatible HTTP port (default: off; 0: any free port)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain: TLS on both ports")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--auth-token-file", default=None,
                   help="file holding the bearer token clients must send (else $ORCA_JAX_AUTH_TOKEN; "
                        "neither: no check)")
    g.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="larger requests are refused with INVALID_ARGUMENT / 400")
    g.add_argument("--max-connections", type=int, default=1024,
                   help="open HTTP connections / concurrent gRPC calls; beyond: 503 / RESOURCE_EXHAUSTED")
    g.add_argument("--idle-timeout", type=float, default=30.0,
                   help="close connections idle (or still sending request headers) this long (seconds)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="an HTTP request body not received within this many seconds: 408")
    g.add_argument("--write-timeout", type=float, default=30.0,
                   help="a streaming (SSE) client that takes no data for this many seconds is "
                        "disconnected and its requests aborted")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish")
    g.add_argument("--stuck-after", type=float, default=60.0,
                   help="when one iteration runs longer than this (seconds; e.g. a collective "
                        "whose peer process died), every in-flight and queued request fails with "
                        "UNAVAILABLE / 503, health turns NOT_SERVING / 503 and the server exits "
                        "with status 3 for a restart")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="jinja chat template for /v1/chat/completions, over the checkpoint's own "
                        "(chat_template.jinja or tokenizer_config.json's chat_template)")


def add_replica_flags(p: argparse.ArgumentParser) -> None:
    """Several engine replicas behind a router, on Ray Serve (docs/replicas.md)."""
    from ..ray.routing import POLICIES  # plain Python: no Ray needed for --help
    g = p.add_argument_group("replicas (Ray Serve; pip install orca-jax[ray]; docs/replicas.md)")
    g.add_argument("--replicas", type=int, default=1,
                   help="engine replicas behind the global scheduler; > 1 (or --ray-address) runs "
                        "them on Ray Serve with the OpenAI-compatible ingress on --http-port "
                        "(default 8000); 1: the single-process server")
    g.add_argument("--router", default="prefix",
                   choices=POLICIES,
                   help="how the global scheduler picks a replica: prefix (cached-prefix affinity "
                        "unless overloaded, else least load), load, or the round-robin and "
                        "power-of-two baselines")
    g.add_argument("--overload-margin", type=float, default=1.0,
                   help="prefix: skip the replica holding the prefix when its load (in batches) "
                        "exceeds the least loaded replica's by more than this")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs each replica reserves")
    g.add_argument("--replica-gpus", type=float, default=0.0,
                   help="Ray GPUs each replica reserves (several for a tensor-parallel replica)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto) instead of starting a local Ray")
    g.add_argument("--ray-cpus", type=int, default=None,
                   help="CPUs the local Ray may schedule on (default: all)")


def _auth_token(args) -> str | None:
    if args.auth_token_file:
        token = Path(args.auth_token_file).read_text().strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file} is empty")
        return token
    return os.environ.get("ORCA_JAX_AUTH_TOKEN") or None


def _chat_template(args) -> str | None:
    """--chat-template's source (read before the engine starts: a wrong path fails at once)."""
    if getattr(args, "chat_template", None) is None:
        return None
    from ..chat import ChatTemplate, read_template_arg
    source = read_template_arg(args.chat_template)
    ChatTemplate(source)  # a template that does not compile: a ValueError now, not at serving
    return source


def _model_dir(args) -> tuple[str, str]:
    """(checkpoint directory, default served name)."""
    if args.model is not None:
        return args.model, Path(args.model).resolve().name
    from ..demo_model import DEMO_DIRNAME, ensure_demo_model
    print("(no --model: using the embedded demo model; its weights are random)", file=sys.stderr)
    return ensure_demo_model(), DEMO_DIRNAME


def _start_engine(model: str, args, peers=None):
    from ..async_engine import AsyncEngine
    t0 = time.perf_counter()
    print("starting the engine (compiles every bucket program once; later starts reuse the "
          "XLA cache) ...", file=sys.stderr, flush=True)
    engine = build_engine(args, model, peers=peers)
    kv = engine.kv
    print(f"engine ready in {time.perf_counter() - t0:.1f} s: KV cache {kv.num_pages} pages x "
          f"{kv.page_size} tokens = {kv.num_pages * kv.page_size} tokens, up to {engine.num_slots} "
          f"sequences of {engine.max_len} tokens, {len(engine.buckets.shapes())} step programs",
          file=sys.stderr, flush=True)
    return AsyncEngine(engine, stuck_after_s=getattr(args, "stuck_after", 60.0),
                       fail_when_stuck=True).start()


def cmd_serve(args) -> int:
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replicas > 1 or args.ray_address:
        if args.num_processes > 1:
            raise ValueError("--replicas and --num-processes do not combine yet: a replica spans "
                             "the devices Ray gives it (--replica-gpus), on one host")
        try:
            from ..ray.cli import run
        except ImportError as e:
            raise SystemExit(f"--replicas needs Ray Serve: pip install 'orca-jax[ray]' ({e})")
        return run(args, *_model_dir(args), chat_template=_chat_template(args))
    from ..server import ServerConfig, serve
    config = ServerConfig(host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                          tls_cert=args.tls_cert, tls_key=args.tls_key, auth_token=_auth_token(args),
                          max_request_bytes=args.max_request_bytes, drain_timeout_s=args.drain_timeout,
                          max_connections=args.max_connections, idle_timeout_s=args.idle_timeout,
                          body_timeout_s=args.body_timeout, write_timeout_s=args.write_timeout,
                          chat_template=_chat_template(args))
    leader = None
    if args.num_processes > 1:
        from ..sharding import multihost
        if not args.coordinator:
            raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT (or $ORCA_JAX_COORDINATOR)")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
        multihost.initialize(args.coordinator, args.num_processes, args.process_id,
                             local_device_ids=multihost.local_device_ids_from_env())
        address = multihost.control_address(args.coordinator, args.control_port)
        if args.process_id != 0:
            return _follow(args, address)
        print(f"process 0 of {args.num_processes}: waiting for the followers on "
              f"{address[0]}:{address[1]} ...", file=sys.stderr, flush=True)
        leader = multihost.Leader(address, args.num_processes - 1)
    model, default_name = _model_dir(args)
    try:
        engine = _start_engine(model, args, peers=leader)
    except BaseException:
        if leader:
            leader.close()
        raise
    if leader:
        leader.watch(engine.fail)

    def ready(server) -> None:
        parts = [f"grpc={args.host}:{server.grpc_port}"]
        if server.http_port is not None:
            parts.append(f"http={'https' if args.tls_cert else 'http'}://{args.host}:{server.http_port}")
        print("orca-jax serve: ready " + " ".join(parts), flush=True)

    try:
        return serve(engine, config, args.served_model_name or default_name, on_ready=ready)
    finally:
        # A stuck loop is not waited for; one failed by a lost follower gets a few seconds to
        # leave its step (a collective with the dead peer may never return).
        engine.shutdown(timeout=0 if engine.stuck else 5 if engine.broken else 10)
        if engine.loop_alive() and engine.dead is not None:
            _exit_now(engine.dead)
        if leader:
            leader.close()


def _exit_now(reason: str) -> None:
    """Exit at once with ENGINE_FAILED_EXIT: the engine thread is blocked inside the device
    runtime (e.g. a collective with a dead or hung peer) and may never return, and neither may
    a normal exit, whose JAX hooks wait for outstanding device work and for every process at
    the distributed shutdown barrier. Followers see the leader's connection close and exit."""
    from ..server.app import ENGINE_FAILED_EXIT
    print(f"orca-jax serve: error: {reason}; the engine thread is still inside a device step: "
          f"exiting with status {ENGINE_FAILED_EXIT} without waiting for it", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(ENGINE_FAILED_EXIT)


def _follow(args, address) -> int:
    """Process k > 0 of a group: build the same engine, run the leader's plans until it stops."""
    import dataclasses
    import jax

    from ..sharding import multihost
    follower = multihost.Follower(address)
    model, _ = _model_dir(args)
    # No warm-up of its own: the leader's warm-up plans arrive like any other.
    engine = build_engine(args, model, dataclasses.replace(engine_config(args), warmup=False))
    print(f"process {jax.process_index()}: following the leader", file=sys.stderr, flush=True)
    # A supervisor's SIGTERM reaches every process of the group at once; the leader drains
    # (its plans keep coming) and then says stop, so followers wait for that or for its loss.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        follower.run(engine.runner)
    except multihost.LeaderLostError as e:
        print(f"orca-jax serve: error: {e}", file=sys.stderr)
        return 1
    return 0


# -- generate --server ------------------------------------------------------------------------


def _remote_client(target: str):
    from ..client import AsyncClient
    ca = os.environ.get("ORCA_JAX_TLS_CA")
    return AsyncClient(target, token=os.environ.get("ORCA_JAX_AUTH_TOKEN") or None,
                       root_certificates=Path(ca).read_bytes() if ca else None)


def cmd_generate_remote(args) -> int:
    """`orca-jax generate --server HOST:PORT`: the same prompts and sampling flags as offline
    generation, sent to a running server; one prompt streams to the terminal."""
    import grpc

    from ..client import sampling_kwargs
    params = sampling_kwargs(sampling_params(args))
    prompts: list = list(args.prompt)
    for ids in args.prompt_ids:
        prompts.append([int(t) for t in ids.split(",") if t.strip()])
    if not prompts:
        raise SystemExit("give at least one --prompt TEXT or --prompt-ids 1,2,3")

    async def run() -> None:
        async with _remote_client(args.server) as client:
            if len(prompts) == 1:
                n, reason = 0, None
                async for d in client.stream(prompts[0], **params):
                    print(d.text, end="", flush=True)
                    n, reason = d.usage.completion_tokens, d.finish_reason
                from ..client import FINISH_NAMES
                print(f"\n--- {FINISH_NAMES[reason]}, {n} tokens", file=sys.stderr)
                return
            outs = await asyncio.gather(*[client.generate(p, **params) for p in prompts])
            for i, out in enumerate(outs):
                print(f"--- [{i}] {prompts[i]!r} ({out.finish_reason}, {out.completion_tokens} "
                      f"tokens)\n{out.text}")

    try:
        asyncio.run(run())
    except grpc.RpcError as e:
        print(f"\norca-jax generate: error from {args.server}: {e.code().name}: {e.details()}",
              file=sys.stderr)
        return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    return 0


# -- demo -------------------------------------------------------------------------------------


def demo_workload(n: int, max_tokens: int, max_len: int, seed: int, tokenizer) -> list[tuple[str, dict]]:
    """Mixed-length prompts cut from the demo corpus, mixed output lengths, seeded sampling;
    prompt + output always fit in `max_len` tokens."""
    import random

    from ..demo_model import CORPUS
    rng = random.Random(seed)
    words = CORPUS.read_text(encoding="utf-8").split()
    out = []
    for i in range(n):
        k = rng.randint(3, 40)
        start = rng.randrange(len(words) - k)
        prompt = " ".join(words[start:start + k])
        m = rng.randint(max(1, max_tokens // 4), max_tokens)
        n_prompt = len(tokenizer.encode(prompt))
        if n_prompt + 1 > max_len:
            continue
        m = min(m, max_len - n_prompt)
        out.append((prompt, dict(max_tokens=m, temperature=0.8, top_p=0.95, seed=seed + i,
                                 ignore_eos=True)))
    return out


class _Live:
    """A table of the first rows of the burst, redrawn in place (ANSI) while they stream."""

    def __init__(self, n: int, enabled: bool):
        self.enabled = enabled
        self.rows = min(n, max(4, shutil.get_terminal_size((100, 24)).lines - 8))
        self.width = shutil.get_terminal_size((100, 24)).columns
        self.text = [""] * n
        self.tokens = [0] * n
        self.limit = [0] * n
        self.drawn = 0

    def draw(self) -> None:
        if not self.enabled:
            return
        out = [f"\x1b[{self.drawn}F"] if self.drawn else []
        for i in range(self.rows):
            bar = "#" * (10 * self.tokens[i] // max(1, self.limit[i]))
            head = f"[{i:2d}] {bar:<10} {self.tokens[i]:3d}/{self.limit[i]:<3d} "
            tail = _printable(self.text[i])[-(self.width - len(head) - 1):]
            out.append("\x1b[2K" + head + tail + "\n")
        more = len(self.text) - self.rows
        out.append("\x1b[2K" + (f"... and {more} more streaming concurrently\n" if more > 0 else "\n"))
        sys.stdout.write("".join(out))
        sys.stdout.flush()
        self.drawn = self.rows + 1


def _printable(text: str) -> str:
    """Random weights emit control bytes: keep them off the terminal."""
    return "".join(c if c.isprintable() else " " if c in "\n\t" else "\u00b7" for c in text)


async def run_burst(target: str, work, live: _Live) -> list:
    """Sends every request at once over one channel; per request, what its client saw (a
    bench.metrics.RequestRecord: arrival and the time of each chunk of tokens)."""
    from ..bench.metrics import RequestRecord
    from ..client import AsyncClient

    async def one(i, prompt, params):
        arrival, rec = time.perf_counter() - t0, None
        async for d in client.stream(prompt, **params):
            if rec is None:
                rec = RequestRecord(arrival=arrival, prompt_len=d.usage.prompt_tokens)
            rec.add(time.perf_counter() - t0, len(d.token_ids))
            live.text[i] += d.text
            live.tokens[i] = d.usage.completion_tokens
        return rec

    t0 = time.perf_counter()

    async def redraw():
        while True:
            live.draw()
            await asyncio.sleep(0.1)

    async with AsyncClient(target) as client:
        for i, (_, params) in enumerate(work):
            live.limit[i] = params["max_tokens"]
        painter = asyncio.create_task(redraw())
        try:
            results = await asyncio.gather(*[one(i, p, s) for i, (p, s) in enumerate(work)])
        finally:
            painter.cancel()
        live.draw()
    return results


def summarize(records: list, wall: float) -> str:
    """TTFT / TPOT / E2E percentiles of the burst, with the benchmark's (vLLM's) definitions."""
    from ..bench.metrics import summarize as metrics
    m = metrics(records, percentiles=(50, 90, 99))
    tokens = m["total_output_tokens"]
    row = lambda name, s, last: (f"  {name:5s} p50 {s['p50']:7.1f} ms   p90 {s['p90']:7.1f} ms   "
                                 f"{last:4s} {s[last]:7.1f} ms") if s else f"  {name:5s} -"
    return "\n".join([
        f"{m['completed']} requests, {tokens} tokens in {wall:.2f} s: "
        f"{tokens / wall:.0f} tokens/s, {m['completed'] / wall:.1f} requests/s",
        row("TTFT", m["ttft_ms"], "p99"), row("TPOT", m["tpot_ms"], "mean"),
        row("e2e", m["e2el_ms"], "p99")])


def cmd_demo(args) -> int:
    from ..server import BackgroundServer, ServerConfig
    if args.requests < 1 or args.max_tokens < 1:
        raise ValueError("--requests and --max-tokens must be >= 1")
    model, name = _model_dir(args)
    engine = _start_engine(model, args)
    server = BackgroundServer(engine, ServerConfig(grpc_port=0), name).start()
    try:
        print(f"gRPC server on {server.grpc_target}: sending {args.requests} concurrent streaming "
              f"requests (batch of {engine.num_slots})\n", flush=True)
        work = demo_workload(args.requests, args.max_tokens, engine.max_len, args.seed, engine.tokenizer)
        live = _Live(len(work), args.live and sys.stdout.isatty())
        batch_sizes: list[int] = []  # of every iteration during the burst
        engine.add_iteration_listener(lambda batch_size, _tokens: batch_sizes.append(batch_size))
        t0 = time.perf_counter()
        results = asyncio.run(run_burst(server.grpc_target, work, live))
        wall = time.perf_counter() - t0
        if not live.enabled:  # plain output: a few finished texts, then the summary
            for i in range(min(4, len(work))):
                print(f"[{i}] {_printable(work[i][0][:40])}... -> {_printable(live.text[i][:70])}")
        iters = len(batch_sizes)
        print("\n" + summarize(results, wall))
        if iters:
            print(f"  engine: {iters} iterations, mean batch {sum(batch_sizes) / iters:.1f} "
                  f"requests (Orca's iteration-level scheduling: requests join and leave every step)")
        print("\n(weights are random, so the text is noise.) Next: `orca-jax serve --http-port 8000` "
              "and `orca-jax generate --server localhost:50051 --prompt 'The orca'`")
    finally:
        server.stop()
        engine.shutdown()
    return 0
