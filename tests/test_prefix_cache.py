"""Automatic prefix caching: keys, reference counts, LRU eviction, admission on cached blocks, and the
same outputs with it on and off (fake runner; the real tiny model on CPU in every KV format)."""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner, drain, joined, tiny_tokenizer

from athena_runtime.block_manager import BlockManager
from athena_runtime.engine import EngineCore
from athena_runtime.engine_settings import EngineSettings
from athena_runtime.prefix_cache import PrefixCache
from athena_runtime.sampling_params import SamplingParams
from athena_runtime.sequence import Sequence

VOCAB = 300
EOS = 0
BS = 4


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(temperature=0.0), 0)


def manager(num_blocks: int = 8) -> BlockManager:
    return BlockManager(num_blocks, BS, PrefixCache(BS))


def admit(bm: BlockManager, s: Sequence, computed: int | None = None) -> list[int]:
    """Allocate `s` on its cached prefix, mark `computed` tokens (default: all) computed, cache them."""
    cached = bm.cached_prefix(s)
    assert bm.can_allocate(s.num_tokens, cached)
    bm.allocate(s.block_table, s.num_tokens, cached)
    s.num_computed = before = len(cached) * BS
    s.num_computed = s.num_tokens if computed is None else computed
    bm.cache_computed(s, before)
    return cached


def test_keys_are_a_chain_over_block_tokens():
    cache = PrefixCache(BS)
    a, b = seq(list(range(1, 14))), seq(list(range(1, 7)) + [99] + list(range(8, 14)))
    ka, kb = cache.keys(a, 3), cache.keys(b, 3)
    assert len(set(ka)) == 3 and ka[0] == kb[0] and ka[1] != kb[1] and ka[2] != kb[2]  # differ from block 1 on
    assert cache.keys(a, 2) == ka[:2] and a.block_hashes == ka  # computed once
    assert PrefixCache(BS, root=b"other").keys(seq(list(range(1, 14))), 3)[0] != ka[0]
    assert len(ka[0]) == 16


@pytest.mark.parametrize("n,hit_blocks", [(8, 1), (9, 2), (12, 2), (13, 3)])
def test_the_last_token_is_always_computed(n, hit_blocks):
    """A prompt whose tokens all sit in cached full blocks still computes its last token."""
    bm = manager(16)
    admit(bm, seq(list(range(1, 17)), "first"))  # blocks of tokens 1..16 cached
    s = seq(list(range(1, n + 1)), "second")
    assert len(bm.cached_prefix(s)) == hit_blocks and s.num_tokens - hit_blocks * BS >= 1


def test_shared_blocks_are_counted_once_and_freed_last():
    bm = manager(8)
    a, b = seq(list(range(1, 11)), "a"), seq(list(range(1, 9)) + [50, 51, 52], "b")
    admit(bm, a)  # 3 blocks, the first two full and cached
    assert bm.num_used == 3 and bm.prefix_cache.num_blocks == 2
    assert admit(bm, b) == a.block_table[:2]  # b starts on a's two full blocks
    assert b.num_computed == 11 and bm.num_used == 4 and b.block_table[2] != a.block_table[2]
    assert (bm.prefix_cache.queries, bm.prefix_cache.hits) == (21, 8)
    bm.free(a.block_table)
    assert bm.num_used == 3  # the shared two stay held by b
    bm.free(b.block_table)
    assert bm.num_used == 0 and bm.num_free == 8 and bm.prefix_cache.num_blocks == 2  # kept, evictable
    with pytest.raises(RuntimeError, match="double free"):
        bm.free([0])


def test_free_cached_blocks_are_evicted_last_and_least_recently_used_first():
    bm = manager(6)
    old, new = seq(list(range(1, 10)), "old"), seq(list(range(101, 110)), "new")
    admit(bm, old)  # blocks: 2 cached + 1 partial
    admit(bm, new)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    bm.free(old.block_table)
    bm.free(new.block_table)
    table: list[int] = []
    bm.grow(table, 2 * BS)  # the two partial blocks (nothing cached) first
    assert set(table) == {old_blocks[2], new_blocks[2]} and bm.prefix_cache.num_blocks == 4
    bm.grow(table, 3 * BS)  # then old's deepest block, before its root
    assert table[2] == old_blocks[1] and bm.prefix_cache.num_blocks == 3
    assert bm.cached_prefix(seq(list(range(1, 10)))) == old_blocks[:1]
    assert bm.cached_prefix(seq(list(range(101, 110)))) == new_blocks[:2]


