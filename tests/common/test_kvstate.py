import pytest
import torch

from common.kvstate import (
    KVState,
    greedy_decode,
    prefill,
    prefill_on_top,
    reference_generate,
)

PROMPT = [int(x) for x in torch.randint(100, 40000, (50,), generator=torch.Generator().manual_seed(1))]


def test_cache_round_trip_reproduces_generate(tiny_llama, tiny_gemma3):
    for loaded in (tiny_llama, tiny_gemma3):  # tiny-gemma3 has sliding window 16 < 49 cached tokens
        kv = prefill(loaded.model, PROMPT[:-1])
        tokens = greedy_decode(loaded.model, kv.to_cache(loaded.config), PROMPT[-1:], kv.seq_len, 12)
        assert tokens == reference_generate(loaded.model, PROMPT, 12)


def test_sliding_layers_keep_only_their_window(tiny_gemma3):
    kv = prefill(tiny_gemma3.model, PROMPT)
    kept = [kv.kept_tokens(i) for i in range(kv.num_layers)]
    assert kept == [15, 15, 50, 15]
    assert kv.positions[0][0].tolist() == list(range(35, 50))


def select_every_other(kv: KVState) -> KVState:
    keep = torch.arange(0, kv.seq_len, 2)
    return KVState(
        keys=[k[:, :, keep] for k in kv.keys], values=[v[:, :, keep] for v in kv.values],
        positions=[p[:, keep] for p in kv.positions], seq_len=kv.seq_len,
    )


def test_positions_matter_after_selection(tiny_llama, smollm2):
    """Decoding a selected cache from compacted positions gives other tokens than from the original ones."""
    for loaded in (tiny_llama, smollm2):
        kv = select_every_other(prefill(loaded.model, PROMPT[:-1]))
        kept = kv.kept_tokens(0)
        original = greedy_decode(loaded.model, kv.to_cache(loaded.config), PROMPT[-1:], kv.seq_len, 10)
        compacted = greedy_decode(loaded.model, kv.to_cache(loaded.config), PROMPT[-1:], kept, 10)
        assert original != compacted, loaded.name


def test_token_ranges_extend_back_to_the_whole_state(tiny_llama):
    kv = prefill(tiny_llama.model, list(range(300, 340)))
    parts = [kv.token_range(a, b) for a, b in ((0, 7), (7, 30), (30, 40))]
    whole = parts[0].extend(parts[1]).extend(parts[2])
    assert whole.seq_len == 40 and [p.seq_len for p in parts] == [7, 30, 40]
    for a, b in zip(kv.keys + kv.values + kv.positions, whole.keys + whole.values + whole.positions):
        assert torch.equal(a, b)


def test_before_keeps_the_tokens_ahead_of_a_position_in_their_order(tiny_llama):
    kv = prefill(tiny_llama.model, list(range(300, 340)))
    # Heads keep different positions, not in position order, and every head keeps the last 10.
    order = torch.stack([torch.arange(12).flip(0) if h == 0 else torch.arange(18, 30) for h in range(kv.keys[0].shape[1])])
    index = torch.cat([order, torch.arange(30, 40).expand(order.shape[0], -1)], dim=1)
    picked = KVState([k[:, torch.arange(k.shape[1]).unsqueeze(1), index] for k in kv.keys],
                     [v[:, torch.arange(v.shape[1]).unsqueeze(1), index] for v in kv.values],
                     [p.gather(1, index) for p in kv.positions], 40)
    ahead = picked.before(30)
    assert ahead.seq_len == 30 and torch.equal(ahead.positions[0], order)
    assert torch.equal(ahead.keys[1], picked.keys[1][:, :, :12]) and torch.equal(ahead.values[1], picked.values[1][:, :, :12])
    with pytest.raises(ValueError, match="different numbers"):
        picked.before(15)


@pytest.mark.parametrize("split", [1, 17, 39])
def test_prefill_on_top_matches_one_prefill(tiny_llama, split):
    ids = list(range(300, 340))
    kv = prefill(tiny_llama.model, ids)
    on_top = prefill_on_top(tiny_llama.model, kv.token_range(0, split), ids[split:])
    assert on_top.seq_len == 40 and torch.equal(on_top.positions[0], kv.positions[0])
    for a, b in zip(kv.keys + kv.values, on_top.keys + on_top.values):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_prefill_on_top_refuses_sliding_layers(tiny_gemma3):
    kv = prefill(tiny_gemma3.model, list(range(300, 340)))
    with pytest.raises(ValueError, match="sliding-window"):
        prefill_on_top(tiny_gemma3.model, kv, [5, 6])
