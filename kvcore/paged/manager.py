"""The KV cache block manager with automatic prefix caching (vLLM v1), fork and copy-on-write (vLLM v0).

Rules (vLLM v1 ``KVCacheManager`` / ``BlockPool`` / ``SingleTypeKVCacheManager``):

* all blocks are created up front; free ones sit in a free block queue in LRU order;
* a block gets its hash as soon as it is full (hash chained over the request's full blocks) and stays
  cached, even when freed, until it is popped from the queue head for reuse (eviction);
* at allocation the longest run of cached full prompt blocks is hit: those blocks are "touched"
  (ref_cnt + 1, removed from the queue when free) before any new block is popped from the head;
* at most ``num_tokens - 1`` prompt tokens are hit, because the last prompt token must be computed to
  get logits; as in vLLM, hits are whole blocks, so a fully cached prompt recomputes its last block;
* a finished request's blocks go to the queue tail in reverse order (its tail blocks are evicted first);
* block tables are append-only and duplicate full blocks are kept (no dedupe of an allocated block).

vLLM v1 has no fork: it runs parallel samples as separate requests sharing the prompt through the
prefix cache. ``fork`` follows the vLLM v0 block manager instead: the child shares every block, and a
write into a shared, not-full block first copies it (copy-on-write), the one place a table entry is
replaced rather than appended.

Three of vLLM 0.33's own rules are options (off: the rules of vLLM's design document above): the null
block (``BlockPool`` keeps block 0 out of use, so ``num_blocks`` blocks give ``num_blocks - 1``);
unhashed blocks (partial ones, or all when caching is off) freed to the *head* of the queue
(``BlockPool.free_blocks``), so a request's last block is the next one handed out; and, at allocation,
a whole sequence that must fit although only its first chunk is allocated
(``scheduler_reserve_full_isl``). A slot may be reserved for a token whose id is not known yet (an
asynchronous scheduler's in-flight sample): its block is hashed only once the id is filled in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvcore.paged.block import FreeKVCacheBlockQueue, KVCacheBlock
from kvcore.paged.events import KVEvent
from kvcore.paged.hashing import hash_block_tokens, hash_full_blocks


@dataclass(slots=True)
class RequestBlocks:
    """What the manager keeps per request: its block table, token ids and the hashes of its full blocks."""

    blocks: list[KVCacheBlock]
    block_ids: list[int]
    token_ids: list[int | None]
    block_hashes: list[int]
    num_cached_tokens: int = 0
    unknown_from: int | None = None  # position of the first slot whose token id is not known yet

    @property
    def num_known(self) -> int:
        """Tokens from the start whose ids are known (all of them unless a slot awaits its sample)."""
        return len(self.token_ids) if self.unknown_from is None else self.unknown_from

    def find_unknown(self, start: int = 0) -> None:
        """Set ``unknown_from`` to the first placeholder at or after ``start`` (None when there is none)."""
        tokens = self.token_ids
        self.unknown_from = next((i for i in range(start, len(tokens)) if tokens[i] is None), None)


class KVCacheManager:
    """Paged KV cache bookkeeping: block tables, ref counts, free block queue, prefix cache.

    num_blocks: physical blocks in the pool. block_size: token slots per block.
    enable_prefix_caching: hash full blocks and reuse them across requests (off: plain paging, no hashing).
    log_events: keep the event log (turn off in long simulations).
    on_copy: called as ``on_copy(src_block_id, dst_block_id)`` on copy-on-write, before the write,
    so a KV store can copy the block's data.
    null_block: keep block 0 out of use, as vLLM's ``BlockPool`` does (``num_blocks`` counts it).
    prepend_unhashed: free blocks without a hash to the head of the queue (vLLM 0.33), not the tail.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, *,
                 log_events: bool = True, on_copy: Callable[[int, int], None] | None = None,
                 null_block: bool = False, prepend_unhashed: bool = False) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1 + null_block:
            raise ValueError(f"num_blocks must be an integer >= {1 + null_block}"
                             f"{' (one is the null block)' if null_block else ''}, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.log_events = log_events
        self.on_copy = on_copy
        self.prepend_unhashed = prepend_unhashed
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free = FreeKVCacheBlockQueue(self.blocks)
        self.null_block = self._free.popleft() if null_block else None  # block 0: never handed out or freed
        self.num_usable_blocks = num_blocks - null_block
        # block hash -> {block_id: block}; several blocks may share a hash (duplicates are kept).
        self._cached: dict[int, dict[int, KVCacheBlock]] = {}
        self._requests: dict[str, RequestBlocks] = {}
        self.events: list[KVEvent] = []
        self.step = 0

    # ----------------------------------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free block queue (including cached blocks that can be evicted)."""
        return self._free.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by at least one request (vLLM's KV cache usage)."""
        return 1.0 - self._free.num_free_blocks / self.num_usable_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that carry a hash (in use or evictable)."""
        return sum(len(entries) for entries in self._cached.values())

    def request_ids(self) -> list[str]:
        """Live requests, in the order they were allocated or forked."""
        return list(self._requests)

    def has_request(self, request_id: str) -> bool:
        """True while the request holds a block table (allocated or forked, not yet freed)."""
        return request_id in self._requests

    def block_table(self, request_id: str) -> list[int]:
        """The request's block table: logical block i -> physical block id."""
        return self._request(request_id).block_ids.copy()

    def block_ids(self, request_id: str) -> Sequence[int]:
        """The request's live block table, not copied (an engine step reads it; nobody may change it)."""
        return self._request(request_id).block_ids

    def num_tokens(self, request_id: str) -> int:
        """Tokens the request holds in its blocks (prompt + appended); all of them are computed."""
        return len(self._request(request_id).token_ids)

    def token_ids(self, request_id: str) -> list[int | None]:
        """A copy of the request's token ids (the manager keeps them to hash blocks as they fill); None marks
        a slot whose token is not known yet."""
        return self._request(request_id).token_ids.copy()

    def num_cached_tokens(self, request_id: str) -> int:
        """Prompt tokens served from the prefix cache when the request was allocated."""
        return self._request(request_id).num_cached_tokens

    def ref_cnt(self, block_id: int) -> int:
        """Number of block tables holding the block (0: it is in the free block queue)."""
        return self.block(block_id).ref_cnt

    def block(self, block_id: int) -> KVCacheBlock:
        """The block object (read it, do not change it)."""
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id must be in 0..{self.num_blocks - 1}, got {block_id}")
        return self.blocks[block_id]

    def block_owners(self) -> dict[int, list[str]]:
        """Block id -> the live requests whose tables hold it (in the order they were allocated or forked)."""
        owners: dict[int, list[str]] = {}
        for request_id, req in self._requests.items():
            for block in req.blocks:
                if block is not self.null_block:
                    owners.setdefault(block.block_id, []).append(request_id)
        return owners

    def free_block_queue(self) -> list[int]:
        """Free block ids from head (reused first) to tail."""
        return self._free.block_ids()

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Cached blocks a prompt would hit now and the tokens they hold; changes nothing."""
        hits = self._find_cache_hits(token_ids)
        return [b.block_id for b in hits], len(hits) * self.block_size

    def can_allocate(self, num_tokens: int) -> bool:
        """True if a prompt of ``num_tokens`` fits even with no prefix hit (a hit only needs fewer)."""
        return -(-num_tokens // self.block_size) <= self._free.num_free_blocks

    def can_append(self, request_id: str, num_new_tokens: int = 1) -> bool:
        """True if ``append`` of ``num_new_tokens`` would succeed (new blocks plus any copy-on-write)."""
        return self._blocks_to_append(self._request(request_id), num_new_tokens) <= self._free.num_free_blocks

    # --------------------------------------------------------------------------------------- mutations
    def allocate(self, request_id: str, token_ids: Sequence[int], *, fit_tokens: int | None = None
                 ) -> list[int] | None:
        """Allocate a new request's prompt: hit cached prefix blocks, pop new ones, cache full ones.

        fit_tokens: allocate only ``token_ids`` (a first chunk) but only if a sequence of this many tokens
        would fit too (vLLM's ``scheduler_reserve_full_isl``). Returns the block table, or None (and nothing
        changes) when there are not enough free blocks.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already allocated; free it first or use a new id")
        if len(token_ids) == 0:
            raise ValueError("a prompt needs at least one token")
        tokens = list(token_ids)
        hashes = hash_full_blocks(tokens, self.block_size) if self.enable_prefix_caching else []
        hits = self._find_cache_hits(tokens, hashes)
        num_new = -(-len(tokens) // self.block_size) - len(hits)
        # A hit on a free (evictable) block takes that block out of the queue, so it counts as used.
        num_evictable_hits = sum(1 for b in hits if b.ref_cnt == 0)
        num_fit = max(num_new, -(-(fit_tokens or 0) // self.block_size) - len(hits))
        if num_fit + num_evictable_hits > self._free.num_free_blocks:
            return None
        self.step += 1
        for block in hits:
            self._touch(block, request_id)
        blocks = hits + [self._pop_free(request_id) for _ in range(num_new)]
        req = RequestBlocks(blocks, [b.block_id for b in blocks], tokens, hashes, len(hits) * self.block_size)
        self._requests[request_id] = req
        for i in range(len(hits), len(hashes)):
            self._cache_block(blocks[i], hashes[i], request_id)
        return req.block_ids.copy()

    def append(self, request_id: str, token_ids: Sequence[int | None]) -> list[int] | None:
        """Add generated tokens to a request: copy-on-write if needed, pop blocks, cache blocks that fill.

        O(1) amortized per token: only blocks that become full are hashed, from the last hash. A ``None``
        reserves the slot of a token not sampled yet; blocks from its own on are hashed once
        :meth:`fill` gives the id and :meth:`cache_blocks` (or a later append) asks for it.
        Returns the block table, or None (and nothing changes) when there are not enough free blocks.
        """
        req = self._request(request_id)
        num_new = len(token_ids)
        if num_new == 0:
            return req.block_ids.copy()
        blocks = req.blocks
        num_tokens = len(req.token_ids)
        needs_copy = bool(num_tokens % self.block_size) and blocks[-1].ref_cnt > 1
        num_new_blocks = -(-(num_tokens + num_new) // self.block_size) - len(blocks)
        if num_new_blocks + needs_copy > self._free.num_free_blocks:
            return None
        self.step += 1
        if needs_copy:
            self._copy_on_write(req, request_id)
        for _ in range(num_new_blocks):
            block = self._pop_free(request_id)
            blocks.append(block)
            req.block_ids.append(block.block_id)
        if req.unknown_from is None and None in token_ids:
            req.unknown_from = num_tokens + list(token_ids).index(None)
        req.token_ids.extend(token_ids)
        if self.enable_prefix_caching:
            self._cache_new_full_blocks(req, request_id, req.num_known)
        return req.block_ids.copy()

    def fill(self, request_id: str, position: int, token_ids: Sequence[int]) -> None:
        """Give the ids of reserved slots from ``position`` on (no hashing: see :meth:`cache_blocks`)."""
        req = self._request(request_id)
        if not 0 <= position <= len(req.token_ids) - len(token_ids):
            raise ValueError(f"request {request_id!r} holds {len(req.token_ids)} slots; cannot fill "
                             f"{len(token_ids)} from position {position}")
        req.token_ids[position:position + len(token_ids)] = token_ids
        if req.unknown_from is not None:
            req.find_unknown(req.unknown_from)

    def cache_blocks(self, request_id: str, num_tokens: int) -> None:
        """Hash the request's full blocks within its first ``num_tokens`` known tokens (vLLM ``cache_blocks``)."""
        req = self._request(request_id)
        if self.enable_prefix_caching:
            self._cache_new_full_blocks(req, request_id, min(num_tokens, req.num_known))

    def fork(self, parent_id: str, child_id: str) -> None:
        """Share every block of ``parent_id`` with a new request ``child_id`` (ref_cnt + 1 each).

        For parallel sampling and beam search (vLLM v0). The child starts with the parent's tokens and
        num_cached_tokens.
        """
        parent = self._request(parent_id)
        if child_id in self._requests:
            raise ValueError(f"request {child_id!r} already exists; fork into a new id")
        self.step += 1
        for block in parent.blocks:
            block.ref_cnt += 1
            if self.log_events:
                self.events.append(KVEvent(self.step, "fork", child_id, block.block_id, block.block_hash,
                                           f"from {parent_id}, ref_cnt={block.ref_cnt}"))
        self._requests[child_id] = RequestBlocks(
            list(parent.blocks), parent.block_ids.copy(), parent.token_ids.copy(), parent.block_hashes.copy(),
            parent.num_cached_tokens, parent.unknown_from)

    def free(self, request_id: str) -> None:
        """Drop a finished request: ref_cnt - 1 on each block; blocks reaching 0 go to the queue tail
        in reverse table order (they stay cached until evicted); with ``prepend_unhashed`` the ones without
        a hash go to the head instead, in that same order."""
        req = self._request(request_id)
        del self._requests[request_id]
        self.step += 1
        to_head = []
        for block in reversed(req.blocks):
            if block is self.null_block:
                continue  # a slot a sliding window gave back (vLLM keeps the null block out of every count)
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if self.prepend_unhashed and block.block_hash is None:
                    to_head.append(block)
                else:
                    self._free.append(block)
            if self.log_events:
                where = "to free queue" if block.ref_cnt == 0 else f"still held, ref_cnt={block.ref_cnt}"
                self.events.append(KVEvent(self.step, "free", request_id, block.block_id, block.block_hash, where))
        self._free.prepend(to_head)

    def free_blocks_before(self, request_id: str, num_tokens: int) -> int:
        """Give back the blocks wholly before position ``num_tokens`` (a sliding window no longer reads them):
        each table entry becomes the null block and the block loses a reference (vLLM's
        ``SlidingWindowManager.remove_skipped_blocks``). Needs the null block; returns the blocks released."""
        if self.null_block is None:
            raise ValueError("releasing blocks outside a sliding window needs the null block (null_block=True)")
        req = self._request(request_id)
        released = []
        for i in range(min(num_tokens // self.block_size, len(req.blocks))):
            block = req.blocks[i]
            if block is not self.null_block:
                released.append(block)
                req.blocks[i], req.block_ids[i] = self.null_block, self.null_block.block_id
        self.step += bool(released)
        for block in released:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if self.prepend_unhashed and block.block_hash is None:
                    self._free.prepend([block])
                else:
                    self._free.append(block)
            if self.log_events:
                self.events.append(KVEvent(self.step, "free", request_id, block.block_id, block.block_hash,
                                           "outside the sliding window"))
        return len(released)

    # ---------------------------------------------------------------------------------------- internals
    def _request(self, request_id: str) -> RequestBlocks:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}; live requests: {list(self._requests)}") from None

    def _blocks_to_append(self, req: RequestBlocks, num_new: int) -> int:
        if num_new <= 0:
            return 0
        num_tokens = len(req.token_ids)
        needs_copy = bool(num_tokens % self.block_size) and req.blocks[-1].ref_cnt > 1
        return -(-(num_tokens + num_new) // self.block_size) - len(req.blocks) + needs_copy

    def _find_cache_hits(self, token_ids: Sequence[int], hashes: list[int] | None = None) -> list[KVCacheBlock]:
        """Longest run of cached full blocks from the start, leaving at least the last token to compute."""
        if not self.enable_prefix_caching or len(token_ids) == 0:
            return []
        if hashes is None:
            hashes = hash_full_blocks(token_ids, self.block_size)
        max_hit_blocks = (len(token_ids) - 1) // self.block_size
        hits = []
        for block_hash in hashes[:max_hit_blocks]:
            entries = self._cached.get(block_hash)
            if not entries:
                break
            hits.append(next(iter(entries.values())))  # the first cached copy, as vLLM
        return hits

    def _touch(self, block: KVCacheBlock, request_id: str) -> None:
        if block.ref_cnt == 0:
            self._free.remove(block)
        block.ref_cnt += 1
        if self.log_events:
            self.events.append(KVEvent(self.step, "hit", request_id, block.block_id, block.block_hash,
                                       f"ref_cnt={block.ref_cnt}"))

    def _pop_free(self, request_id: str) -> KVCacheBlock:
        block = self._free.popleft()
        if block.block_hash is not None:
            self._evict(block, request_id)
        block.ref_cnt = 1
        if self.log_events:
            self.events.append(KVEvent(self.step, "allocate", request_id, block.block_id))
        return block

    def _evict(self, block: KVCacheBlock, request_id: str) -> None:
        entries = self._cached[block.block_hash]
        del entries[block.block_id]
        if not entries:
            del self._cached[block.block_hash]
        if self.log_events:
            self.events.append(KVEvent(self.step, "evict", request_id, block.block_id, block.block_hash,
                                       "LRU head was cached"))
        block.block_hash = None

    def _cache_block(self, block: KVCacheBlock, block_hash: int, request_id: str) -> None:
        if block.block_hash is not None:
            raise RuntimeError(f"block {block.block_id} is already cached; a full block is never rewritten")
        block.block_hash = block_hash
        entries = self._cached.get(block_hash)
        if entries is None:
            self._cached[block_hash] = {block.block_id: block}
        else:
            entries[block.block_id] = block  # a duplicate of an existing cached block, kept as in v1
        if self.log_events:
            self.events.append(KVEvent(self.step, "cache", request_id, block.block_id, block_hash,
                                       "duplicate" if entries else "full"))

    def _cache_new_full_blocks(self, req: RequestBlocks, request_id: str, num_tokens: int) -> None:
        """Hash and cache the full blocks within the first ``num_tokens`` tokens not hashed yet."""
        bs = self.block_size
        hashes = req.block_hashes
        num_full = num_tokens // bs
        while len(hashes) < num_full:
            i = len(hashes)
            block_hash = hash_block_tokens(hashes[-1] if i else None, req.token_ids[i * bs:(i + 1) * bs])
            hashes.append(block_hash)
            self._cache_block(req.blocks[i], block_hash, request_id)

    def _copy_on_write(self, req: RequestBlocks, request_id: str) -> None:
        shared = req.blocks[-1]
        copy = self._pop_free(request_id)
        shared.ref_cnt -= 1  # still >= 1: another request holds it
        req.blocks[-1] = copy
        req.block_ids[-1] = copy.block_id
        if self.log_events:
            self.events.append(KVEvent(self.step, "copy_on_write", request_id, copy.block_id, None,
                                       f"{shared.block_id} -> {copy.block_id}, shared ref_cnt={shared.ref_cnt}"))
        if self.on_copy is not None:
            self.on_copy(shared.block_id, copy.block_id)
