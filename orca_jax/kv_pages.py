"""The KV page pool's host side: which pages are free, who holds which, and the prefix cache.
Plain Python, no JAX: the scheduler owns one `PagePool` and the device only ever sees page ids
(block tables and the flat write index of each row, orca_jax/plan.py).

The device buffer (models/attention.py `KVCache`) is one array of `num_pages` pages of
`page_size` positions per layer. A request holds a list of pages (its block table): position
p of the request lives at page `pages[p // page_size]`, offset `p % page_size`.

Automatic prefix caching (vLLM's design): a FULL page is keyed by a hash of its tokens and of
every token before it (a chain: `page_hash(previous hash, tokens)`), so equal keys mean equal
keys and values in every layer. A page is shared by reference count; when its last holder
lets go it stays cached but becomes free, and the pool reuses free pages least recently freed
first, forgetting their hash then. A request's last pages are freed first, so a shared prefix
outlives the tails that hang off it.

    pool = PagePool(num_pages=64, page_size=16)
    n = pool.num_cached(hashes)          # leading pages of a prompt already cached
    hits = pool.acquire(hashes[:n])      # ... now held by this request too
    pages = pool.allocate(3)             # or None when fewer than 3 are free
    pool.register(pages[0], hashes[0])   # a page just filled: reusable by others
    pool.free(hits + pages)              # drop this holder's references
"""
from __future__ import annotations

import array
import collections
import hashlib
from typing import Sequence

NO_HASH = None
PAGE_SIZE = 64  # positions per page, default (docs/benchmarks.md, "Page size")


