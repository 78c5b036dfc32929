"""Chat templates: OpenAI chat messages -> one prompt text, as `transformers` renders it.

    template = ChatTemplate(source, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    text = template.render(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)   # the template wrote them

The text equals `AutoTokenizer.apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)` for the same tokenizer files: the same sandboxed jinja2
environment (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, the
`raise_exception` and `strftime_now` globals, a `tojson` filter that does not escape HTML), the
same variables (`messages`, `add_generation_prompt`, every special token of the tokenizer config
as `bos_token`, `eos_token`, ...), keys whose value is null dropped from each message. transformers
then encodes with `add_special_tokens=False` (a template that writes `{{ bos_token }}` must not
get a second BOS), and so do the servers.

Where the template comes from (`checkpoint_template`): `chat_template.jinja` in the checkpoint
directory, else `chat_template` in `tokenizer_config.json`, a string or a list of named templates
of which "default" is used (transformers' order). `orca-jax serve --chat-template FILE` overrides
both. A template is code the operator chose; the messages are the client's data, which the
sandbox keeps from reaching Python internals.

Content given as a list of parts (`[{"type": "text", "text": ...}]`): a template that loops over
a message's content gets the parts; any other gets the texts joined with newlines (vLLM's
"string" content format).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token")


class ChatError(ValueError):
    """A chat request the template cannot render; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _token_text(v) -> str | None:
    if isinstance(v, dict):  # AddedToken serialised as {"content": ..., ...}
        v = v.get("content")
    return v if isinstance(v, str) else None


def special_tokens(checkpoint_dir: str | Path) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as strings, from tokenizer_config.json, else
    special_tokens_map.json (the variables transformers gives a chat template)."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        f = Path(checkpoint_dir) / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in SPECIAL_TOKEN_KEYS:
            text = _token_text(cfg.get(key)) if isinstance(cfg, dict) else None
            if text is not None:
                out[key] = text
    return out


def select_template(value) -> str | None:
    """A `chat_template` value as transformers reads it: a string, or a list of
    `{"name", "template"}` (or a dict of them) of which "default" is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        if "default" in value and isinstance(value["default"], str):
            return value["default"]
        raise ValueError(f"the tokenizer has several chat templates ({sorted(map(str, value))}) "
                         "and none named 'default'; pick one with --chat-template")
    raise ValueError(f"chat_template must be a string or a list of named templates, got "
                     f"{type(value).__name__}")


def checkpoint_template(checkpoint_dir: str | Path) -> str | None:
    """The checkpoint's chat template source, or None when it has none."""
    path = Path(checkpoint_dir)
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        if isinstance(cfg, dict):
            return select_template(cfg.get("chat_template"))
    return None


def read_template_arg(value: str) -> str:
    """`--chat-template`: a file holding the template; a value that is not a file but looks
    like a jinja template is taken as the template itself (as vLLM does)."""
    p = Path(value).expanduser()
    if p.is_file():
        return p.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(f"--chat-template {value}: no such file")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _loops_over_content(env, source: str) -> bool:
    """Whether the template iterates over a message's `content` (then it takes a list of
    parts, OpenAI's format; else content is a string): vLLM's detection, simplified."""
    from jinja2 import nodes
    tree = env.parse(source)

    def is_content(node) -> bool:
        if isinstance(node, nodes.Getattr) and node.attr == "content":
            return True
        return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
                and node.arg.value == "content")

    for loop in tree.find_all(nodes.For):
        it = loop.iter
        while isinstance(it, nodes.Filter) and it.node is not None:  # content | selectattr(...)
            it = it.node
        if is_content(it):
            return True
    return False


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        import jinja2
        if not isinstance(source, str) or not source.strip():
            raise ValueError("the chat template is empty")
        env = _environment()
        try:
            self._template = env.from_string(source)
            self.content_parts = _loops_over_content(env, source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not compile: {e} (line {e.lineno})") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """The prompt text. `messages` are checked (ChatError naming the field); a template
        that raises (`raise_exception("Conversation roles must alternate ...")`) or fails on
        these messages raises ChatError for `messages`."""
        import jinja2
        msgs = normalize_messages(messages, self.content_parts)
        variables = {**self.special_tokens, **kwargs, "messages": msgs,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as e:
            raise ChatError("messages", f"the chat template refused the messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
            raise ChatError("messages", f"the chat template failed on the messages "
                                        f"({type(e).__name__}: {e})") from None


def normalize_messages(messages, content_parts: bool = False) -> list[dict]:
    """Checked copies of OpenAI chat messages: each an object with a string `role` and a
    `content` that is a string, a list of text parts, or null (an assistant message with tool
    calls). Keys whose value is null are dropped (as transformers does); other keys (`name`,
    `tool_calls`, `tool_call_id`, ...) pass through to the template."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatError(where, "must be an object with `role` and `content`")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatError(f"{where}.role", "is missing or not a string")
        if "content" not in m:
            raise ChatError(f"{where}.content", "is missing")
        content = m["content"]
        if content is None:
            if role != "assistant":
                raise ChatError(f"{where}.content", "is null (only an assistant message may have "
                                                    "no content)")
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ChatError(f"{where}.content[{j}]", f"only text parts are supported, "
                                                             f"got {json.dumps(kind)[:40]}")
                if not isinstance(part.get("text"), str):
                    raise ChatError(f"{where}.content[{j}].text", "must be a string")
                texts.append(part["text"])
            content = [{"type": "text", "text": t} for t in texts] if content_parts else "\n".join(texts)
        elif not isinstance(content, str):
            raise ChatError(f"{where}.content", "must be a string or a list of text parts")
        msg = {k: v for k, v in m.items() if v is not None}
        if content is not None:
            msg["content"] = content
        out.append(msg)
    return out
