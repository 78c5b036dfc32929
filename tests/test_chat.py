"""/v1/chat/completions and chat-template rendering (orca_jax/chat.py).

Rendering is checked against `transformers`' `apply_chat_template` on the same tokenizer files
(text and token ids); the endpoint against a real server on loopback over a copy of the demo
model whose tokenizer_config.json has a ChatML-style template using bos_token and eos_token:
greedy chat output must be exactly what /v1/completions gives for the rendered prompt.
"""
import json
import shutil

import pytest

from orca_jax import LLM
from orca_jax.async_engine import AsyncEngine
from orca_jax.chat import ChatError, ChatTemplate, checkpoint_template, read_template_arg, special_tokens
from orca_jax.engine import EngineConfig
from orca_jax.server import BackgroundServer, ServerConfig
from orca_jax.server.inputs import Limits, prepare_chat
from orca_jax.tokenizer import load_tokenizer

from test_server import http

CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Exercises the environment: raise_exception, tojson (no HTML escaping), loop controls,
# trim_blocks/lstrip_blocks, namespace, a loop over content parts.
FANCY = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'system' and not loop.first %}{{ raise_exception('system message must be first') }}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ m.role | upper }}] {% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{% if p.type != 'text' %}{% continue %}{% endif %}<{{ p.text }}>{% endfor %}{% endif %} {{ m | tojson }}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT #{{ ns.n }}]{% endif %}"""
MAX_LEN = 128
ENGINE = EngineConfig(max_batch_size=4, max_num_batched_tokens=64, max_prefill_seqs=4,
                      max_model_len=MAX_LEN, max_waiting=16)
MESSAGES = [{"role": "system", "content": "You are an orca."},
            {"role": "user", "content": "The sea"}]


def with_template(src, dst, template, **extra):
    """A copy of checkpoint `src` whose tokenizer_config.json has `template` as chat_template."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    cfg.update(extra)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def chat_dir(demo_model_dir, tmp_path_factory):
    return with_template(demo_model_dir, tmp_path_factory.mktemp("chat") / "chat-model", CHATML)


def hf_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


# -- rendering ------------------------------------------------------------------------------


@pytest.mark.parametrize("messages,add_gen", [
    (MESSAGES, True),
    (MESSAGES, False),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The orca"},
      {"role": "user", "content": "é <b>&</b> \u2603"}], True),
])
def test_render_matches_transformers(chat_dir, messages, add_gen):
    hf = hf_tokenizer(chat_dir)
    tok = load_tokenizer(chat_dir)
    assert tok.chat_template == CHATML and tok.special_tokens["bos_token"] == "<|endoftext|>"
    t = ChatTemplate(tok.chat_template, tok.special_tokens)
    text = t.render(messages, add_generation_prompt=add_gen)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
    ids = tok.encode(text)
    expect = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_gen)
    expect = expect["input_ids"] if isinstance(expect, dict) or hasattr(expect, "keys") else expect
    assert ids == list(expect)
    bos = tok.encode("<|endoftext|>")
    assert len(bos) == 1 and ids[0] == bos[0] and ids[1] != bos[0]  # one BOS, from the template


def test_render_fancy_template_matches_transformers(demo_model_dir, tmp_path):
    path = with_template(demo_model_dir, tmp_path / "fancy",
                         [{"name": "default", "template": FANCY}, {"name": "tool_use", "template": "x"}])
    hf = hf_tokenizer(path)
    assert checkpoint_template(path) == FANCY  # a list of named templates: "default"
    t = ChatTemplate(FANCY, special_tokens(path))
    assert t.content_parts  # it loops over content: list content reaches it as parts
    messages = [{"role": "system", "content": "Be <brief> & \"kind\" é"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "name": None}]
    text = t.render(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert '"name"' not in text and "<a><b>" in text and "&amp;" not in text
    with pytest.raises(ChatError, match="system message must be first") as e:
        t.render(messages[1:] + messages[:1])
    assert e.value.field == "messages"


def test_chat_template_jinja_file_wins(chat_dir, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(chat_dir, path)
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert checkpoint_template(path) == "{{ messages[0]['content'] }}"
    assert load_tokenizer(path).chat_template == "{{ messages[0]['content'] }}"
    f = tmp_path / "t.jinja"
    f.write_text(CHATML)
    assert read_template_arg(str(f)) == CHATML
    with pytest.raises(FileNotFoundError):
        read_template_arg(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_parts_join_for_string_templates():
    t = ChatTemplate(CHATML, {"bos_token": "<s>", "eos_token": "</s>"})
    assert not t.content_parts
    text = t.render([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b"}]}])
    assert text == "<s><|im_start|>user\na\nb</s>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("messages,field", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url"}]}],
     "messages[1].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content[0].text"),
    (["hi"], "messages[0]"),
])
def test_bad_messages(messages, field):
    with pytest.raises(ChatError) as e:
        ChatTemplate(CHATML).render(messages)
    assert e.value.field == field


def test_prepare_chat_lengths(chat_dir):
    tok = load_tokenizer(chat_dir)
    t = ChatTemplate(tok.chat_template, tok.special_tokens)
    limits = Limits(max_model_len=MAX_LEN, vocab_size=512, max_request_bytes=1 << 20)
    ids, params, text = prepare_chat(tok, limits, t, MESSAGES, {"max_tokens": 4})
    assert ids == tok.encode(text) and params.max_tokens == 4
    ids, params, _ = prepare_chat(tok, limits, t, MESSAGES, {})  # no max_tokens: the rest of the context
    assert params.max_tokens == MAX_LEN - len(ids)
    from orca_jax.server.inputs import InvalidArgument
    with pytest.raises(InvalidArgument) as e:
        prepare_chat(tok, limits, t, [{"role": "user", "content": "orca " * 200}], {})
    assert e.value.field == "messages"


# -- the endpoint ---------------------------------------------------------------------------


class _NoTemplateEngine:
    """The served engine, seen through a tokenizer without a chat template."""

    def __init__(self, engine, tokenizer):
        self._engine, self.tokenizer = engine, tokenizer

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def served(chat_dir, demo_model_dir):
    llm = LLM(str(chat_dir), engine_config=ENGINE)
    engine = AsyncEngine(llm.engine).start()
    bg = BackgroundServer(engine, ServerConfig(grpc_port=0, http_port=0), "chat").start()
    plain = BackgroundServer(_NoTemplateEngine(engine, load_tokenizer(demo_model_dir)),
                             ServerConfig(grpc_port=0, http_port=0), "plain").start()
    bg.plain = plain
    bg.tok = llm.tokenizer
    yield bg
    plain.stop()
    bg.stop()
    engine.shutdown()


def rendered(served, messages=MESSAGES):
    tok = served.tok
    return ChatTemplate(tok.chat_template, tok.special_tokens).render(messages)


def test_chat_equals_completions_of_rendered_prompt(served):
    prompt = rendered(served)
    n_prompt = len(served.tok.encode(prompt))
    st, ref = http(served, "/v1/completions", {"model": "chat", "prompt": prompt, "max_tokens": 16,
                                               "temperature": 0, "ignore_eos": True})
    assert st == 200, ref
    st, out = http(served, "/v1/chat/completions", {"model": "chat", "messages": MESSAGES,
                                                    "max_tokens": 16, "temperature": 0,
                                                    "ignore_eos": True})
    assert st == 200, out
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == "chat" and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref["choices"][0]["text"]}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 16,
                            "total_tokens": n_prompt + 16}
    # max_completion_tokens is the newer name for max_tokens, and wins over it
    st, out2 = http(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3,
                                                     "max_completion_tokens": 16, "temperature": 0,
                                                     "ignore_eos": True})
    assert st == 200 and out2["choices"][0]["message"] == choice["message"]


def test_openai_client_stream_logprobs_and_stop(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="unused", max_retries=0)
    done = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    choice = done.choices[0]
    content = choice.message.content
    assert choice.message.role == "assistant" and content
    lps = choice.logprobs.content
    assert len(lps) == 12 and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lps)
    assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token for t in lps)
    assert "".join(t.token for t in lps) == content or "\ufffd" in "".join(t.token for t in lps)

    chunks = list(client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, logprobs=True, extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == content
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    streamed_lps = [t for c in with_choices if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed_lps] == [t.token for t in lps]
    assert all(t.top_logprobs == [] for t in streamed_lps)

    # n samples with a seed; stop strings end the content before them
    many = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=8, n=3,
                                          temperature=1.0, seed=5)
    assert [c.index for c in many.choices] == [0, 1, 2]
    stop = content[len(content) // 2:][:3]
    if stop.strip():
        cut = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12,
                                             temperature=0, stop=[stop],
                                             extra_body={"ignore_eos": True})
        assert cut.choices[0].message.content == content[:content.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_default_max_tokens_fills_the_context(served):
    st, out = http(served, "/v1/chat/completions", {"messages": MESSAGES, "ignore_eos": True})
    assert st == 200, out
    assert out["usage"]["total_tokens"] == MAX_LEN and out["choices"][0]["finish_reason"] == "length"


def test_add_generation_prompt(served):
    st, a = http(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2,
                                                  "temperature": 0, "add_generation_prompt": False})
    st2, b = http(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2,
                                                   "temperature": 0})
    assert st == st2 == 200
    diff = len(served.tok.encode("<|im_start|>assistant\n"))
    assert b["usage"]["prompt_tokens"] - a["usage"]["prompt_tokens"] == diff


@pytest.mark.parametrize("body,param,status", [
    ({}, "messages", 400),
    ({"messages": []}, "messages", 400),
    ({"messages": "hi"}, "messages", 400),
    ({"messages": [{"content": "x"}]}, "messages[0].role", 400),
    ({"messages": [{"role": "user"}]}, "messages[0].content", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]", 400),
    ({"messages": MESSAGES, "temperature": -1}, "temperature", 400),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", 400),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": "two"}, "top_logprobs", 400),
    ({"messages": [{"role": "user", "content": "a", "x": {"b": 1}}], "max_tokens": 1,
      "chat_template_kwargs": []}, "chat_template_kwargs", 400),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs", 400),
    ({"messages": MESSAGES, "logprobs": 3}, "logprobs", 400),
    ({"messages": MESSAGES, "max_tokens": 1000}, "max_tokens", 400),
    ({"messages": [{"role": "user", "content": "orca " * 200}]}, "messages", 400),
    ({"messages": MESSAGES, "n": 0}, "n", 400),
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools", 400),
    ({"messages": MESSAGES, "model": "other"}, "model", 404),
])
def test_chat_errors(served, body, param, status):
    st, out = http(served, "/v1/chat/completions", body)
    assert st == status, out
    assert out["error"]["param"] == param, out
    assert out["error"]["message"].startswith(param) or status == 404, out


def test_grpc_messages_are_the_chat_endpoint(served):
    """gRPC Generate with `messages`: the template-rendered prompt, the tokens HTTP chat gives;
    INVALID_ARGUMENT without a template, or with a prompt as well."""
    import grpc
    from orca_jax.client import Client
    st, out = http(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12,
                                                    "temperature": 0, "ignore_eos": True})
    assert st == 200, out
    with Client(served.grpc_target, timeout=30) as c:
        got = c.generate(MESSAGES, max_tokens=12, temperature=0, ignore_eos=True)
    assert got.text == out["choices"][0]["message"]["content"]
    assert got.prompt_tokens == out["usage"]["prompt_tokens"] == len(served.tok.encode(rendered(served)))
    with Client(served.plain.grpc_target, timeout=30) as c, pytest.raises(grpc.RpcError) as e:
        c.generate(MESSAGES, max_tokens=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--chat-template" in e.value.details()
    from orca_jax.client import make_request
    both = make_request(MESSAGES, max_tokens=2)
    both.prompt = "and text"
    with Client(served.grpc_target, timeout=30) as c, pytest.raises(grpc.RpcError) as e:
        list(c._stub.Generate(both, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("messages")


def test_no_template_is_400(served):
    st, out = http(served.plain, "/v1/chat/completions", {"messages": MESSAGES})
    assert st == 400
    assert "--chat-template" in out["error"]["message"] and "chat template" in out["error"]["message"]
    assert out["error"]["param"] == "model" and out["error"]["message"].startswith("model")
    st, out = http(served.plain, "/v1/completions", {"prompt": "The sea", "max_tokens": 2})
    assert st == 200  # completions still work


def test_cli_chat_template_overrides(served, tmp_path):
    """ServerConfig.chat_template (--chat-template) wins over the checkpoint's template."""
    src = ("{{ prefix | default('') }}{% for m in messages %}{% if m.role == 'tool' %}"
           "{{ raise_exception('no tool messages') }}{% endif %}{{ m['content'] }}{% endfor %}")
    bg = BackgroundServer(served.engine, ServerConfig(grpc_port=None, http_port=0,
                                                      chat_template=src), "chat").start()
    try:
        st, out = http(bg, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
        assert st == 200
        assert out["usage"]["prompt_tokens"] == len(served.tok.encode("You are an orca.The sea"))
        st, out = http(bg, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1,
                                                    "chat_template_kwargs": {"prefix": "Orca: "}})
        assert st == 200
        assert out["usage"]["prompt_tokens"] == len(served.tok.encode("Orca: You are an orca.The sea"))
        st, out = http(bg, "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]})
        assert st == 400 and out["error"]["param"] == "messages", out
        assert "no tool messages" in out["error"]["message"]
    finally:
        bg.stop()
    import argparse

    from orca_jax.cli import serve as cli_serve
    parser = argparse.ArgumentParser()
    cli_serve.add_parsers(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["serve", "--chat-template", str(tmp_path / "none.jinja")])
    with pytest.raises(FileNotFoundError):
        cli_serve._chat_template(args)
    (tmp_path / "t.jinja").write_text(src)
    args = parser.parse_args(["serve", "--chat-template", str(tmp_path / "t.jinja")])
    assert cli_serve._chat_template(args) == src
    assert cli_serve._chat_template(parser.parse_args(["serve"])) is None


def test_stream_disconnect_aborts(served):
    from http.client import HTTPConnection
    import re
    import time

    def aborted():
        _, text = http(served, "/metrics")
        m = re.search(r'^vllm:request_success_total{engine="0",finished_reason="abort",model_name="chat"} (\S+)$',
                      text, re.M)
        return float(m.group(1))

    before = aborted()
    conn = HTTPConnection("127.0.0.1", served.server.http_port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "messages": MESSAGES, "max_tokens": 70, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()  # mid-stream: the request must be aborted, not run to its 70 tokens
    deadline = time.monotonic() + 10
    while (served.engine.num_unfinished() or aborted() == before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert served.engine.num_unfinished() == 0 and aborted() == before + 1
