"""Each selector's scores against a brute-force reference from full eager attention."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from common.kvstate import greedy_decode, prefill
from common.models import load_model
from common.select import METHODS, Selection, SelectionError, apply_selection
from common.select.base import ScoreInput
from common.select.stats import AttentionStats, collecting

IDS = [int(x) for x in torch.randint(100, 40000, (48,), generator=torch.Generator().manual_seed(3))]
CONTEXT = 36  # tokens [36, 48) play the question


class EagerMaps(list):
    """Attention maps per layer; `.queries[layer]`: the post-RoPE queries (q_heads, T, d), float64."""

    queries: list


def eager_attentions(loaded, ids):
    """Full (1, q_heads, T, T) attention maps per layer, the brute-force way, and the post-RoPE
    queries rebuilt from q_proj outputs and the model's rotary embedding."""
    model = loaded.model
    projected = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda _m, _i, out, index=index: projected.__setitem__(index, out.detach()))
        for index, layer in enumerate(model.model.layers)]
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("kvwire")
        for hook in hooks:
            hook.remove()
    maps = EagerMaps(a[0].double() for a in out.attentions)
    d = loaded.config.head_dim
    cos, sin = model.model.rotary_emb(torch.zeros(1, len(ids), d), torch.arange(len(ids)).unsqueeze(0))
    maps.queries = []
    for index in range(len(maps)):
        q = projected[index].view(1, len(ids), -1, d).transpose(1, 2)
        maps.queries.append(apply_rotary_pos_emb(q, q, cos, sin)[0][0].double())
    return maps


