"""Transport-plan solvers: fast paths against POT's reference, marginals, breakdown fallbacks, edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otfx.align import solvers
from otfx.align.solvers import (
    SOLVERS,
    OTFallbackWarning,
    OTNotConvergedWarning,
    PlanInfo,
    RawPlan,
    normalise_cost,
    register,
    solve,
    solve_batch,
)

torch.set_num_threads(1)
F64 = torch.float64


def _random(n: int, m: int, seed: int) -> torch.Tensor:
    return torch.rand(n, m, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _structured(n: int, m: int, seed: int, noise: float = 0.3, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """cdist(X, Y) with Y = X[perm] + noise (two fine-tunes of one init); returns (cost, perm)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(n, m), d, generator=g, dtype=F64)
    perm = torch.randperm(max(n, m), generator=g)
    y = x[perm] + noise * torch.randn(max(n, m), d, generator=g, dtype=F64)
    return torch.cdist(x[:n], y[:m]), perm


COSTS = {
    "random": _random(48, 48, 0),
    "structured": _structured(48, 48, 1)[0],
    "rect_random": _random(30, 52, 2),
    "rect_structured": _structured(52, 30, 3)[0],
}


def _marginals(cost: torch.Tensor, seed: int, uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, m = cost.shape
    if uniform:
        return torch.full((n,), 1 / n, dtype=F64), torch.full((m,), 1 / m, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, generator=g, dtype=F64) + 0.5, torch.rand(m, generator=g, dtype=F64) + 0.5
    return a / a.sum(), b / b.sum()


def _reference(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float) -> torch.Tensor:
    """POT's Sinkhorn on the normalised cost with a tight tolerance (plain POT needs ~10^4 iterations on the
    structured costs; its error then is far below the 5e-5 the comparisons allow)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = ot.sinkhorn(a.numpy(), b.numpy(), normalise_cost(cost).numpy(), reg, stopThr=1e-10,
                           numItermax=20_000)
    return torch.from_numpy(plan)


def _assert_plan(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    assert plan.dtype == F64 and bool(torch.isfinite(plan).all()) and bool((plan >= 0).all())
    assert float((plan.sum(1) - a).abs().sum() + (plan.sum(0) - b).abs().sum()) <= tol


def _no_foreign_warnings(caught: list[warnings.WarningMessage]) -> None:
    """POT's own warnings must be translated into PlanInfo.warnings, not leak."""
    ours = (OTFallbackWarning, OTNotConvergedWarning)
    assert all(issubclass(w.category, ours) for w in caught), [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------------------- normalise_cost


def test_normalise_cost_range_and_constant() -> None:
    cost = _random(5, 7, 0) * 3 + 2
    norm = normalise_cost(cost)
    assert float(norm.min()) == 0 and float(norm.max()) == 1
    assert torch.equal(normalise_cost(torch.full((3, 4), 2.5)), torch.zeros(3, 4))
    batch = torch.stack([cost, torch.ones(5, 7), -cost])
    assert torch.allclose(normalise_cost(batch)[0], norm) and not bool(normalise_cost(batch)[1].any())


# ------------------------------------------------------------------------------------------------ exact solvers


@pytest.mark.parametrize("name", ["random", "structured"])
def test_lsa_fast_path_equals_emd(name: str) -> None:
    cost = COSTS[name]
    fast, info_fast = solve(cost, method="emd")  # exact_fast=True by default: square + uniform -> lsa
    ref, info_ref = solve(cost, method="emd", exact_fast=False)
    lsa, _ = solve(cost, method="lsa")
    assert info_fast.method == "lsa" and info_ref.method == "emd"
    direct = ot.emd(ot.unif(48), ot.unif(48), normalise_cost(cost).numpy())
    assert torch.equal(fast, ref) and torch.equal(lsa, ref) and np.array_equal(ref.numpy(), direct)
    assert info_fast.sharpness == 1.0 and info_fast.converged and info_fast.iterations == 0


def test_emd_recovers_a_permuted_copy_exactly() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 16, generator=g, dtype=F64)
    perm = torch.randperm(40, generator=g)
    cost = torch.cdist(x, x[perm])  # row i of model 0 is row inv[i] of model 1
    expected = torch.zeros(40, 40, dtype=F64)
    expected[perm, torch.arange(40)] = 1 / 40
    for exact_fast in (True, False):
        plan, _ = solve(cost, method="emd", exact_fast=exact_fast)
        assert torch.equal(plan, expected)


def test_emd_not_replaced_when_not_square_or_not_uniform() -> None:
    cost = COSTS["rect_random"]
    assert solve(cost, method="emd")[1].method == "emd"
    a, b = _marginals(COSTS["random"], 0, uniform=False)
    plan, info = solve(COSTS["random"], a, b, method="emd")
    assert info.method == "emd"
    _assert_plan(plan, a, b, 1e-12)
    with pytest.raises(ValueError, match="lsa needs"):
        solve(cost, method="lsa")


# --------------------------------------------------------------------------------------------- Sinkhorn solvers


@pytest.mark.parametrize("name", sorted(COSTS))
@pytest.mark.parametrize("reg", [0.06, 0.02])
def test_sinkhorn_torch_matches_pot_reference(name: str, reg: float) -> None:
    cost = COSTS[name]
    a, b = _marginals(cost, 5, uniform="rect" not in name)
    ref = _reference(cost, a, b, reg)
    for method in ("sinkhorn_torch", "sinkhorn_torch_log", "sinkhorn"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan, info = solve(cost, a, b, method=method, reg=reg)
        _no_foreign_warnings(caught)
        assert info.method == method
        _assert_plan(plan, a, b, 2e-5 if method == "sinkhorn" else 1.1e-6)  # POT stops after max_iter
        assert float((plan - ref).abs().sum()) < 5e-5, method


def test_sinkhorn_reports_what_it_did() -> None:
    cost = COSTS["random"] * 7 + 3
    plan, info = solve(cost, reg=0.06)
    assert isinstance(info, PlanInfo) and info.method == "sinkhorn_torch" and info.converged
    assert 0 < info.iterations < 1000 and info.warnings == []
    assert info.cost_range == (float(cost.min()), float(cost.max()))
    expected = float((plan.amax(1) / plan.sum(1)).mean())
    assert info.sharpness == pytest.approx(expected) and 1 / 48 < info.sharpness < 1


def test_structured_cost_gives_sharp_plan_near_the_permutation() -> None:
    cost, perm = _structured(64, 64, 6, noise=0.2)
    plan, info = solve(cost, reg=0.02)
    assert info.sharpness > 0.95
    assert torch.equal(plan.argmax(0), perm)  # column j's mass sits on its source row perm[j]


def test_batch_matches_single_solves_and_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = torch.stack([_random(40, 40, s) if s % 3 else _structured(40, 40, s)[0] for s in range(7)])
    monkeypatch.setattr(solvers, "BATCH_BYTES", 3 * 40 * 40 * 8)  # three chunks: 3 + 3 + 1
    a = torch.full((40,), 1 / 40, dtype=F64)
    for reg in (0.06, 0.02):
        plans, infos = solve_batch(costs, reg=reg)
        assert plans.shape == (7, 40, 40) and len(infos) == 7
        for s, (cost, plan, info) in enumerate(zip(costs, plans, infos)):
            single, single_info = solve(cost, reg=reg)
            _assert_plan(plan, a, a)
            # a chunk iterates until all its problems converge, so plans agree to the tolerance, not bitwise
            assert float((plan - single).abs().sum()) < 2e-6 and info.method == single_info.method
            if s % 3:  # the structured ones are compared with POT in the single-solve test (slow reference)
                assert float((plan - _reference(cost, a, a, reg)).abs().sum()) < 5e-5


@pytest.mark.parametrize("method", ["emd", "lsa"])
def test_batch_exact_square_problems_equal_one_solve_each(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched exact path (many square uniform problems: per-head matches) gives each problem the plan and
    statistics of its own ``solve``, exactly, across chunks; float32 costs like those of ``pair_costs``."""
    costs = torch.stack([_random(24, 24, s) if s % 2 else _structured(24, 24, s)[0] for s in range(9)])
    costs[4] = 0.5  # a constant cost
    monkeypatch.setattr(solvers, "BATCH_BYTES", 4 * 24 * 24 * 8)  # chunks of 4 + 4 + 1
    for dtype in (F64, torch.float32):
        plans, infos = solve_batch(costs.to(dtype), method=method)
        for cost, plan, info in zip(costs.to(dtype), plans, infos, strict=True):
            single, single_info = solve(cost, method=method)
            assert torch.equal(plan, single)
            assert (info.method, info.iterations, info.converged, info.cost_range, info.fallback) == (
                single_info.method, single_info.iterations, single_info.converged, single_info.cost_range,
                single_info.fallback)
            assert info.sharpness == pytest.approx(single_info.sharpness, abs=1e-15)
            assert info.marginal_error == pytest.approx(single_info.marginal_error, abs=1e-15)


def test_pair_costs_equal_the_loop_of_single_solves() -> None:
    from otfx.align.heads import pair_costs

    g = torch.Generator().manual_seed(0)
    blocks_a, blocks_b = torch.randn(6, 8, 20, generator=g), torch.randn(5, 8, 20, generator=g)
    costs = torch.cdist(blocks_b[:, None], blocks_a[None])
    expected = torch.zeros(5, 6, dtype=F64)
    for hb in range(5):
        for ha in range(6):
            expected[hb, ha] = (solve(costs[hb, ha], method="emd")[0] * costs[hb, ha]).sum()
    assert torch.equal(pair_costs(blocks_b, blocks_a), expected)


@pytest.mark.parametrize("parts", [[(1, 4, 4, False), (2, 4, 4, True)],  # partial rotary: pinned | free
                                   [(1, 3, 3, True), (2, 2, 2, False), (1, 3, 3, True)]])  # a part twice
def test_pair_costs_of_a_split_head_dim_equal_the_loop_of_single_solves(parts) -> None:
    """A head dim of parts (``PairStructure.dim_parts``): each free part's batched matchings give what one
    ``solve`` per head pair gives, a pinned part its diagonal, weighted by the part's share of the dims."""
    from otfx.align.heads import _groups, pair_costs

    g = torch.Generator().manual_seed(1)
    blocks_a, blocks_b = torch.randn(6, 8, 20, generator=g), torch.randn(5, 8, 20, generator=g)
    expected = torch.zeros(5, 6, dtype=F64)
    for rows_a, rows_b, free in _groups(parts).values():
        a = torch.cat([blocks_a[:, r] for r in rows_a], 2)
        b = torch.cat([blocks_b[:, r] for r in rows_b], 2)
        costs = torch.cdist(b[:, None], a[None])
        share = sum(r.stop - r.start for r in rows_a) / 8
        if not free:
            expected += share * costs.diagonal(dim1=-2, dim2=-1).mean(-1).to(F64)
            continue
        for hb in range(5):
            for ha in range(6):
                expected[hb, ha] += share * (solve(costs[hb, ha], method="emd")[0] * costs[hb, ha]).sum()
    assert torch.equal(pair_costs(blocks_b, blocks_a, parts), expected)


def test_batch_other_methods_loop_and_shared_marginals() -> None:
    costs = torch.stack([_random(12, 20, s) for s in range(3)])
    a, b = _marginals(costs[0], 7, uniform=False)
    plans, infos = solve_batch(costs, a, b, method="emd")
    for cost, plan, info in zip(costs, plans, infos):
        assert info.method == "emd" and torch.equal(plan, solve(cost, a, b, method="emd")[0])
    plans, _ = solve_batch(costs, a, b, method="sinkhorn_torch_log")
    for plan in plans:
        _assert_plan(plan, a, b, 1.1e-6)
    with pytest.raises(ValueError, match="k x n x m"):
        solve_batch(costs[0])


# --------------------------------------------------------------------------------------- breakdown and fallback


@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_torch", "sinkhorn_log", "sinkhorn_torch_log"])
def test_tiny_reg_falls_back_to_an_exact_plan(method: str) -> None:
    cost = _random(24, 24, 8)
    with pytest.warns(OTFallbackWarning, match="broke down") as record:
        plan, info = solve(cost, method=method, reg=1e-4, max_iter=300)
    _no_foreign_warnings(record.list)
    a = torch.full((24,), 1 / 24, dtype=F64)
    _assert_plan(plan, a, a, 1e-12)
    assert info.method == "lsa" and info.converged and any("falling back" in w for w in info.warnings)
    assert torch.equal(plan, solve(cost, method="emd")[0])


def test_tiny_reg_rectangular_falls_back_to_emd() -> None:
    cost = COSTS["rect_random"]
    a, b = _marginals(cost, 9, uniform=False)
    with pytest.warns(OTFallbackWarning):
        plan, info = solve(cost, a, b, reg=1e-4)
    _assert_plan(plan, a, b, 1e-12)
    assert info.method == "emd"


def test_plain_pot_underflow_goes_through_log_domain() -> None:
    """POT's plain Sinkhorn returns an all-zero-ish plan at tiny reg (K underflows); the log domain copes."""
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(10))
    cost = 1 - 0.5 * torch.eye(32, dtype=F64)[perm] + 0.001 * _random(32, 32, 10)
    cost[0, perm.argsort()[0]] = 0  # every other row's minimum is ~0.5: exp(-0.5 / 1e-4) underflows
    with pytest.warns(OTFallbackWarning, match="'sinkhorn'.*falling back to 'sinkhorn_torch_log'"):
        plan, info = solve(cost, method="sinkhorn", reg=1e-4)
    a = torch.full((32,), 1 / 32, dtype=F64)
    _assert_plan(plan, a, a)
    assert info.method == "sinkhorn_torch_log" and any("numerical errors" in w for w in info.warnings)


def test_unconverged_plan_is_flagged_or_replaced() -> None:
    a = torch.full((48,), 1 / 48, dtype=F64)
    cost, _ = _structured(48, 48, 11)  # after 2 sweeps the marginal error is ~4e-4: kept, flagged
    with pytest.warns(OTNotConvergedWarning, match=r"not converged, marginal error .* after 2 iterations"):
        plan, info = solve(cost, reg=0.06, max_iter=2)
    assert info.method == "sinkhorn_torch" and info.iterations == 2 and not info.converged
    assert info.fallback is None and 0 < info.marginal_error <= solvers.BREAKDOWN_TOL
    assert any("not converged" in w for w in info.warnings)
    _assert_plan(plan, a, a, solvers.BREAKDOWN_TOL)
    with pytest.warns(OTFallbackWarning, match=r"marginal error .* > 0.001.*falling back to 'lsa'"):
        plan, info = solve(_random(48, 48, 3), reg=0.02, max_iter=2)  # error ~0.06: replaced
    assert info.method == "lsa" and info.fallback == "sinkhorn_torch" and info.converged
    _assert_plan(plan, a, a, 1e-12)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_constant_cost(method: str) -> None:
    cost = torch.full((6, 6), 3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, info = solve(cost, method=method)
    assert caught == []
    a = torch.full((6,), 1 / 6, dtype=F64)
    _assert_plan(plan, a, a, 1e-12)
    assert info.cost_range == (3.0, 3.0)
    if method.startswith("sinkhorn"):
        assert torch.allclose(plan, torch.full((6, 6), 1 / 36, dtype=F64))


def test_zero_mass_rows_and_columns() -> None:
    cost = COSTS["rect_random"]
    a, b = _marginals(cost, 12, uniform=False)
    a[[0, 7]], b[3] = 0, 0
    a, b = a / a.sum(), b / b.sum()
    for method in ("sinkhorn_torch", "sinkhorn", "emd"):
        plan, info = solve(cost, a, b, method=method)
        _assert_plan(plan, a, b, 1.1e-6)
        assert not bool(plan[[0, 7]].any()) and not bool(plan[:, 3].any())
        assert info.cost_range == (float(cost.min()), float(cost.max()))


def test_input_errors_name_the_problem() -> None:
    cost = _random(4, 5, 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        solve(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="do not fit"):
        solve(cost, torch.full((5,), 0.2))
    with pytest.raises(ValueError, match="different mass"):
        solve(cost, torch.full((4,), 0.25), torch.full((5,), 0.3))
    with pytest.raises(ValueError, match="non-negative"):
        solve(cost, torch.tensor([0.5, 0.5, 0.5, -0.5]))
    with pytest.raises(ValueError, match="unknown OT method"):
        solve(cost, method="hungarian")


@pytest.mark.parametrize("reg", [0.0, -0.1, math.inf, math.nan, True])
def test_unusable_reg_is_refused(reg: float) -> None:
    with pytest.raises(ValueError, match="reg must be a positive finite number"):
        solve(_random(4, 4, 0), reg=reg)
    with pytest.raises(ValueError, match="reg must be a positive finite number"):
        solve_batch(_random(4, 4, 0)[None], reg=reg)


@pytest.mark.parametrize("max_iter", [0, -1, 2.5])
def test_unusable_max_iter_is_refused(max_iter) -> None:
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        solve(_random(4, 4, 0), max_iter=max_iter)


def test_converged_plans_report_no_fallback() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a fallback nor a not-converged warning
        _, info = solve(COSTS["random"], reg=0.1)
    assert info.converged and info.fallback is None and info.iterations > 0 and info.marginal_error < 1e-6


def test_float32_input_and_registry() -> None:
    cost = COSTS["random"].float()
    plan, _ = solve(cost)
    assert plan.dtype == F64

    @register("uniform_test")
    def uniform(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, **_) -> RawPlan:
        return RawPlan(a[:, None] * b[None, :], iterations=1)

    try:
        plan, info = solve(cost, method="uniform_test")
        assert info.method == "uniform_test" and torch.allclose(plan, torch.full_like(plan, 1 / 48**2))
    finally:
        SOLVERS.pop("uniform_test")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sinkhorn_torch_on_gpu() -> None:
    cost = COSTS["structured"]
    plan, info = solve(cost.cuda(), reg=0.06)
    assert plan.is_cuda and info.method == "sinkhorn_torch"
    assert torch.allclose(plan.cpu(), solve(cost, reg=0.06)[0], atol=1e-9)
    plans, _ = solve_batch(cost.cuda()[None].repeat(3, 1, 1))
    assert plans.is_cuda


# ------------------------------------------------------------------------------------------- property tests


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), m=st.integers(1, 9), seed=st.integers(0, 2**16), reg=st.sampled_from([0.3, 0.06, 0.01]),
       uniform=st.booleans())
def test_property_plans_are_valid_and_emd_is_cheapest(n: int, m: int, seed: int, reg: float, uniform: bool) -> None:
    cost = _random(n, m, seed)
    a, b = _marginals(cost, seed, uniform)
    norm = normalise_cost(cost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OTFallbackWarning)
        warnings.simplefilter("ignore", OTNotConvergedWarning)  # flagged in info.converged; the plan is usable
        exact, _ = solve(cost, a, b, method="emd", exact_fast=False)
        _assert_plan(exact, a, b, 1e-12)
        for method in ("sinkhorn_torch", "sinkhorn"):
            plan, info = solve(cost, a, b, method=method, reg=reg)
            _assert_plan(plan, a, b, 1e-3)
            err = float((plan.sum(1) - a).abs().sum() + (plan.sum(0) - b).abs().sum())
            assert float((plan * norm).sum()) >= float((exact * norm).sum()) - err - 1e-12
            assert 0 < info.sharpness <= 1 + 1e-12


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_property_lsa_equals_emd(n: int, seed: int) -> None:
    cost = _random(n, n, seed)
    fast, info = solve(cost, method="emd")
    assert info.method == "lsa" and torch.equal(fast, solve(cost, method="emd", exact_fast=False)[0])
