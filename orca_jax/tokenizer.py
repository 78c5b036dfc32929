"""Tokenizers, streaming detokenization and stop strings (host side; no JAX).

`load_tokenizer` picks, in order: `tokenizer.json` (HF `tokenizers`), `vocab.json` +
`merges.txt` (GPT-2 byte-level BPE), else a byte tokenizer (ids 0..255 are UTF-8 bytes), so
every checkpoint can at least round-trip text.

Streaming has two hazards, both handled here rather than in the servers:
* a byte-level BPE token can end in the middle of a UTF-8 character, so decoding the tokens
  so far yields U+FFFD until the next token completes it: `IncrementalDetokenizer` holds such
  text back;
* a stop string can arrive split over several tokens: `StopStringMatcher` holds back any
  suffix that may be the start of one, so no client ever sees part of a stop string.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

import tokenizers

EOS_FALLBACK = "<|endoftext|>"  # GPT-2's end-of-text token, used when no config names one


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer`; `decode` skips special tokens (as vLLM does by default)."""

    def __init__(self, tok: tokenizers.Tokenizer, eos_token: str | None = None):
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id(eos_token or EOS_FALLBACK)
        self.eos_token_id: int | None = eos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255; larger ids (a model's extra vocabulary) decode to ''."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def _eos_token_name(path: Path) -> str | None:
    """The eos token's text from tokenizer_config.json or special_tokens_map.json, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = path / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token")
            if isinstance(eos, dict):  # AddedToken serialised as {"content": ..., ...}
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None


def load_tokenizer(checkpoint_dir: str | Path) -> HFTokenizer | ByteTokenizer:
    path = Path(checkpoint_dir)
    if (path / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        return HFTokenizer(tok, _eos_token_name(path))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        # GPT-2's original files: byte-level BPE without a prefix space (HF GPT2Tokenizer).
        bpe = tokenizers.ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
        tok = tokenizers.Tokenizer.from_str(bpe.to_str())
        if tok.token_to_id(EOS_FALLBACK) is not None:
            tok.add_special_tokens([EOS_FALLBACK])
        return HFTokenizer(tok, _eos_token_name(path))
    return ByteTokenizer()


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of complete text.

    Keeps a small window of tokens (vLLM's `detokenize_incrementally`): `prefix_offset` marks
    tokens already emitted that are re-decoded only as context (byte-level merges and
    SentencePiece spaces depend on the previous token), `read_offset` the first token whose
    text is not emitted yet. Each push decodes only the window, so cost per token is O(window),
    not O(output).
    """

    # A UTF-8 character is at most 4 bytes, so a genuinely incomplete one is pending over at
    # most 4 tokens; past that the U+FFFD is real (invalid bytes) and is emitted as such.
    MAX_PENDING = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - 5, 0)  # a few prompt tokens of context

    def push(self, new_ids: Sequence[int]) -> str:
        """Appends `new_ids`; returns the newly completed text (possibly '')."""
        self.ids.extend(int(i) for i in new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """End of stream: returns whatever is still held back (with U+FFFD for broken bytes)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        pending = len(self.ids) - self.read_offset
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and pending < self.MAX_PENDING
                                        and not final):
            return ""  # nothing new yet (e.g. a skipped special token), or a character in flight
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


class StopStringMatcher:
    """Filters a stream of text deltas for stop strings.

    `push(delta)` returns (text safe to emit, stopped). Text that might be the start of a stop
    string is held back until it is ruled out; `flush()` releases it at the end of the stream.
    When several stop strings match, the one that *ends* first wins (ties: the longer one),
    which is what a client would see token by token, so the result does not depend on how the
    text was split into deltas.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = tuple(stops)
        self.include = include_stop_str_in_output
        self.held = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self.held + delta
        match = None  # (end, -start) of the winning stop string
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (match is None or (i + len(s), -i) < match):
                match = (i + len(s), -i)
        if match is not None:
            end, start = match[0], -match[1]
            self.stopped, self.held = True, ""
            return buf[:end if self.include else start], True
        hold = self._partial_suffix(buf)
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """End of stream without a stop: the held-back text is not a stop string after all."""
        out, self.held = self.held, ""
        return "" if self.stopped else out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        longest = min(len(buf), max((len(s) - 1 for s in self.stops), default=0))
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