def test_a_block_is_shared_only_once_full_and_computed():
    bm = manager(12)
    a = seq(list(range(1, 15)), "a")  # 14 tokens: blocks 0-2 full, 3 partial
    admit(bm, a, computed=6)  # a prefill chunk of 6: only block 0 complete
    assert bm.prefix_cache.num_blocks == 1
    assert bm.cached_prefix(seq(list(range(1, 15)), "b")) == a.block_table[:1]
    a.num_computed = 14
    bm.cache_computed(a, 6)
    assert bm.prefix_cache.num_blocks == 3  # the partial block 3 never
    assert bm.cached_prefix(seq(list(range(1, 15)), "c")) == a.block_table[:3]


def test_admission_counts_cached_blocks_against_free_ones():
    bm = manager(4)
    a = seq(list(range(1, 13)), "a")  # 3 blocks, 3 cached once computed
    admit(bm, a)
    bm.free(a.block_table)  # all 4 free, 3 of them cached
    b = seq(list(range(1, 13)) + [7, 7, 7, 7], "b")  # 16 tokens: 3 cached blocks + 1 new
    cached = bm.cached_prefix(b)
    assert len(cached) == 3 and bm.can_allocate(16, cached)
    c = seq(list(range(1, 13)) + [7] * 5, "c")  # 17 tokens: 3 cached + 2 new > 4
    assert not bm.can_allocate(17, bm.cached_prefix(c))
    assert not bm.can_allocate(17, [])


# -- the engine on the fake runner -----------------------------------------------------------------


def fake_core(tok, num_blocks: int = 64, **settings) -> EngineCore:
    runner = FakeRunner(vocab_size=VOCAB, num_blocks=num_blocks, block_size=BS, banned=(EOS,))
    return EngineCore(runner, tok, EngineSettings(block_size=BS, **settings), eos_token_ids=(EOS,))


def prompt(n: int, salt: int = 0) -> list[int]:
    return [1 + (7 * i + 13 * salt) % (VOCAB - 2) for i in range(n)]


def test_second_turn_starts_on_the_first_turns_blocks(tok):
    core = fake_core(tok)
    system = prompt(22)
    core.add_request("t1", system, SamplingParams(temperature=0.0, max_tokens=9))
    t1 = joined(drain(core)["t1"])[0]
    turn2 = system + t1 + prompt(5, 3)  # 36 tokens; the first 28 (7 blocks) were computed
    calls = len(core.runner.calls)
    core.add_request("t2", turn2, SamplingParams(temperature=0.0, max_tokens=4))
    got = joined(drain(core)["t2"])
    first = core.runner.calls[calls][0]
    assert (first.start_pos, len(first.token_ids)) == (28, 8)
    stats = core.stats()
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (22 + 36, 28)
    off = fake_core(tok, prefix_cache=False)
    off.add_request("t2", turn2, SamplingParams(temperature=0.0, max_tokens=4))
    assert joined(drain(off)["t2"]) == got
    assert off.stats().prefix_cache_hits_total == off.stats().prefix_cache_queries_total == 0
    assert off.runner.calls[0][0].start_pos == 0


def test_counts_and_log_with_nothing_cached(tok, caplog):
    """An empty cache is still a cache: its counters are reported and the log says it is on."""
    with caplog.at_level("INFO", logger="athena_runtime.engine"):
        core = fake_core(tok)
    assert "prefix cache: on" in caplog.text
    core.add_request("short", prompt(3), SamplingParams(temperature=0.0, max_tokens=1))  # fills no block
    drain(core)
    assert core.block_manager.prefix_cache.num_blocks == 0
    assert (core.stats().prefix_cache_queries_total, core.stats().prefix_cache_hits_total) == (3, 0)


def test_identical_prompts_in_one_batch(tok):
    """Both are admitted before either is computed: no sharing yet, the same output, one copy cached."""
    core = fake_core(tok)
    for rid in ("a", "b"):
        core.add_request(rid, prompt(18, 1), SamplingParams(temperature=0.0, max_tokens=6))
    outs = drain(core)
    assert joined(outs["a"]) == joined(outs["b"])
    assert core.stats().prefix_cache_hits_total == 0 and core.block_manager.prefix_cache.num_blocks == 5


