"""Quality passes: REPAIR of fused models, anchor-free fusion (MergeMany) and the correlation cost."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_unchanged, state_copy

import otfx
from otfx import testing as zoo
from otfx.align.barycentre import anchor_free_fuse
from otfx.align.config import FusionConfig
from otfx.align.costs import correlation  # noqa: F401 - registers cost="correlation"
from otfx.align.repair import repair, repair_units, unit_statistics
from otfx.align.rewrite import aligned_params
from otfx.api import analyse
from otfx.fuse import compute_maps
from otfx.trace import main_output


def outputs(model, inputs):
    with torch.no_grad():
        return main_output(model.eval()(*inputs))


def batches(name: str, n: int = 4, batch: int = 2) -> list[tuple]:
    return [zoo.inputs(name, batch=batch, seq=8, seed=100 + i) for i in range(n)]


@pytest.mark.parametrize("arch", ["hf_vit", "gpt2"])
def test_repair_leaves_a_model_fused_with_itself_unchanged(arch):
    model, args = zoo.build(arch)
    traced = otfx.trace(model, args)
    fused = otfx.fuse(traced, traced, solver="emd", residual="mean")
    before = state_copy(fused)
    repaired = repair(fused, [traced, traced], batches(arch))
    assert_state_unchanged(fused, before)
    assert repaired.otfx_repair["units"], "no layer was found to repair"
    x = zoo.inputs(arch, batch=3, seq=8, seed=7)
    torch.testing.assert_close(outputs(repaired, x), outputs(model, x), atol=1e-4, rtol=0)
    for (k, p), q in zip(repaired.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=k)


def test_repair_of_a_fused_pair_moves_unit_statistics_to_the_targets():
    a, args = zoo.build("hf_vit", seed=0)
    b, _ = zoo.build("hf_vit", seed=1)
    ta, tb = otfx.trace(a, args), otfx.trace(b, args)
    data = batches("hf_vit", n=8)
    fused = otfx.fuse(ta, tb)
    repaired = repair(fused, [ta, tb], data)
    x = zoo.inputs("hf_vit", batch=3, seq=8, seed=7)
    assert torch.isfinite(outputs(repaired, x)).all()
    units = repair_units(analyse(otfx.trace(repaired, args)))
    assert any("fc" in u.weight or "intermediate" in u.weight for u in units) or len(units) >= 6
    b_in_a = otfx.align(tb, to=ta)
    sa = unit_statistics(ta, data, units=units)
    sb = unit_statistics(b_in_a, data, args=args, units=units)
    before = unit_statistics(fused, data, args=args, units=units)
    after = unit_statistics(repaired, data, args=args, units=units)
    moved = 0
    for u in units:
        t_mean = (sa[u.node][0] + sb[u.node][0]) / 2
        t_std = (sa[u.node][1] + sb[u.node][1]) / 2
        torch.testing.assert_close(after[u.node][1], t_std, atol=1e-4, rtol=1e-3, msg=u.node)
        if u.bias is not None:
            torch.testing.assert_close(after[u.node][0], t_mean, atol=1e-4, rtol=1e-3, msg=u.node)
        moved += bool((before[u.node][1] - t_std).abs().max() > 1e-3)
    assert moved > 0


def test_unit_moments_match_float64_over_batches_of_different_sizes():
    from otfx.align.repair import _moments

    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(n, 5, 7, generator=gen) * 3 + 10 for n in (4, 1, 6)]  # offset: a one-pass sum loses it
    mean, std = _moments(values, axis=1)
    rows = torch.cat([v.double().movedim(1, -1).reshape(-1, 5) for v in values])
    torch.testing.assert_close(mean, rows.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(std, rows.std(0, correction=0), atol=1e-6, rtol=0)


def test_shared_targets_compute_the_parents_statistics_once_and_repair_the_same(monkeypatch):
    from otfx.align import repair as repair_module

    a, args = zoo.build("hf_vit", seed=0)
    b, _ = zoo.build("hf_vit", seed=1)
    ta, tb = otfx.trace(a, args), otfx.trace(b, args)
    data = batches("hf_vit", n=3)
    fused = [otfx.fuse(ta, tb, reg=reg) for reg in (0.1, 0.5)]
    alone = [repair(f, [ta, tb], data) for f in fused]
    calls = []
    original = repair_module._targets
    monkeypatch.setattr(repair_module, "_targets", lambda *a, **k: calls.append(1) or original(*a, **k))
    with repair_module.shared_targets():
        shared = [repair(f, [ta, tb], data) for f in fused]
        repair(fused[0], [ta, tb], data, weights=[0.7, 0.3])  # other weights: other targets
    assert len(calls) == 2
    repair(fused[0], [ta, tb], data)  # outside the block nothing is kept
    assert len(calls) == 3
    for x, y in zip(alone, shared):
        for (k, p), q in zip(x.named_parameters(), y.parameters()):
            torch.testing.assert_close(p, q, atol=0, rtol=0, msg=k)


def test_anchor_free_fusion_of_a_model_and_its_symmetry_is_the_model():
    model, args = zoo.build("hf_vit")
    traced = otfx.trace(model, args)
    permuted = otfx.random_symmetry(traced, seed=5)
    fused = anchor_free_fuse(traced, permuted)
    x = zoo.inputs("hf_vit", batch=3, seq=8, seed=7)
    torch.testing.assert_close(outputs(fused, x), outputs(model, x), atol=1e-4, rtol=0)
    assert fused.otfx_report["anchor_free"]["converged"]


def test_anchor_free_fusion_does_not_depend_on_the_order_of_the_models():
    a, args = zoo.build("hf_vit", seed=0)
    b, _ = zoo.build("hf_vit", seed=1)
    ta, tb = otfx.trace(a, args), otfx.trace(b, args)
    x = zoo.inputs("hf_vit", batch=16, seq=8, seed=7)
    ab, ba = anchor_free_fuse(ta, tb), anchor_free_fuse(tb, ta)
    torch.testing.assert_close(outputs(ab, x), outputs(ba, x), atol=1e-4, rtol=0)
    anchored = [otfx.fuse(ta, tb, solver="emd"), otfx.fuse(tb, ta, solver="emd")]
    assert all(torch.isfinite(outputs(m, x)).all() for m in anchored)
    c, _ = zoo.build("hf_vit", seed=2)
    tc = otfx.trace(c, args)
    abc, cab = anchor_free_fuse(ta, tb, tc), anchor_free_fuse(tc, ta, tb)
    torch.testing.assert_close(outputs(abc, x), outputs(cab, x), atol=1e-4, rtol=0)


def test_correlation_cost_recovers_a_planted_permutation():
    model, args = zoo.build("hf_vit")
    traced = otfx.trace(model, args)
    permuted = otfx.trace(otfx.random_symmetry(traced, seed=4), args)
    config = FusionConfig(cost="correlation", solver="emd", residual="shared", heads="aware", qk="tied")
    maps = compute_maps(analyse(traced), analyse(permuted), config, batches("hf_vit", n=8))
    for fqn, value in aligned_params(maps).items():
        torch.testing.assert_close(value, traced.parameters()[fqn].double(), atol=1e-6, rtol=0, msg=fqn)


def _class_of(maps, weight: str) -> int:
    record = next(r for r in maps.anchor.records if r.kind == "layer" and r.info.get("weight") == weight)
    return maps.root(record.output)


def test_activation_costs_read_each_class_where_its_readers_see_it():
    """The patch embedding's class is read after its class token and position table are added (the input of
    the first norm), not at the rank-(patch pixels) projection; a value projection's class at the attention
    context the output projection reads; MLP units after their GELU. ``read="layer"`` keeps the old rule."""
    model, args = zoo.build("hf_vit")
    traced = otfx.trace(model, args)
    inference = analyse(traced)
    graph = {n.name: n for n in traced.graph.nodes}
    first_norm = next(r.node for r in inference.records if r.kind == "norm")
    o_proj = next(r.node for r in inference.records if r.kind == "layer" and "o_proj" in r.info["weight"])
    layer = "vit.layers.0."
    for cost in ("activations", "correlation"):
        maps = compute_maps(inference, inference, FusionConfig(cost=cost, solver="emd", residual="mean"))
        emb = _class_of(maps, "vit.embeddings.patch_embeddings.projection.weight")
        v = _class_of(maps, layer + "attention.v_proj.weight")
        fc1 = _class_of(maps, layer + "mlp.fc1.weight")
        [(emb_node, _)] = maps.costs.wanted(maps, [emb])
        [(v_node, _)] = maps.costs.wanted(maps, [v])
        [(fc1_node, _)] = maps.costs.wanted(maps, [fc1])
        assert emb_node == graph[first_norm].args[0].name, cost
        assert v_node == graph[o_proj].args[0].name, cost
        assert "gelu" in str(graph[fc1_node].target), cost
    maps.costs.read = "layer"
    [(emb_node, axes)] = maps.costs.wanted(maps, [emb])
    assert "conv" in str(graph[emb_node].target) and axes == (1,)


@pytest.mark.parametrize("cost", ["activations", "correlation"])
@pytest.mark.parametrize("arch", ["hf_vit", "bert"])
def test_activation_costs_recover_a_planted_permutation_with_the_paper_options(cost, arch):
    """From activations alone (no weight rows), with per-writer residual maps averaged, untied queries and keys
    and cross-head maps: the other model is a permuted copy, so every map must be the planted permutation."""
    model, args = zoo.build(arch)
    traced = otfx.trace(model, args)
    permuted = otfx.trace(otfx.random_symmetry(traced, seed=5), args)
    config = FusionConfig(cost=cost, solver="emd", residual="mean")
    maps = compute_maps(analyse(traced), analyse(permuted), config, batches(arch, n=8))
    for fqn, value in aligned_params(maps).items():
        torch.testing.assert_close(value, traced.parameters()[fqn].double(), atol=1e-6, rtol=0, msg=fqn)
