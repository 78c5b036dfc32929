"""Tokenizers and streaming detokenization (host side; no JAX).

`load_tokenizer` picks, in order: `tokenizer.json` (HF `tokenizers`), `vocab.json` +
`merges.txt` (GPT-2 byte-level BPE), else a byte tokenizer (ids 0..255 are UTF-8 bytes), so
every checkpoint can at least round-trip text.

Special tokens as `transformers` adds them: `encode(text)` applies the tokenizer's
post-processor (e.g. Llama's `<s>` before the text; GPT-2 and Qwen add nothing); with only
vocab.json + merges.txt, tokenizer_config.json's `add_bos_token` / `add_eos_token` decide (as
HF's GPT2Tokenizer does for OPT). With a tokenizer.json, transformers 5 follows its
post-processor and ignores those two flags, and so do we. A SentencePiece-style tokenizer.json
whose tokenizer_config.json names LlamaTokenizer(Fast) (Llama 2, TinyLlama, Mistral v0.1) is
rebuilt the way transformers 5's LlamaTokenizer rebuilds it (`_as_llama_tokenizer`). `encode(text, add_special_tokens=False)`
is for text that already holds them (a rendered chat template). End-of-sequence ids from
generation_config.json (Llama 3 lists several) are `generation_eos_ids`.

Streaming hazard handled here rather than in the servers: a byte-level BPE token can end in
the middle of a UTF-8 character, so decoding the tokens so far yields U+FFFD until the next
token completes it: `IncrementalDetokenizer` holds such text back (as vLLM does, for as long
as the text ends in U+FFFD) and drops a character the stream never completes. (Stop strings split over
tokens: orca_jax/stops.py.)
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Protocol, Sequence

import tokenizers
import tokenizers.processors

EOS_FALLBACK = "<|endoftext|>"  # GPT-2's end-of-text token, used when no config names one


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None
    max_token_bytes: int | None  # UTF-8 bytes of the longest token (None: no bound from text length)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_string(self, token_id: int) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer`; `decode` skips special tokens (as vLLM does by default).

    `token_bytes` (byte-level BPE tokenizers, GPT-2's family): each id's bytes, b"" for special
    tokens, so that decoding a stream is concatenating bytes and decoding UTF-8: the streaming
    detokenizer then costs a list lookup per token instead of two `decode` calls. It is built
    only when the decoder is plain ByteLevel and checked against `decode` on sample ids."""

    # The checkpoint's chat template and special-token strings (orca_jax/chat.py), set by
    # `load_tokenizer`; `chat_template_error` says why a template that is there is unusable.
    chat_template: str | None = None
    chat_template_error: str | None = None
    special_tokens: dict[str, str] = {}
    generation_eos_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id(s)

    def __init__(self, tok: tokenizers.Tokenizer, eos_token: str | None = None):
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id(eos_token or EOS_FALLBACK)
        self.eos_token_id: int | None = eos
        self.token_bytes: list[bytes] | None = _byte_level_table(tok, self.vocab_size)
        # The longest token's UTF-8 bytes (at most 4 per character): a text of more bytes than
        # this times the context cannot fit it, which the servers check before tokenizing.
        # None with a normalizer, which may drop characters before they become tokens.
        self.max_token_bytes: int | None = (
            None if tok.normalizer is not None else max(map(len, self.token_bytes)) if self.token_bytes
            else 4 * max(map(len, tok.get_vocab())))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long prompt being tokenized in a
        # server's worker thread must not stall the engine thread and the event loop.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_string(self, token_id: int) -> str:
        """The vocabulary's string for one id (HF `convert_ids_to_tokens`: 'Ġthe', '▁the')."""
        return self._tok.id_to_token(token_id) or ""


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: the printable character ByteLevel maps each byte to."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _byte_level_table(tok: tokenizers.Tokenizer, vocab_size: int) -> list[bytes] | None:
    """Each id's bytes as the ByteLevel decoder makes them: a token whose characters are all
    in GPT-2's byte alphabet maps through it, any other (an added token) is its UTF-8 text;
    special tokens are skipped. Checked against `decode`, every added token included."""
    if type(tok.decoder).__name__ != "ByteLevel" or tok.normalizer is not None:
        return None
    to_byte = _gpt2_unicode_to_byte()
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    table = []
    for i in range(vocab_size):
        piece = tok.id_to_token(i)
        if piece is None or (i in added and added[i].special):
            table.append(b"")
        elif all(ch in to_byte for ch in piece):
            table.append(bytes(to_byte[ch] for ch in piece))
        else:
            table.append(piece.encode("utf-8"))
    rng = random.Random(0)  # the table must decode exactly as `decode` does
    samples = [[rng.randrange(vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(200)]
    samples += [list(range(min(vocab_size, 4096)))] + [[i] for i in added] + [
        [i, rng.randrange(vocab_size), i] for i in added]
    for ids in samples:
        if b"".join(table[i] for i in ids).decode("utf-8", "replace") != tok.decode(ids, skip_special_tokens=True):
            return None
    return table


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255; larger ids (a model's extra vocabulary) decode to ''."""

    vocab_size = 256
    eos_token_id = None
    max_token_bytes = 1
    chat_template = None
    chat_template_error = None
    special_tokens: dict[str, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_string(self, token_id: int) -> str:
        return bytes([token_id]).decode("latin-1") if 0 <= token_id < 256 else ""


def _token_name(path: Path, key: str) -> str | None:
    """A special token's text (`key`: "eos_token", "bos_token") from tokenizer_config.json or
    special_tokens_map.json, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = path / name
        if f.is_file():
            tok = json.loads(f.read_text()).get(key)
            if isinstance(tok, dict):  # AddedToken serialised as {"content": ..., ...}
                tok = tok.get("content")
            if isinstance(tok, str):
                return tok
    return None


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _bos_eos_template(tok: tokenizers.Tokenizer, path: Path) -> None:
    """vocab.json + merges.txt: add BOS / EOS around the text as tokenizer_config.json's
    `add_bos_token` / `add_eos_token` say (HF GPT2Tokenizer; default: neither)."""
    cfg = _json(path / "tokenizer_config.json")
    single, special = "$A", []
    for flag, key, where in (("add_bos_token", "bos_token", "before"), ("add_eos_token", "eos_token", "after")):
        name = _token_name(path, key)
        tid = tok.token_to_id(name) if cfg.get(flag) and name else None
        if tid is not None:
            single = f"{name} {single}" if where == "before" else f"{single} {name}"
            special.append((name, tid))
    if special:
        tok.post_processor = tokenizers.processors.TemplateProcessing(single=single, special_tokens=special)


LLAMA_TOKENIZERS = ("LlamaTokenizer", "LlamaTokenizerFast")


def _as_llama_tokenizer(tok: tokenizers.Tokenizer, path: Path) -> None:
    """transformers 5's LlamaTokenizer keeps a SentencePiece-style tokenizer.json's vocabulary
    and merges but replaces its normalizer and decoder: no normalizer, a Metaspace
    pre-tokenizer that prepends '▁' to the first word ("first"; "always" with legacy: true,
    "never" with add_prefix_space: false), and the decoder to match. Byte-level
    tokenizer.json files (Llama 3) are used as they are, by transformers too."""
    cfg = _json(path / "tokenizer_config.json")
    if cfg.get("tokenizer_class") not in LLAMA_TOKENIZERS or type(tok.model).__name__ != "BPE" or (
            type(tok.pre_tokenizer).__name__ == "ByteLevel" or type(tok.decoder).__name__ == "ByteLevel"):
        return
    from tokenizers import decoders, pre_tokenizers
    prefix = cfg.get("add_prefix_space") is not False
    scheme = ("always" if cfg.get("legacy", False) else "first") if prefix else "never"
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))


def _generation_eos_ids(path: Path) -> tuple[int, ...]:
    eos = _json(path / "generation_config.json").get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return tuple(i for i in eos if isinstance(i, int) and not isinstance(i, bool))


def load_tokenizer(checkpoint_dir: str | Path) -> HFTokenizer | ByteTokenizer:
    path = Path(checkpoint_dir)
    if (path / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        _as_llama_tokenizer(tok, path)
        return _with_chat_template(HFTokenizer(tok, _token_name(path, "eos_token")), path)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        # GPT-2's original files: byte-level BPE without a prefix space (HF GPT2Tokenizer).
        bpe = tokenizers.ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
        tok = tokenizers.Tokenizer.from_str(bpe.to_str())
        if tok.token_to_id(EOS_FALLBACK) is not None:
            tok.add_special_tokens([EOS_FALLBACK])
        _bos_eos_template(tok, path)
        return _with_chat_template(HFTokenizer(tok, _token_name(path, "eos_token")), path)
    return ByteTokenizer()


def _with_chat_template(tok: HFTokenizer, path: Path) -> HFTokenizer:
    """Records the checkpoint's chat template, special-token strings and generation EOS ids on `tok`."""
    from .chat import checkpoint_template, special_tokens
    tok.special_tokens = special_tokens(path)
    tok.generation_eos_ids = _generation_eos_ids(path)
    try:
        tok.chat_template = checkpoint_template(path)
    except (ValueError, OSError) as e:  # several templates and no default; unreadable file
        tok.chat_template_error = str(e)
    return tok


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of complete text.

    Keeps a small window of tokens (vLLM's `detokenize_incrementally`): `prefix_offset` marks
    tokens already emitted that are re-decoded only as context (byte-level merges and
    SentencePiece spaces depend on the previous token), `read_offset` the first token whose
    text is not emitted yet. Each push decodes only the window, so cost per token is O(window),
    not O(output).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # Byte-level tokenizers: bytes in, UTF-8 out; the bytes of a split character wait in
        # `pending` until they make text that does not end in U+FFFD (`_utf8`); the output
        # processor reads it to take a token inline (`OutputProcessor.append_rows`).
        self._bytes = getattr(tokenizer, "token_bytes", None)
        self.pending = b""
        # Others: a window of ids, with a few prompt tokens of context.
        self.ids: list[int] = [] if self._bytes else list(prompt_ids[-5:])
        self.read_offset = len(self.ids)
        self.prefix_offset = 0

    def push(self, new_ids: Sequence[int]) -> str:
        """Appends `new_ids`; returns the newly completed text (possibly '')."""
        if self._bytes is not None:
            table, n = self._bytes, len(self._bytes)
            return self._utf8(b"".join([table[i] if 0 <= i < n else b"" for i in new_ids]))
        self.ids.extend(int(i) for i in new_ids)
        return self._emit(final=False)

    def push_one(self, tok: int) -> str:
        """`push((tok,))`, without building a sequence: the per-token path of the engine."""
        table = self._bytes
        if table is not None:
            return self._utf8(table[tok] if 0 <= tok < len(table) else b"")
        return self.push((tok,))

    def _utf8(self, data: bytes) -> str:
        """vLLM's rule (HF tokenizers' DecodeStream): text that would end in U+FFFD is held,
        whether its last character is unfinished or invalid, until a token makes it end well;
        bytes that never do are dropped at the end (`flush`)."""
        if not self.pending:
            try:
                return data.decode("utf-8")  # the common case: whole characters
            except UnicodeDecodeError:
                pass
        buf = self.pending + data
        text = buf.decode("utf-8", "replace")
        if text.endswith("\ufffd"):
            self.pending = buf
            return ""
        self.pending = b""
        return text

    def flush(self) -> str:
        """End of stream: returns whatever is still held back, except a character the stream
        never completed (vLLM drops that trailing U+FFFD instead of emitting it)."""
        if self._bytes is not None:
            self.pending = b""  # bytes that never made a character (vLLM drops them too)
            return ""
        return self._emit(final=True).rstrip("\ufffd")

    def _emit(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            # Nothing new yet (e.g. a skipped special token), or text ending in a character in
            # flight: held (as vLLM holds it) until a token completes it or the stream ends.
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta
