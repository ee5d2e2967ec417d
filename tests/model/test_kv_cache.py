"""model/kv_cache.py's row operations (the server's rows join, leave and are packed) on hand-made
slot values: each slot holds 100 * row + slot, so where a value lands shows where it came from.
The cache against the model's own logits is in test_model.py; through the engine in
tests/serve/test_serve_engine.py."""

import torch

from minilora.model.config import ModelConfig
from minilora.model.kv_cache import KVCache

CONFIG = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)  # head_dim 8


def filled_cache(rows: int, slots: int) -> KVCache:
    """A cache whose slot t of row r holds 100 * r + t in every layer's keys, minus that in its
    values (written through update, as the model writes them)."""
    cache = KVCache(CONFIG, rows, slots)
    for t in range(slots):
        k = (100 * torch.arange(rows, dtype=torch.float32) + t).view(rows, 1, 1, 1)
        for layer in range(CONFIG.num_hidden_layers):
            cache.update(layer, t, k.expand(rows, 2, 1, 8), -k.expand(rows, 2, 1, 8))
    cache.length = slots
    return cache


def slot_values(cache: KVCache, row: int, slots: int) -> list[float]:
    """Row `row`'s first `slots` slots, checked equal in every layer, head and element."""
    keys = cache.keys[0][row, :, :slots]  # (KV, slots, D)
    for layer in range(CONFIG.num_hidden_layers):
        assert torch.equal(cache.keys[layer][row, :, :slots], keys)
        assert torch.equal(cache.values[layer][row, :, :slots], -keys)
    assert torch.equal(keys, keys[:1, :, :1].expand_as(keys))
    return keys[0, :, 0].tolist()


def test_make_room_packs_each_rows_own_slots_to_the_front_and_grows():
    cache = filled_cache(3, 4)
    cache.owned[0, [0, 2]] = True
    cache.owned[1, [1, 2, 3]] = True
    cache.owned[2, 3] = True
    cache.make_room(3)  # 4 + 1 slots do not fit: pack to 3 filled, then 3 + 1 > 3/4 of 4: grow
    assert cache.length == 3 and cache.capacity == 8
    assert slot_values(cache, 0, 2) == [0, 2]
    assert slot_values(cache, 1, 3) == [101, 102, 103]
    assert slot_values(cache, 2, 1) == [203]
    assert cache.owned.tolist() == [[True] * n + [False] * (8 - n) for n in (2, 3, 1)]


def test_make_room_does_nothing_while_the_slots_fit():
    cache = filled_cache(2, 4)
    cache.length = 3
    cache.make_room(2)
    assert cache.capacity == 4 and cache.length == 3 and not cache.owned.any()


def test_move_and_place_copy_a_rows_slots_and_owned_slots():
    cache = filled_cache(3, 4)
    cache.owned[2, [1, 3]] = True
    cache.move(2, 0)
    assert slot_values(cache, 0, 4) == [200, 201, 202, 203]
    assert cache.owned[0].tolist() == [False, True, False, True]
    prefill = filled_cache(2, 6)  # longer than the cache: it grows to take the row
    cache.place(1, prefill, 1, torch.tensor([False, False, True, True, True, True]))
    assert cache.capacity == 8 and cache.length == 6
    assert slot_values(cache, 1, 6) == [100, 101, 102, 103, 104, 105]
    assert cache.owned[1].tolist() == [False, False] + [True] * 4 + [False, False]
    assert slot_values(cache, 0, 4) == [200, 201, 202, 203]  # the other rows are kept


def test_update_writes_only_the_first_rows_and_grows_keeping_the_filled_slots():
    cache = filled_cache(3, 4)
    cache.length = 2
    k = torch.full((2, 2, 2, 8), 7.0)  # 2 of 3 rows, at slots 2 and 3
    keys, values = cache.update(0, 2, k, -k)
    assert keys.shape == values.shape == (2, 2, 4, 8)
    assert keys[:, :, 2:].eq(7).all() and values[:, :, 2:].eq(-7).all()
    assert cache.keys[0][2, :, :, 0].tolist() == [[200, 201, 202, 203]] * 2  # not written
    cache.owned[:, :2] = True
    cache.length = 4
    keys, _ = cache.update(1, 4, torch.ones(3, 2, 3, 8), torch.ones(3, 2, 3, 8))  # past 4 slots
    assert cache.capacity == 8 and keys.shape == (3, 2, 7, 8)  # twice as many: more than needed
    assert slot_values(cache, 2, 4) == [200, 201, 202, 203]
    assert cache.owned[:, :2].all() and not cache.owned[:, 2:].any()


def nan_cache(rows: int, slots: int) -> KVCache:
    """A cache whose memory holds NaN everywhere, as fresh memory may."""
    cache = KVCache(CONFIG, rows, slots)
    for buffer in cache.keys + cache.values:
        buffer.fill_(float("nan"))
    return cache


def test_a_taken_rows_slots_are_finite_whatever_memory_held():
    # attention reads the slots a row does not own too (masked): a NaN there would be its answer
    cache = nan_cache(4, 8)
    k = torch.ones(2, 2, 2, 8)
    for layer in range(CONFIG.num_hidden_layers):
        cache.update(layer, 0, k, -k)  # two running rows, two slots
    cache.length = 2
    cache.place(2, filled_cache(1, 5), 0, torch.tensor([False, True, True, True, True]))
    assert cache.length == 5
    assert slot_values(cache, 2, 5) == [0, 1, 2, 3, 4]
    for buffer in cache.keys + cache.values:
        assert buffer[:3, :, :5].isfinite().all()  # the taken rows; their new slots are zeros
        assert buffer[:2, :, 2:5].eq(0).all()
    cache.place(3, filled_cache(1, 1), 0, torch.tensor([True]))  # row 3: NaN at slots 0, 1
    assert slot_values(cache, 3, 5) == [0] * 5  # the row's slots past the copy are zeros
    cache.clear(0)
    assert slot_values(cache, 0, 5) == [0] * 5 and not cache.owned[0].any()
    assert cache.keys[0][0, :, 5:].isnan().all()  # past the timeline: untouched