def grouped(attn: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(q_heads, rows, T) summed over rows, then over the query heads of each KV head."""
    q_heads = attn.shape[0]
    return attn.sum(dim=1).view(kv_heads, q_heads // kv_heads, -1).sum(dim=1)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-llama-mha"], ids=["gqa", "mha"])
def setup(request):
    loaded = load_model(request.param)
    rows = {"question": range(CONTEXT, len(IDS)), "window8": range(len(IDS) - 8, len(IDS)), "all": range(len(IDS)),
            "mean_query_context_s4": range(4, CONTEXT), "mean_query_question": range(CONTEXT, len(IDS))}
    stats = AttentionStats(rows)
    with collecting(stats):
        kv = prefill(loaded.model, IDS)
    return loaded, kv, stats, eager_attentions(loaded, IDS)


def test_attention_mass_matches_eager(setup):
    _, kv, stats, attentions = setup
    kv_heads = kv.keys[0].shape[1]
    for layer, attn in enumerate(attentions):
        for name, rows in stats.row_sets.items():
            if name.startswith("mean_query"):
                continue  # mean queries, not attention mass: tests/common/select/test_capkv.py
            expected = grouped(attn[:, rows.start:rows.stop], kv_heads)
            assert torch.allclose(stats.layer(name, layer).double(), expected, atol=1e-4), (name, layer)


def scores(selection: Selection, kv, stats, layer, budget=10):
    return selection.selector().score(ScoreInput(kv, stats, CONTEXT, budget), layer)


def test_q2c_and_snapkv_and_h2o_scores(setup):
    _, kv, stats, attentions = setup
    kv_heads = kv.keys[0].shape[1]
    for layer, attn in enumerate(attentions):
        q2c = grouped(attn[:, CONTEXT:], kv_heads)[:, :CONTEXT]
        assert torch.allclose(scores(Selection("q2c", 0.5), kv, stats, layer).double(), q2c, atol=1e-4)
        window = grouped(attn[:, -8:], kv_heads)[:, :CONTEXT]
        pooled = torch.stack([torch.stack([window[h, max(0, i - 3): i + 4].max() for i in range(CONTEXT)])
                              for h in range(kv_heads)])
        snap = scores(Selection("snapkv", 0.5, options=(("w", "8"),)), kv, stats, layer).double()
        assert torch.allclose(snap, pooled, atol=1e-4)  # the window lies after the context: nothing forced
        heavy = grouped(attn, kv_heads)[:, :CONTEXT].clone()
        heavy[:, CONTEXT - 5:] = float("inf")  # budget 10, half of it recent
        assert torch.allclose(scores(Selection("h2o", 0.5), kv, stats, layer).double(), heavy, atol=1e-4)


def kept(selection, kv, stats, sliding=frozenset()):
    return apply_selection(kv, selection, stats, CONTEXT, sliding)


def test_positional_methods_keep_what_they_say(setup):
    _, kv, stats, _ = setup
    tail = list(range(CONTEXT, len(IDS)))
    assert kept(Selection("window", 10), kv, stats).positions[0][0].tolist() == list(range(26, 36)) + tail
    assert kept(Selection("sink", 10), kv, stats).positions[1][0].tolist() == [0, 1, 2, 3] + list(range(30, 36)) + tail
    a = kept(Selection("random", 10, options=(("seed", "1"),)), kv, stats)
    b = kept(Selection("random", 10, options=(("seed", "1"),)), kv, stats)
    c = kept(Selection("random", 10, options=(("seed", "2"),)), kv, stats)
    assert torch.equal(a.positions[0], b.positions[0]) and not torch.equal(a.positions[0], c.positions[0])


def test_granularities(setup):
    _, kv, stats, _ = setup
    heads = kv.keys[0].shape[1]
    glob = kept(Selection("knorm", 10, "global"), kv, stats)
    assert all(torch.equal(p, glob.positions[0]) for p in glob.positions)  # same tokens everywhere
    per_head = kept(Selection("knorm", 10, "head"), kv, stats)
    assert per_head.positions[0].shape == (heads, 10 + len(IDS) - CONTEXT)
    assert any(not torch.equal(per_head.positions[0][0], per_head.positions[0][h]) for h in range(1, heads))
    # Kept keys are exactly the original keys at the kept positions.
    for layer in range(kv.num_layers):
        index = per_head.positions[layer]
        expected = torch.stack([kv.keys[layer][0, h, index[h]] for h in range(heads)]).unsqueeze(0)
        assert torch.equal(per_head.keys[layer], expected)


def test_q2c_last_uses_only_the_last_layer(setup):
    _, kv, stats, attentions = setup
    last = grouped(attentions[-1][:, CONTEXT:], kv.keys[0].shape[1])[:, :CONTEXT].sum(0)
    expected = last.topk(10).indices.sort().values.tolist()
    assert kept(Selection("q2c-last", 10), kv, stats).positions[0][0, :10].tolist() == expected


def brute_force_scores(method: str, attentions, kv, layer: int, budget: int) -> torch.Tensor:
    """(kv_heads, CONTEXT) scores computed the slow way: from full eager attention maps, explicit
    matrices, or positions. Higher is kept first."""
    heads = kv.keys[layer].shape[1]
    attn = attentions[layer]
    positions = torch.arange(CONTEXT, dtype=torch.float64).expand(heads, -1).clone()
    if method in ("q2c", "q2c-last"):
        return grouped(attn[:, CONTEXT:], heads)[:, :CONTEXT]
    if method == "snapkv":  # window of the last 8 queries, max-pooled over 7 neighbours
        window = grouped(attn[:, -8:], heads)[:, :CONTEXT]
        return torch.stack([torch.stack([window[h, max(0, i - 3): i + 4].max() for i in range(CONTEXT)])
                            for h in range(heads)])
    if method == "h2o":  # accumulated attention, and the most recent half of the budget
        heavy = grouped(attn, heads)[:, :CONTEXT].clone()
        heavy[:, CONTEXT - budget // 2:] = float("inf")
        return heavy
    keys = kv.keys[layer][0, :, :CONTEXT].double()
    if method == "knorm":  # the lowest key norms
        return -torch.tensor([[sum(float(x) ** 2 for x in keys[h, t]) ** 0.5 for t in range(CONTEXT)]
                              for h in range(heads)], dtype=torch.float64)
    if method in ("capkv", "capkv-q"):
        # Per query head: anchor mu = mean query (context after the 4 sinks, or the question);
        # w_i = exp(5 cos(k_i, mu) - max); s_i = w_i v_i^T (I + sum_j w_j v_j v_j^T)^-1 v_i over the
        # non-sink context; averaged over the query heads of each KV head; the sinks are forced.
        rows = range(4, CONTEXT) if method == "capkv" else range(CONTEXT, len(IDS))
        queries, values = attentions.queries[layer], kv.values[layer][0, :, :CONTEXT].double()
        group = queries.shape[0] // heads
        result = torch.full((heads, CONTEXT), float("inf"), dtype=torch.float64)
        for h in range(heads):
            total = torch.zeros(CONTEXT - 4, dtype=torch.float64)
            for g in range(group):
                mu = queries[h * group + g, rows.start:rows.stop].mean(dim=0)
                logits = [5 * float(keys[h, i] @ mu / (keys[h, i].norm() * mu.norm())) for i in range(4, CONTEXT)]
                w = torch.tensor([math.exp(x - max(logits)) for x in logits], dtype=torch.float64)
                v = values[h, 4:]
                inverse = torch.linalg.inv(torch.eye(v.shape[1], dtype=torch.float64) + (v.T * w) @ v)
                total += w * torch.stack([vi @ inverse @ vi for vi in v])
            result[h, 4:] = total / group
        return result
    if method == "capkv-leverage":  # diagonal of the ridge hat matrix K (K^T K + lambda I)^-1 K^T
        leverage = []
        for head in keys:
            gram = head.T @ head
            ridge = 1e-3 * gram.diagonal().mean()
            hat = head @ torch.linalg.inv(gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64)) @ head.T
            leverage.append(hat.diagonal())
        return torch.stack(leverage)
    if method == "sink":  # the first 4 tokens, then the most recent
        positions[:, :4] = float("inf")
        return positions
    if method == "window":
        return positions
    raise KeyError(method)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "random"])
def test_each_selector_keeps_the_brute_force_top_k_of_its_score(setup, method):
    """At keep < 1, the kept context tokens are a top-k of the method's score computed the slow way,
    aggregated at the method's granularity (summed over heads per layer, or over layers too when global)."""
    _, kv, stats, attentions = setup
    k = 10
    options = (("w", "8"),) if method == "snapkv" else ()  # the window the fixture captured
    selection = Selection(method, k, options=options)
    kept_kv = kept(selection, kv, stats)
    reference = [brute_force_scores(method, attentions, kv, layer, k) for layer in range(kv.num_layers)]
    granularity = selection.resolved_granularity
    if granularity == "global":
        summed = reference[-1:] if METHODS[method].global_layers == "last" else reference
        total = sum(r.sum(dim=0) for r in summed)
        reference = [total.expand_as(r) for r in reference]
    for layer, scores in enumerate(reference):
        if granularity != "head":
            scores = scores.sum(dim=0, keepdim=True).expand_as(scores)
        for head, row in enumerate(scores):
            chosen = kept_kv.positions[layer][head, :k]
            assert chosen.unique().numel() == k and int(chosen.max()) < CONTEXT
            # Every kept token scores at least the k-th best (ties within float noise may go either way).
            kth = row.topk(k).values[-1]
            assert bool((row[chosen] >= kth - 1e-4 * (1 + kth.abs())).all()), (method, layer, head)


def test_random_keeps_distinct_seeded_uniform_draws(setup):
    _, kv, stats, _ = setup
    counts = torch.zeros(CONTEXT)
    for seed in range(200):
        positions = kept(Selection("random", 10, options=(("seed", str(seed)),)), kv, stats).positions[0][0, :10]
        assert positions.unique().numel() == 10 and int(positions.max()) < CONTEXT
        counts[positions] += 1
    # Every context token is drawn about 200 * 10 / 36 = 56 times.
    assert int(counts.min()) > 25 and int(counts.max()) < 95


def test_the_brute_force_references_cover_every_registered_selector(setup):
    _, kv, _, attentions = setup
    for method in METHODS:
        if method != "random":
            assert brute_force_scores(method, attentions, kv, 0, 10).shape == (kv.keys[0].shape[1], CONTEXT)


def test_missing_statistics_are_a_clear_error(setup):
    _, kv, _, _ = setup
    with pytest.raises(SelectionError, match="attention statistics"):
        apply_selection(kv, Selection("q2c", 0.5), None, CONTEXT)
    with pytest.raises(SelectionError, match="uniform"):
        apply_selection(kv, Selection("knorm", 0.5, "global", "pyramid"), None, CONTEXT)


def test_per_layer_budgets_decode(tiny_llama):
    """Layers with different kept counts decode (the tail goes in one token at a time)."""
    stats = AttentionStats({"all": range(len(IDS) - 1)})
    with collecting(stats):
        kv = prefill(tiny_llama.model, IDS[:-1])
    pyramid = apply_selection(kv, Selection("h2o", 12, "layer", "pyramid"), stats, CONTEXT)
    counts = [pyramid.kept_tokens(i) for i in range(pyramid.num_layers)]
    assert counts[0] > counts[-1] and sum(counts) == 4 * (12 + len(IDS) - 1 - CONTEXT)
    tokens = greedy_decode(tiny_llama.model, pyramid.to_cache(tiny_llama.config), IDS[-1:], kv.seq_len, 6)
    assert len(tokens) == 6
    # With equal counts, the token-by-token path (no mask) and the one-pass path (causal mask) agree.
    uniform = apply_selection(kv, Selection("h2o", 12, "layer"), stats, CONTEXT)
    tail = [5000, 6000, IDS[-1]]
    one_pass = greedy_decode(tiny_llama.model, uniform.to_cache(tiny_llama.config), tail, kv.seq_len, 8,
                             token_by_token=False)
    by_token = greedy_decode(tiny_llama.model, uniform.to_cache(tiny_llama.config), tail, kv.seq_len, 8,
                             token_by_token=True)
    assert one_pass == by_token


def test_gemma_sliding_layers_keep_their_window(tiny_gemma3):
    ids = IDS
    stats = AttentionStats({"question": range(CONTEXT, len(ids))})
    with collecting(stats):
        kv = prefill(tiny_gemma3.model, ids)
    assert set(stats.mass["question"]) == {2}  # only the global layer was observed
    selected = apply_selection(kv, Selection("q2c", 10), stats, CONTEXT, tiny_gemma3.sliding_layers)
    for layer in tiny_gemma3.sliding_layers:
        assert torch.equal(selected.keys[layer], kv.keys[layer])
    assert selected.kept_tokens(2) == 10 + len(ids) - CONTEXT