def pages_for(positions: int, page_size: int) -> int:
    """Pages that hold `positions` positions: the one rounding rule of every count of pages."""
    return -(-positions // page_size)


def watermark_pages(num_pages: int) -> int:
    """Pages on-demand admission leaves free for running requests to grow into (vLLM's 1%)."""
    return max(1, num_pages // 100)


def pool_pages_for(held: int) -> int:
    """The smallest pool in which `held` pages can all be in use beside the admission
    watermark: the most pages a pool needs (every slot at max_model_len)."""
    usable = lambda n: n - watermark_pages(n)  # nondecreasing in n  # noqa: E731
    n = held + max(1, held // 99)  # within a page or two of the answer
    while usable(n) < held:
        n += 1
    while n > 1 and usable(n - 1) >= held:
        n -= 1
    return n


def page_hash(previous: bytes | None, tokens: Sequence[int]) -> bytes:
    """Key of a full page: a 128-bit BLAKE2b digest of its tokens and (through `previous`, the
    key of the page before it) everything before them. Collision-resistant: Python's own
    hash of a tuple of ints is not, and a crafted prompt that collides with another's key
    would be served that request's keys and values."""
    h = hashlib.blake2b(previous or b"", digest_size=16)
    h.update(array.array("q", tokens).tobytes())
    return h.digest()


def chain_hashes(token_ids: Sequence[int], page_size: int, start: list[bytes] | None = None) -> list[bytes]:
    """Keys of every full page of `token_ids`, extending `start` (keys already computed for
    its first pages)."""
    out = list(start or [])
    for i in range(len(out), len(token_ids) // page_size):
        out.append(page_hash(out[-1] if out else None, token_ids[i * page_size:(i + 1) * page_size]))
    return out


class PagePool:
    """Free pages, reference counts and the prefix cache of a pool of `num_pages` pages."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_pages
        self.hash_of: list[bytes | None] = [NO_HASH] * num_pages
        self.cached: dict[bytes, int] = {}  # page hash -> page
        # Pages nobody holds, least recently freed first (dict: ordered, O(1) removal).
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_pages))
        self.queries = self.hits = 0      # prefix-cache lookups, in tokens (vLLM's counters)

    @property
    def num_free(self) -> int:
        """Pages that `allocate` can hand out (cached ones nobody holds included)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def usage(self) -> float:
        return self.num_used / self.num_pages

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages (reference count 1), evicting the least recently freed cached
        pages first; None (nothing taken) if fewer than `n` are free."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            h = self.hash_of[page]
            if h is not NO_HASH:  # evicted from the cache
                del self.cached[h]
                self.hash_of[page] = NO_HASH
            self.ref[page] = 1
            out.append(page)
        return out

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference to each of `pages`; pages nobody holds become free (their last
        pages first: the tail of a sequence is the first to be reused)."""
        for page in reversed(pages):
            assert self.ref[page] > 0, f"page {page} freed twice"
            self.ref[page] -= 1
            if self.ref[page] == 0:
                self._free[page] = None

    def num_cached(self, hashes: Sequence[bytes]) -> int:
        """How many leading pages of `hashes` are cached (nothing is taken)."""
        n = 0
        if self.enable_prefix_caching:
            while n < len(hashes) and hashes[n] in self.cached:
                n += 1
        return n

    def num_cached_free(self, hashes: Sequence[bytes]) -> int:
        """Of the cached pages of `hashes`, how many nobody holds (taking them shrinks the
        free count)."""
        return sum(self.ref[self.cached[h]] == 0 for h in hashes)

    def acquire(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached pages of `hashes` (all must be cached: `num_cached`), each now held once
        more by the caller."""
        out = []
        for h in hashes:
            page = self.cached[h]
            if self.ref[page] == 0:
                del self._free[page]
            self.ref[page] += 1
            out.append(page)
        return out

    def count_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """A prompt of `num_tokens` looked up the cache and found `num_hit_tokens` (vLLM's
        prefix_cache_queries / prefix_cache_hits, in tokens; the scheduler counts a request's
        first admission only, as vLLM keeps preempted requests' lookups apart)."""
        if self.enable_prefix_caching:
            self.queries += num_tokens
            self.hits += num_hit_tokens

    def register(self, page: int, h: bytes) -> None:
        """`page` now holds the full page keyed `h`: later prompts with that prefix reuse it.
        If another page already holds `h`, this one stays private."""
        if self.enable_prefix_caching and self.hash_of[page] is NO_HASH and h not in self.cached:
            self.cached[h] = page
            self.hash_of[page] = h

    def check(self, held: Sequence[Sequence[int]]) -> None:
        """Invariants, for tests: reference counts equal the holders in `held` (every running
        request's pages), free pages are exactly the unheld ones, the cache maps both ways."""
        count = [0] * self.num_pages
        for pages in held:
            for p in pages:
                count[p] += 1
        assert count == self.ref, "reference counts differ from the holders' pages"
        assert set(self._free) == {p for p in range(self.num_pages) if count[p] == 0}
        assert all(self.hash_of[p] == h for h, p in self.cached.items())
        assert sum(h is not NO_HASH for h in self.hash_of) == len(self.cached)


class SwapSpace:
    """The host-memory tier: room for `capacity` pages of preempted requests' KV (what
    `--swap-space` GiB holds), and the cost model that picks swapping or recomputing.

    Swapping a request of n tokens copies its pages out and back in: about
    `fixed_s + n * swap_s_per_token` seconds; recomputing prefills them again: about
    `n * recompute_s_per_token`. The engine estimates the coefficients from the model's
    bytes of KV and FLOPs per token (engine.py `swap_space`)."""

    def __init__(self, capacity: int, swap_s_per_token: float, recompute_s_per_token: float,
                 fixed_s: float, mode: str = "auto"):
        self.capacity, self.used = capacity, 0
        self.swap_s_per_token, self.recompute_s_per_token = swap_s_per_token, recompute_s_per_token
        self.fixed_s, self.mode = fixed_s, mode

    def should_swap(self, num_pages: int, num_tokens: int) -> bool:
        """Swap (not recompute) a request holding `num_pages` pages of `num_tokens` tokens?"""
        if self.mode == "recompute" or not 0 < num_pages <= self.capacity - self.used:
            return False
        return self.mode == "swap" or (self.fixed_s + num_tokens * self.swap_s_per_token
                                       < num_tokens * self.recompute_s_per_token)

    def take(self, num_pages: int) -> None:
        assert self.used + num_pages <= self.capacity
        self.used += num_pages

    def give_back(self, num_pages: int) -> None:
        assert 0 <= num_pages <= self.used
        self.used -= num_pages
