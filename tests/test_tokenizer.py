"""Tokenizer loading, streaming detokenization and stop strings (host only, no JAX)."""
import json
import random

import pytest

from orca_jax.demo_model import EOS, train_demo_tokenizer
from orca_jax.stops import StopStringMatcher
from orca_jax.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, load_tokenizer

TEXT = "Orcas hunt in pods — 虎鲸 live in every ocean 🐋! Ünïcödé «quotes» ok."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """tokenizer.json (+ tokenizer_config.json) of the demo tokenizer."""
    path = tmp_path_factory.mktemp("tok")
    train_demo_tokenizer(4096).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOS}}))
    return path


def _stream(tokenizer, ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.push([i]) for i in ids]
    return deltas, detok.flush(), detok


def test_hf_tokenizer_round_trip(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 4096 and tok.eos_token_id == 0
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.decode([0] + ids + [0]) == TEXT  # special tokens are skipped


def test_vocab_and_merges_files_match_tokenizer_json(tok_dir, tmp_path):
    train_demo_tokenizer(4096).model.save(str(tmp_path))  # vocab.json + merges.txt
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode(TEXT) == load_tokenizer(tok_dir).encode(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT and tok.eos_token_id == 0


def test_byte_fallback(tmp_path):
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.eos_token_id is None
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode([104, 300, 105, 4095]) == "hi"  # ids >= 256 decode to nothing


@pytest.mark.parametrize("kind", ["hf", "bytes"])
def test_incremental_detokenizer_never_splits_a_character(tok_dir, kind):
    tok = load_tokenizer(tok_dir) if kind == "hf" else ByteTokenizer()
    ids = tok.encode(TEXT)
    # The BPE learned no merges for CJK or emoji, so their bytes are separate tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, tail, detok = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT and tail == ""


def test_incremental_detokenizer_with_prompt_and_window(tok_dir):
    tok = load_tokenizer(tok_dir)
    calls = []

    class Counting:
        def decode(self, ids):
            calls.append(len(ids))
            return tok.decode(ids)

    prompt = tok.encode("The sea is")
    out = tok.encode(" deep and quiet blue. " * 20 + "虎鲸")
    deltas, tail, _ = _stream(Counting(), out, prompt)
    assert "".join(deltas) + tail == tok.decode(prompt + out)[len("The sea is"):]
    assert max(calls) <= 10  # a small window, not the whole output, per token


def test_incremental_detokenizer_flushes_broken_bytes():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok)
    assert detok.push([0xE4, 0xB8]) == ""        # first 2 bytes of a 3-byte character
    assert detok.flush() == ""                   # stream ended mid-character: dropped, as vLLM
    detok = IncrementalDetokenizer(tok)
    assert detok.push([*b"ok", 0xE4]) == "" and detok.flush() == "ok"  # held with it, then released
    detok = IncrementalDetokenizer(tok)
    got = "".join(detok.push([b]) for b in [0xFF, *b"abcd"])  # 0xFF is never valid UTF-8
    assert got + detok.flush() == "\ufffdabcd" and "\ufffd" in got  # not held forever


def _run_matcher(chunks, stops, include=False):
    m = StopStringMatcher(stops, include)
    out, stopped = [], False
    for c in chunks:
        text, stopped = m.push(c)
        out.append(text)
        if stopped:
            break
    return out, stopped, m.flush()


def test_stop_string_split_across_deltas_is_never_emitted():
    out, stopped, tail = _run_matcher(["Hello wo", "rld. ST", "O", "P and more"], ["STOP"])
    assert out == ["Hello wo", "rld. ", "", ""] and stopped and tail == ""
    out, stopped, _ = _run_matcher(["a S", "TOP b"], ["STOP"], include=True)
    assert "".join(out) == "a STOP" and stopped


def test_held_back_prefix_is_flushed_at_the_end():
    out, stopped, tail = _run_matcher(["the end is ST", "O"], ["STOP"])
    assert out == ["the end is ", ""] and not stopped and tail == "STO"
    out, stopped, tail = _run_matcher(["ST", "ART"], ["STOP"])
    assert "".join(out) == "START" and tail == "" and not stopped


def test_stop_result_does_not_depend_on_how_text_is_split():
    text = "xx abc then yzz and the rest"
    stops = ["yz", "abcd", "bc then y", "then"]
    # "bc then y" starts first but "then" ends first, as a token-by-token stream sees it.
    whole, stopped, _ = _run_matcher([text], stops)
    assert "".join(whole) == "xx abc " and stopped
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 10)))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        out, stopped, tail = _run_matcher(chunks, stops)
        assert "".join(out) + tail == "xx abc " and stopped


def test_detokenizer_and_stop_matcher_together(tok_dir):
    tok = load_tokenizer(tok_dir)
    detok, matcher = IncrementalDetokenizer(tok), StopStringMatcher(["虎鲸"])
    emitted = []
    for i in tok.encode(TEXT):
        text, stopped = matcher.push(detok.push([i]))
        emitted.append(text)
        if stopped:
            break
    assert stopped and "".join(emitted) == TEXT[:TEXT.index("虎鲸")]
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher([""])


def test_stop_matching_agrees_with_a_naive_search_however_the_text_is_split():
    """The Aho-Corasick matcher against the definition: the stop string that ends first wins
    (ties: the longer), text before it is emitted, nothing after; random stop sets over a
    small alphabet (so overlaps and shared prefixes are common), random delta splits."""
    def naive(stops, text, include):
        hits = [(i + len(s), i) for s in stops for i in range(len(text)) if text.startswith(s, i)]
        if not hits:
            return text, False
        end, start = min(hits)
        return text[:end if include else start], True

    rng = random.Random(0)
    for _ in range(3000):
        stops = list({"".join(rng.choice("abc") for _ in range(rng.randint(1, 4)))
                      for _ in range(rng.randint(1, 4))})
        # x, y start no stop string: deltas of them take the matcher's fast path
        text = "".join(rng.choice("abcxy") for _ in range(rng.randint(0, 14)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 4))))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        include = rng.random() < 0.5
        m, got, stopped = StopStringMatcher(stops, include), "", False
        for d in deltas:
            emitted, stopped = m.push(d)
            got += emitted
            if stopped:
                break
        if not stopped:
            got += m.flush()
        assert (got, stopped) == naive(stops, text, include), (stops, deltas, include)
