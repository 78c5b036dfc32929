"""Stop strings, matched as text streams in (host side, plain Python).

A stop string can arrive split over several tokens, so no client may ever see part of one:
`StopStringMatcher` holds back any suffix that may be the start of one. The matching walks an
Aho-Corasick automaton of the request's stop strings, so the cost per new token is its
characters, whatever the number of stop strings (95,000 of them once made a concurrent
32-token request take 22.7 s).

The automaton of a stop list is built once, off the engine thread (`SamplingParams`
builds it on first use, and the servers touch it while preparing a request in a worker
thread); requests with the same list share it while any of them lives (a weak cache), and it
is freed with the last of them.
"""
from __future__ import annotations

import array
import threading
import weakref
from typing import Sequence


class StopAutomaton:
    """Aho-Corasick over a list of stop strings. A state is the longest suffix of the text so
    far that is a prefix of some stop string, so `depth[state]` is exactly how much text must
    be held back; `match[state]` is the length of the longest stop string that ends there (0:
    none). Transitions live in one dict keyed by (state, character): compact enough that the
    largest list a request may give (SamplingParams' limits) costs a few hundred KiB."""


    def __init__(self, stops: Sequence[str]):
        # Keys are ints, (state << 21) | code point: no tuples for the garbage collector to
        # track (a gen-2 collection over a JAX process costs ~0.1 s).
        self.next: dict[int, int] = {}
        edges: list[list[int]] = [[]]  # per state: the keys of its transitions
        depth, match = [0], [0]
        for s in stops:
            state = 0
            for ch in s:
                key = state << 21 | ord(ch)
                child = self.next.get(key)
                if child is None:
                    child = self.next[key] = len(depth)
                    edges[state].append(key)
                    edges.append([])
                    depth.append(depth[state] + 1)
                    match.append(0)
                state = child
            match[state] = len(s)
        fail = [0] * len(depth)
        frontier = [0]
        while frontier:  # breadth first: a state's fail link is shallower, so already final
            nxt = []
            for state in frontier:
                for key in edges[state]:
                    child, c = self.next[key], key & 0x1FFFFF
                    f = fail[state]
                    while f and (f << 21 | c) not in self.next:
                        f = fail[f]
                    fail[child] = self.next.get(f << 21 | c, 0) if state else 0  # depth 1: the root
                    if not match[child]:  # the longest stop string ending here
                        match[child] = match[fail[child]]
                    nxt.append(child)
            frontier = nxt
        self.fail, self.depth, self.match = (array.array("i", x) for x in (fail, depth, match))
        self.first = frozenset(chr(key & 0x1FFFFF) for key in edges[0])  # characters that start one

    def step(self, state: int, ch: str) -> int:
        nxt, c = self.next, ord(ch)
        while state and (state << 21 | c) not in nxt:
            state = self.fail[state]
        return nxt.get(state << 21 | c, 0)


_AUTOMATA: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def stop_automaton(stops: tuple[str, ...]) -> StopAutomaton:
    """The automaton of `stops`, shared with every live request that has the same list."""
    with _LOCK:
        auto = _AUTOMATA.get(stops)
    if auto is None:
        auto = StopAutomaton(stops)
        with _LOCK:
            auto = _AUTOMATA.setdefault(stops, auto)
    return auto


class StopStringMatcher:
    """Filters a stream of text deltas for stop strings.

    `push(delta)` returns (text safe to emit, stopped). Text that might be the start of a stop
    string is held back until it is ruled out; `flush()` releases it at the end of the stream.
    When several stop strings match, the one that *ends* first wins (ties: the longer one),
    which is what a client would see token by token, so the result does not depend on how the
    text was split into deltas. Cost: O(len(delta)) per push.
    """

    def __init__(self, stops: Sequence[str] | StopAutomaton | None,
                 include_stop_str_in_output: bool = False):
        if stops is not None and not isinstance(stops, StopAutomaton):
            if any(not s for s in stops):
                raise ValueError("stop strings must be non-empty")
            stops = stop_automaton(tuple(stops)) if stops else None
        self.auto = stops
        self.include = include_stop_str_in_output
        self.state = 0
        self.held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if self.auto is None:
            return delta, False
        if not self.state and self.auto.first.isdisjoint(delta):
            return delta, False  # nothing held, and no stop string can start in `delta`
        buf = self.held + delta
        auto, state = self.auto, self.state
        for i, ch in enumerate(delta):
            state = auto.step(state, ch)
            if auto.match[state]:
                end = len(self.held) + i + 1
                self.matched = buf[end - auto.match[state]:end]
                self.stopped, self.held = True, ""
                return buf[:end if self.include else end - auto.match[state]], True
        self.state = state
        hold = auto.depth[state]
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """End of stream without a stop: the held-back text is not a stop string after all."""
        out, self.held, self.state = self.held, "", 0
        return "" if self.stopped else out
