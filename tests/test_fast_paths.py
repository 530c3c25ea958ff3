"""Fast paths of the map engine against the reference computations they replace: permutation index vs dense
matmul, float32 vs float64 features and costs, cached producer rows and eager rewriting vs the plain rewrite,
plan release, in-place standardisation, preallocated activation collection and the streaming blend."""

from __future__ import annotations

import sys

import pytest
import torch

import otfx
from otfx import testing as zoo
from otfx.align.activations import _sequence_filter, batches_like, collect
from otfx.align.config import FusionConfig
from otfx.align.costs.weights import sq_dists as _sq_dists
from otfx.align.costs.weights import unit_rows as _unit_rows
from otfx.align.maps import TransportMaps
from otfx.align.plans import apply_map, identity_plan, permutation_index, plan_weights
from otfx.align.plans import dense_apply as _dense_apply
from otfx.align.rewrite import aligned_params, rewrite_params, unique_params
from otfx.fuse import _blend_into, compute_maps
from otfx.symmetry import noisy_copy
from otfx.trace import main_output

fuse_module = sys.modules["otfx.fuse"]  # ``otfx.fuse`` the attribute is the function


def reference_apply(tensor: torch.Tensor, axis: int, plan: torch.Tensor, side: str) -> torch.Tensor:
    """The original ``apply_map``: dense float64 weights times the moved axis."""
    if side == "out":
        weights = plan / plan.sum(0, keepdim=True).clamp_min(1e-300)
    else:
        weights = plan / plan.sum(1, keepdim=True).clamp_min(1e-300)
    moved = tensor.movedim(axis, 0)
    shape = moved.shape
    out = weights.T.to(moved.dtype) @ moved.reshape(shape[0], -1)
    return out.reshape((plan.shape[1], *shape[1:])).movedim(0, axis)


def reference_aligned(maps: TransportMaps) -> dict[str, torch.Tensor]:
    """The original rewrite: every axis of every parameter, in float64, with the maps' plans (an orthogonal
    stream map contracted as it is; a folded norm gain left as it is)."""
    out = {}
    for fqn in unique_params(maps.anchor):
        value = maps.params_other[fqn].double()
        for axis, sid in enumerate(maps.anchor.param_axes[fqn] if fqn not in maps.invariant else []):
            plan = maps.map(sid)
            if maps.root(sid) in maps.orthogonal:
                value = torch.tensordot(value, plan, dims=([axis], [0])).movedim(-1, axis)
            else:
                value = reference_apply(value, axis, plan, maps.side(fqn, axis))
        out[fqn] = value
    return out


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """The reference standardisation: per column, mean 0 and (unbiased) std 1."""
    std, mean = torch.std_mean(x, 0)
    return (x - mean).div_(std + 1e-9)