def run_workload(tok, seed: int, **settings) -> tuple[dict, EngineCore]:
    """Requests sharing system prompts, multi-turn continuations and aborts, on a small cache."""
    rng = random.Random(seed)
    core = fake_core(tok, num_blocks=20, max_num_seqs=4, max_num_batched_tokens=16, **settings)
    systems = [prompt(rng.randint(4, 20), 100 + i) for i in range(3)]
    done: dict[str, list] = {}
    history: list[list[int]] = []
    for step in range(260):
        if step < 200 and rng.random() < 0.25:
            if history and rng.random() < 0.4:
                p = rng.choice(history) + prompt(rng.randint(1, 6), step)  # a next turn
            else:
                p = rng.choice(systems) + prompt(rng.randint(1, 12), step)
            params = SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=step, max_tokens=rng.randint(1, 30))
            core.add_request(f"r{step}", p[:60], params)
            history.append(p[:40])
        if step == 150:
            for rid in list(core.scheduler.requests)[:2]:
                done.setdefault(rid, []).append(core.abort(rid))
        for out in core.step():
            done.setdefault(out.request_id, []).append(out)
    for rid, outs in drain(core).items():
        done.setdefault(rid, []).extend(outs)
    assert core.block_manager.num_used == 0
    return {rid: joined(outs) for rid, outs in done.items()}, core


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_are_the_same_with_the_cache_on_and_off(tok, seed):
    on, core = run_workload(tok, seed)
    off, core_off = run_workload(tok, seed, prefix_cache=False)
    cancelled = {rid for rid in on if on[rid][2] == "cancelled"} | {rid for rid in off if off[rid][2] == "cancelled"}
    assert on.keys() == off.keys() and len(cancelled) <= 4
    assert {k: v for k, v in on.items() if k not in cancelled} == {k: v for k, v in off.items() if k not in cancelled}
    stats = core.stats()
    assert stats.prefix_cache_hits_total > 0 and stats.preemptions_total > 0 and core_off.stats().preemptions_total > 0
    assert stats.prefix_cache_hits_total < stats.prefix_cache_queries_total
    bm = core.block_manager
    assert bm.num_free == bm.num_blocks and 0 < bm.prefix_cache.num_blocks <= bm.num_blocks


# -- the real tiny model on CPU --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import make_tiny_model
    from transformers import AutoTokenizer

    folder = make_tiny_model(tmp_path_factory.mktemp("prefix") / "llama", "llama")
    return folder, AutoTokenizer.from_pretrained(folder)


def conversation(core: EngineCore, rng: random.Random) -> dict[str, list]:
    """A shared system prompt, a two-turn chat whose second turn carries the first answer, and two more
    users at once on a cache too small for all of them (preemptions)."""

    def tokens(n):
        return [rng.randrange(3, 384) for _ in range(n)]

    greedy = SamplingParams(temperature=0.0, max_tokens=16, logprobs=2, ignore_eos=True)
    system, question = tokens(18), tokens(7)
    core.add_request("turn1", system + question, greedy)
    outs = drain(core)
    answer = list(joined(outs["turn1"])[0])
    core.add_request("turn2", system + question + answer + tokens(5), greedy)
    core.add_request("user2", system + tokens(9), greedy)
    core.add_request("user3", system + question + tokens(3), greedy)
    outs.update(drain(core))
    assert core.block_manager.num_used == 0
    return outs


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4"])
def test_real_model_gives_the_same_greedy_outputs_with_the_cache_on_and_off(tiny, fmt):
    from athena_runtime.model_runner import ModelRunner

    folder, tokenizer = tiny
    runner = ModelRunner.from_path(folder, kv_format=fmt, kv_group_size=16, block_size=BS, num_blocks=24, device="cpu")
    results = {}
    for on in (True, False):
        core = EngineCore(
            runner,
            tokenizer,
            EngineSettings(block_size=BS, max_num_seqs=3, max_num_batched_tokens=32, prefix_cache=on),
            eos_token_ids=(),
        )
        results[on] = conversation(core, random.Random(0)), core.stats()
    (on, stats_on), (off, stats_off) = results[True], results[False]
    assert stats_on.prefix_cache_hits_total >= 40 + 16 + 24 and stats_off.prefix_cache_hits_total == 0
    assert stats_on.preemptions_total > 0 and stats_off.preemptions_total > 0
    for rid in off:
        assert joined(on[rid]) == joined(off[rid]), rid
        for a, b in zip(on[rid], off[rid]):
            for x, y in zip(a.logprobs, b.logprobs):
                assert [t.token_id for t in x.top] == [t.token_id for t in y.top]
                assert [t.logprob for t in x.top] == pytest.approx([t.logprob for t in y.top], abs=1e-3)
