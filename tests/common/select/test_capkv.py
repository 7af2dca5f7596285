"""CapKV against a brute-force computation from the model's own projections.

The post-RoPE queries and keys are rebuilt from q_proj / k_proj outputs (forward hooks) and
the model's rotary embedding; the scores s_i = w_i v_i^T A^-1 v_i are then computed in
float64 with explicit loops and an explicit matrix inverse, and compared with the selector's.
"""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from common.kvstate import prefill
from common.models import load_model
from common.profile import parse_profile
from common.select import Selection, SelectionError, apply_selection
from common.select.base import ScoreInput
from common.select.stats import AttentionStats, collecting

IDS = [int(x) for x in torch.randint(100, 40000, (40,), generator=torch.Generator().manual_seed(11))]
CONTEXT = 30  # tokens [30, 40) play the question


def projected(loaded, ids):
    """Per layer, the post-RoPE (queries, keys) as (heads, T, d) float64, from the projections and rotary embedding."""
    model = loaded.model
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(
                lambda _m, _i, out, key=(index, name): outputs.__setitem__(key, out.detach())))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    config = loaded.config
    d = config.head_dim
    positions = torch.arange(len(ids)).unsqueeze(0)
    dummy = torch.zeros(1, len(ids), d)
    cos, sin = model.model.rotary_emb(dummy, positions)
    result = []
    for index in range(config.num_hidden_layers):
        q = outputs[index, "q_proj"].view(1, len(ids), -1, d).transpose(1, 2)
        k = outputs[index, "k_proj"].view(1, len(ids), -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        result.append((q[0].double(), k[0].double()))
    return result


def brute_force(queries, keys, values, rows: range, context: int, sinks: int, tau: float) -> torch.Tensor:
    """(kv_heads, context) CapKV scores by loops: per query head, mean query over `rows`, weights
    exp(tau cos - max), A = I + sum w v v^T inverted explicitly, s = w v^T A^-1 v; mean per KV head."""
    q_heads, kv_heads, d = queries.shape[0], keys.shape[0], keys.shape[-1]
    group = q_heads // kv_heads
    scores = torch.full((kv_heads, context), float("inf"), dtype=torch.float64)
    candidates = range(sinks, context)
    for h in range(kv_heads):
        total = torch.zeros(context, dtype=torch.float64)
        for g in range(group):
            mu = sum(queries[h * group + g, t] for t in rows) / len(rows)
            cosines = [float(keys[h, i] @ mu) / (float(keys[h, i].norm()) * float(mu.norm())) for i in candidates]
            top = max(tau * c for c in cosines)
            weights = {i: math.exp(tau * c - top) for i, c in zip(candidates, cosines)}
            a = torch.eye(d, dtype=torch.float64)
            for j in candidates:
                a += weights[j] * torch.outer(values[h, j], values[h, j])
            inverse = torch.linalg.inv(a)
            for i in candidates:
                total[i] += weights[i] * float(values[h, i] @ inverse @ values[h, i])
        scores[:, sinks:][h] = total[sinks:] / group
    return scores


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-llama-mha"], ids=["gqa", "mha"])
def captured(request):
    loaded = load_model(request.param)
    rows = {"mean_query_context_s4": range(4, CONTEXT), "mean_query_context_s2": range(2, CONTEXT),
            "mean_query_question": range(CONTEXT, len(IDS))}
    stats = AttentionStats(rows)
    with collecting(stats):
        kv = prefill(loaded.model, IDS)
    return loaded, kv, stats, projected(loaded, IDS)


def test_reconstructed_keys_are_the_cache_keys(captured):
    _, kv, _, qk = captured
    for layer, (_, keys) in enumerate(qk):
        assert torch.allclose(keys, kv.keys[layer][0].double(), atol=1e-5)


def test_mean_query_statistic_matches_the_projected_queries(captured):
    _, kv, stats, qk = captured
    kv_heads = kv.keys[0].shape[1]
    for layer, (queries, _) in enumerate(qk):
        for name, rows in stats.row_sets.items():
            expected = queries[:, rows.start:rows.stop].mean(dim=1)
            got = stats.layer(name, layer).double()
            assert got.shape == (kv_heads, queries.shape[0] // kv_heads, queries.shape[-1])
            assert torch.allclose(got.reshape(queries.shape[0], -1), expected, atol=1e-5), (name, layer)


@pytest.mark.parametrize("method,options,rows,sinks,tau", [
    ("capkv", (), range(4, CONTEXT), 4, 5.0),
    ("capkv", (("s", "2"), ("tau", "2.5")), range(2, CONTEXT), 2, 2.5),
    ("capkv-q", (), range(CONTEXT, len(IDS)), 4, 5.0),
])
def test_scores_match_the_brute_force(captured, method, options, rows, sinks, tau):
    _, kv, stats, qk = captured
    selection = Selection(method, 10, options=options)
    assert selection.needs(len(IDS), CONTEXT) == {
        ("mean_query_question" if method == "capkv-q" else f"mean_query_context_s{sinks}"): rows}
    for layer, (queries, keys) in enumerate(qk):
        got = selection.selector().score(ScoreInput(kv, stats, CONTEXT, 10), layer).double()
        values = kv.values[layer][0].double()
        expected = brute_force(queries, keys, values, rows, CONTEXT, sinks, tau)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        assert bool(torch.isinf(got[:, :sinks]).all())
        finite = ~torch.isinf(expected)
        assert torch.allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-7), (method, layer)


def test_selection_keeps_sinks_and_the_top_scores(captured):
    _, kv, stats, _ = captured
    kept = apply_selection(kv, Selection("capkv", 10), stats, CONTEXT)
    for layer in range(kv.num_layers):
        assert bool((kept.positions[layer][:, :4] == torch.arange(4)).all())


def test_capkv_q_needs_the_question_in_the_cache(captured):
    loaded, _, _, _ = captured
    stats = AttentionStats(Selection("capkv-q", 0.5).needs(CONTEXT, CONTEXT))
    with collecting(stats):
        kv = prefill(loaded.model, IDS[:CONTEXT])
    with pytest.raises(SelectionError, match="query-aware"):
        apply_selection(kv, Selection("capkv-q", 0.5), stats, CONTEXT)


def test_grammar():
    profile = parse_profile("capkv:0.5:s2:tau3+fp16")
    selector = profile.selection.selector()
    assert (selector.sinks, selector.tau) == (2, 3.0)
    assert str(profile.selection) == "capkv:0.5:s2:tau3"
    assert parse_profile("capkv-q:0.25").selection.selector().sinks == 4