def random_plan(n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    plan = torch.rand(n, m, generator=g, dtype=torch.float64) ** 4
    return plan / plan.sum()


def perm_plan(n: int, seed: int, scale: float | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    plan = torch.zeros(n, n, dtype=torch.float64)
    plan[torch.arange(n), torch.randperm(n, generator=g)] = 1 / n if scale is None else scale
    return plan


def pair(arch: str, kind: str, **config):
    """(anchor, other) traced zoo models: independent ("random") or a noisy permuted copy ("structured")."""
    model, args = zoo.build(arch, **config)
    ta = otfx.trace(model, args)
    other = zoo.build(arch, seed=1, **config)[0] if kind == "random" else noisy_copy(ta, seed=3)
    return ta, otfx.trace(other, args)


# ------------------------------------------------------------------------------------ permutation fast path


@pytest.mark.parametrize("shape,axis", [((12,), 0), ((12, 5), 0), ((5, 12), 1), ((3, 12, 4), 1), ((2, 3, 12), 2)])
@pytest.mark.parametrize("side", ["in", "out"])
def test_permutation_index_equals_dense_matmul(shape, axis, side):
    g = torch.Generator().manual_seed(0)
    tensor = torch.randn(shape, generator=g, dtype=torch.float64)
    for plan in (perm_plan(12, 1), perm_plan(12, 2, scale=0.37), identity_plan(12),
                 torch.block_diag(perm_plan(5, 3) * 5 / 12, perm_plan(7, 4) * 7 / 12)):
        assert permutation_index(plan) is not None
        fast = apply_map(tensor, axis, plan, side)
        assert torch.equal(fast, reference_apply(tensor, axis, plan, side))  # bit for bit
        assert torch.equal(apply_map(tensor.float(), axis, plan, side), fast.float())


def test_permutation_index_rejects_other_plans():
    p, q = perm_plan(8, 1), perm_plan(8, 2)
    doubled = p.clone()
    doubled[:, 0], doubled[:, 1] = p[:, 0] + p[:, 1], 0  # two rows into one column
    for plan in (random_plan(8, 8, 0), (p + q) / 2, random_plan(8, 4, 1), doubled, torch.zeros(8, 8),
                 perm_plan(8, 3)[:, :7]):
        assert permutation_index(plan) is None
    index = permutation_index(p)
    assert torch.equal(p[index, torch.arange(8)] > 0, torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize("shape,axis", [((10, 6), 0), ((6, 10), 1), ((4, 10, 3), 1), ((10,), 0)])
@pytest.mark.parametrize("side", ["in", "out"])
def test_dense_float32_weights_match_float64_reference(shape, axis, side):
    g = torch.Generator().manual_seed(1)
    tensor = torch.randn(shape, generator=g, dtype=torch.float64)
    m = 7
    plan = random_plan(10, m, 2)
    expected = reference_apply(tensor, axis, plan, side)
    assert expected.shape[axis] == m
    torch.testing.assert_close(apply_map(tensor, axis, plan, side), expected, rtol=1e-12, atol=1e-12)
    fast = _dense_apply(tensor.float(), axis, plan_weights(plan, side, torch.float32))
    torch.testing.assert_close(fast.double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- costs in float32


@pytest.mark.parametrize("unit", [True, False])
def test_sq_dists_matches_cdist(unit):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(40, 30, generator=g, dtype=torch.float64), torch.randn(50, 30, generator=g, dtype=torch.float64)
    a[3] = 0  # a zero row stays a zero row after unit scaling
    ref_a, ref_b = (_unit_rows(a), _unit_rows(b)) if unit else (a, b)
    expected = torch.cdist(ref_b, ref_a)
    torch.testing.assert_close(_sq_dists(b, a, unit).clamp_min(0).sqrt(), expected, rtol=1e-10, atol=1e-7)
    got32 = _sq_dists(b.float().T.contiguous().T, a.float(), unit).clamp_min(0).sqrt()  # strided rows too
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("arch", ["hf_vit", "bert", "gpt2"])
@pytest.mark.parametrize("heads", ["cross", "aware"])
def test_float32_features_give_the_float64_emd_permutations_on_structured_pairs(arch, heads):
    ta, tb = pair(arch, "structured")
    config = FusionConfig(solver="emd", residual="mean", heads=heads, qk="tied" if heads == "aware" else "untied")
    a, b = otfx.analyse(ta), otfx.analyse(tb)
    fast, slow = TransportMaps(a, b, config), TransportMaps(a, b, config, compute_dtype=torch.float64)
    fast_params, slow_params = aligned_params(fast), aligned_params(slow)
    assert fast.maps.keys() == slow.maps.keys()
    for root, plan in slow.maps.items():
        assert torch.equal(fast.maps[root], plan), fast.describe(root)
    for fqn, value in slow_params.items():
        torch.testing.assert_close(fast_params[fqn], value, rtol=1e-5, atol=1e-6, msg=fqn)


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_float32_sinkhorn_plans_are_close_to_float64(kind):
    ta, tb = pair("hf_vit", kind)
    config = FusionConfig(solver="sinkhorn", reg=0.06, residual="mean")
    a, b = otfx.analyse(ta), otfx.analyse(tb)
    fast, slow = TransportMaps(a, b, config), TransportMaps(a, b, config, compute_dtype=torch.float64)
    fast_params, slow_params = aligned_params(fast), aligned_params(slow)
    for root, plan in slow.maps.items():
        torch.testing.assert_close(fast.maps[root] * plan.shape[0], plan * plan.shape[0], rtol=0, atol=1e-4)
    for fqn, value in slow_params.items():
        torch.testing.assert_close(fast_params[fqn], value, rtol=1e-4, atol=1e-5, msg=fqn)


# ------------------------------------------------------------------------ cached rows, eager rewrite, release


@pytest.mark.parametrize("arch", ["hf_vit", "bert", "gpt2", "llama", "timm_vit", "matmul_encoder"])
@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_cached_rows_and_eager_rewrite_match_the_plain_rewrite(arch, solver):
    ta, tb = pair(arch, "structured")
    config = FusionConfig(solver=solver, heads="aware" if arch == "llama" else "cross")
    a, b = otfx.analyse(ta), otfx.analyse(tb)
    maps = TransportMaps(a, b, config, compute_dtype=torch.float64)
    order: list[str] = []
    values: dict[str, torch.Tensor] = {}

    def sink(fqn: str, value: torch.Tensor) -> None:
        order.append(fqn)
        values[fqn] = value

    rewrite_params(maps, sink)
    assert sorted(order) == sorted(unique_params(a)) and len(order) == len(set(order))
    assert not maps.partials
    expected = reference_aligned(maps)  # the same plans, applied axis by axis without any cache
    for fqn, value in expected.items():
        torch.testing.assert_close(values[fqn], value, rtol=1e-10, atol=1e-12, msg=fqn)
    assert list(aligned_params(TransportMaps(a, b, config))) == unique_params(a)  # graph order


@pytest.mark.parametrize("arch", ["hf_vit", "bert", "gpt2", "llama", "timm_vit", "vit_pytorch"])
def test_released_plans_are_never_recomputed_and_change_nothing(arch):
    ta, tb = pair(arch, "random")
    config = FusionConfig(solver="sinkhorn", heads="aware" if arch == "llama" else "cross")
    a, b = otfx.analyse(ta), otfx.analyse(tb)
    kept = compute_maps(a, b, config)
    expected = aligned_params(kept)
    released = compute_maps(a, b, config, release=True)
    got = aligned_params(released)
    assert released.recomputed == 0
    assert len(released.maps) < len(kept.maps)
    assert len(released.stats) == len(kept.stats)
    for fqn, value in expected.items():
        assert torch.equal(got[fqn], value), fqn


def test_fuse_matches_the_float64_reference_fusion():
    for kind, solver in (("structured", "emd"), ("random", "sinkhorn")):
        ta, tb = pair("hf_vit", kind)
        fused = otfx.fuse(ta, tb, solver=solver)
        maps = TransportMaps(otfx.analyse(ta), otfx.analyse(tb), FusionConfig(solver=solver),
                             compute_dtype=torch.float64)
        aligned = reference_aligned(maps)
        anchor = maps.params_anchor  # with the default residual="orthogonal": its norm gains folded
        for name, p in fused.named_parameters():
            expected = 0.5 * anchor[name].double() + 0.5 * aligned[name]
            torch.testing.assert_close(p.double(), expected, rtol=1e-4, atol=1e-5, msg=name)
        assert {"rows", "cost", "solve", "rewrite", "total"} <= set(fused.otfx_report["timings"])


@pytest.mark.parametrize("shape", [(10,), (7, 5), (3, 4, 5), ()])
def test_chunked_blend_equals_whole_tensor_blend(shape):
    g = torch.Generator().manual_seed(3)
    anchor, value = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected = (anchor.double() * 0.3 + 0.7 * value.double()).float()
    for chunk in (1, 4, 1 << 22):
        dest = torch.empty(shape)
        _blend_into(dest, None, anchor, 0.3, value, 0.7, chunk=chunk)
        assert torch.equal(dest, expected)
        acc = anchor.double() * 0.3
        dest = torch.empty(shape)
        _blend_into(dest, acc, anchor, 0.0, value, 0.7, chunk=chunk)
        assert torch.equal(dest, expected)
    dest = torch.empty(shape[::-1]).T if len(shape) == 2 else torch.empty(shape)
    _blend_into(dest, None, anchor, 0.3, value, 0.7, chunk=2)  # a strided destination: one piece
    assert torch.equal(dest, expected)


def test_three_models_blend_through_float64_partial_sums():
    model, args = zoo.build("hf_vit")
    traced = otfx.trace(model, args)
    copies = [otfx.trace(otfx.random_symmetry(traced, seed=s), args) for s in (1, 2)]
    fused = otfx.fuse(traced, *copies, solver="emd", residual="mean", weights=[0.5, 0.3, 0.2])
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------------ activations


def reference_collect(traced, data, wanted, tokens="all"):
    """The original collection: float64 copies per batch, concatenated at the end."""
    import copy as copy_module
    import math

    import torch.utils._pytree as pytree
    from torch import fx

    gm = traced.program.module()
    graph = copy_module.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(nodes[name] for name, _ in wanted),)
    graph._codegen = fx.graph.CodeGen()
    probe = fx.GraphModule(gm, graph)
    rows = {key: [] for key in wanted}
    with torch.no_grad():
        for inputs, real in batches_like(traced, data):
            flat, _ = pytree.tree_flatten((inputs, traced.kwargs))
            for key, value in zip(wanted, probe(*flat)):
                x = value[:real].detach().double()
                axes = key[1]
                rest = [d for d in range(x.ndim) if d not in axes]
                width = math.prod(x.shape[d] for d in axes)
                x = x.permute(*rest, *axes).reshape(*[x.shape[d] for d in rest], width)
                if len(rest) == 2 and 1 not in axes:
                    x = _sequence_filter(x, tokens)
                rows[key].append(x.reshape(-1, width))
    return {key: torch.cat(parts) for key, parts in rows.items()}


@pytest.mark.parametrize("tokens", ["all", "cls", ("window", 2)])
def test_preallocated_float32_collection_matches_the_reference(tokens):
    ta, tb = pair("hf_vit", "random")
    maps = compute_maps(otfx.analyse(ta), otfx.analyse(tb), FusionConfig(cost="activations", tokens=tokens),
                        data=[zoo.inputs("hf_vit", 3, 8, seed=s) for s in range(3)])  # 9 rows, traced batch 2
    wanted = list(maps.acts_anchor)
    assert wanted
    data = [zoo.inputs("hf_vit", 3, 8, seed=s) for s in range(3)]
    got, expected = collect(ta, data, wanted, tokens), reference_collect(ta, data, wanted, tokens)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key].double(), value, rtol=1e-6, atol=1e-6, msg=str(key))


def test_in_place_standardisation_and_gram_cost_match_cdist():
    ta, tb = pair("hf_vit", "structured")
    data = [zoo.inputs("hf_vit", 4, 8, seed=s) for s in range(2)]
    config = FusionConfig(cost="activations", solver="emd")
    maps = compute_maps(otfx.analyse(ta), otfx.analyse(tb), config, data=data)
    raw_a = {k: v.clone() for k, v in maps.acts_anchor.items()}
    raw_b = {k: v.clone() for k, v in maps.acts_other.items()}
    root = next(r for r in maps.producers if maps.activation_node(r) in raw_a)
    cost, _ = maps.costs.cost(maps, root)
    node = maps.activation_node(root, [r.node for r in maps.anchor.records if r.kind == "layer"
                                       and r.output is not None and maps.root(r.output) == root])
    a, b = _standardise(raw_a[node].double()), _standardise(raw_b[node].double())
    torch.testing.assert_close(maps.acts_anchor[node].double(), a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cost.double(), torch.cdist(b.T, a.T), rtol=1e-4, atol=1e-3)
    again, _ = maps.costs.cost(maps, root)  # standardised once only
    assert torch.equal(again, cost)


@pytest.mark.parametrize("residual", ["mean", "weighted_scalar", "weighted_matrix"])
def test_activation_fusion_matches_float64_reference_maps(residual):
    ta, tb = pair("hf_vit", "structured")
    data = [zoo.inputs("hf_vit", 4, 8, seed=s) for s in range(2)]
    config = FusionConfig(cost="activations", solver="emd", residual=residual)
    a, b = otfx.analyse(ta), otfx.analyse(tb)
    fast = compute_maps(a, b, config, data=data)
    aligned_params(fast)
    slow = compute_maps(a, b, config, data=data)
    slow.compute_dtype = torch.float64
    aligned_params(slow)
    for root, plan in slow.maps.items():
        torch.testing.assert_close(fast.maps[root], plan, rtol=0, atol=1e-9, msg=slow.describe(root))


def test_weights_mode_with_weighted_residual_collects_only_the_residual_inputs():
    ta, tb = pair("hf_vit", "random")
    data = [zoo.inputs("hf_vit", 2, 8, seed=0)]
    weighted = compute_maps(otfx.analyse(ta), otfx.analyse(tb), FusionConfig(residual="weighted_scalar"), data)
    acts = compute_maps(otfx.analyse(ta), otfx.analyse(tb), FusionConfig(cost="activations"), data)
    assert 0 < len(weighted.acts_anchor) < len(acts.acts_anchor)
    fused = otfx.fuse(ta, tb, residual="weighted_scalar", data=data)
    with torch.no_grad():
        assert torch.isfinite(main_output(fused(*zoo.inputs("hf_vit", 2, 8)))).all()
    assert fuse_module.fuse is otfx.fuse


def test_calibration_runs_at_a_larger_batch_with_the_same_values(monkeypatch):
    """A model traced at batch 2 is traced again at up to 64 rows for collection and repair: same nodes, same
    activations and statistics as through the batch-2 graph."""
    from otfx import testing
    from otfx.align import activations, repair

    model, args = testing.build("hf_vit")
    traced = otfx.trace(model, args)
    data = [testing.inputs("hf_vit", 7, 8, seed=s)[0] for s in range(3)]
    bigger = activations.for_calibration(traced, data)
    assert bigger is not traced and bigger.args[0].shape[0] == 21
    assert [n.name for n in bigger.graph.nodes] == [n.name for n in traced.graph.nodes]
    wanted = [(n, (2,)) for n, axes in otfx.analyse(traced).node_axes.items() if len(axes) == 3][3:6]
    units = repair.repair_units(otfx.analyse(traced))
    fast = activations.collect(traced, data, wanted), repair.unit_statistics(traced, data, units=units)
    monkeypatch.setattr(activations, "CALIBRATION_BATCH", 0)  # the batch-2 graph
    slow = activations.collect(traced, data, wanted), repair.unit_statistics(traced, data, units=units)
    for key in wanted:
        torch.testing.assert_close(fast[0][key], slow[0][key], atol=1e-5, rtol=1e-4)
    for name in slow[1]:
        torch.testing.assert_close(fast[1][name], slow[1][name], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- batched solves


@pytest.mark.parametrize("arch,kind", [("hf_vit", "random"), ("hf_vit", "structured"), ("bert", "random"),
                                       ("llama", "random")])
@pytest.mark.parametrize("solver", ["sinkhorn_torch", "sinkhorn_torch_log"])
def test_batched_solves_equal_one_solve_per_class(arch, kind, solver, monkeypatch):
    """Ready same-sized classes solved in one ``solve_batch`` give the plans of one ``solve`` each (to float
    tolerance), the same statistics and the same rewritten parameters."""
    maps_module = sys.modules["otfx.align.maps"]
    ta, tb = pair(arch, kind)
    config = FusionConfig(solver=solver)
    a, b = otfx.analyse(ta), otfx.analyse(tb)
    groups: list[int] = []
    solve_peers = maps_module.solve_peers

    def counting(maps, roots):
        groups.append(len(roots))
        return solve_peers(maps, roots)

    monkeypatch.setattr(maps_module, "solve_peers", counting)
    released = compute_maps(a, b, config, release=True)  # as fuse runs it: no class solved twice
    got = aligned_params(released)
    assert groups and max(groups) > 1  # some classes were solved together
    assert released.recomputed == 0
    solved_together = sum(groups)
    batched = compute_maps(a, b, config)
    aligned_params(batched)
    monkeypatch.setattr(maps_module, "peers", lambda maps, root: [root])
    single = compute_maps(a, b, config)
    expected = aligned_params(single)
    assert len(released.stats) == len(single.stats)
    assert solved_together <= len([s for s in single.stats if s.kind == "layer"])  # a class ready alone: solve
    for root, plan in single.maps.items():
        # batched and single matrix products round differently; the solver's own tolerance is 1e-6 (L1)
        assert float((batched.maps[root] - plan).abs().sum()) < 1e-8, root
    key = lambda s: s.space  # noqa: E731 - the batch solves in another order
    for s_b, s_1 in zip(sorted(batched.stats, key=key), sorted(single.stats, key=key), strict=True):
        assert (s_b.space, s_b.kind, s_b.method, s_b.iterations, s_b.converged) == (
            s_1.space, s_1.kind, s_1.method, s_1.iterations, s_1.converged)
    for fqn, value in expected.items():
        torch.testing.assert_close(got[fqn], value, rtol=1e-6, atol=1e-7, msg=fqn)
