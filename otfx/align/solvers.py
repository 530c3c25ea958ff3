"""Transport-plan solvers: exact (EMD, LSA) and entropic (Sinkhorn) OT on min-max normalised costs.

Every solver shares one signature and is found by name in ``SOLVERS``. ``solve`` checks each plan and falls back
(plain Sinkhorn -> log-domain Sinkhorn -> EMD) instead of returning a broken one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

BREAKDOWN_TOL = 1e-3  # relative L1 marginal error above which a plan is rejected
EMD_MAX_ITER = 10_000_000  # network-simplex iterations; POT's 1e5 default can stop early at n >= 3072


class OTFallbackWarning(UserWarning):
    """A solver broke down (zero, non-finite or unconverged plan) and another one was used."""


@dataclass
class PlanInfo:
    method: str  # the solver actually used (after any fallback)
    iterations: int  # 0 for exact solvers
    converged: bool
    sharpness: float  # mean over rows of max(P_i.)/sum(P_i.): 1 = permutation-like, 1/m = uniform
    cost_range: tuple[float, float]  # (min, max) of the raw cost before normalisation
    warnings: list[str] = field(default_factory=list)


@dataclass
class RawPlan:
    """What a registered solver returns; ``solve`` turns it into a checked plan and a PlanInfo."""

    plan: torch.Tensor
    iterations: int = 0
    notes: list[str] = field(default_factory=list)
    numerical: bool = False  # the solver hit under/overflow (as opposed to running out of iterations)


# solver(cost, a, b, reg=, max_iter=, tol=): cost is normalised float64 (n x m), a and b are positive float64.
Solver = Callable[..., RawPlan]
SOLVERS: dict[str, Solver] = {}
# Where a solver goes after a *numerical* breakdown. An unconverged plan goes straight to EMD: a log-domain
# version runs the same iterations, so it would not converge either.
FALLBACK: dict[str, str] = {}


def register(name: str, fallback: str | None = None) -> Callable[[Solver], Solver]:
    """Decorator adding a solver to ``SOLVERS`` (and its numerical fallback to ``FALLBACK``)."""

    def deco(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        if fallback is not None:
            FALLBACK[name] = fallback
        return fn

    return deco


def normalise_cost(cost: torch.Tensor) -> torch.Tensor:
    """(M - min) / (max - min); a constant cost becomes all zeros."""
    lo, hi = cost.amin(dim=(-2, -1), keepdim=True), cost.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return (cost - lo) / torch.where(span > 0, span, 1)  # constant: (cost - lo) is already 0


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _caught(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message}" for w in caught]


# ----------------------------------------------------------------------------------------------- exact solvers


@register("emd")
def _emd(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, **_) -> RawPlan:
    """POT's network simplex (``ot.emd``), the exact reference."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = ot.emd(_np(a), _np(b), _np(cost), numItermax=EMD_MAX_ITER)
    return RawPlan(torch.from_numpy(plan).to(cost.device), notes=_caught(caught))


@register("lsa")
def _lsa(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, **_) -> RawPlan:
    """scipy's ``linear_sum_assignment``: the exact hard map, square costs with uniform marginals only."""
    n, m = cost.shape
    if n != m or not (_is_uniform(a) and _is_uniform(b)):
        raise ValueError(f"lsa needs a square cost with uniform marginals, got {n}x{m}")
    rows, cols = linear_sum_assignment(_np(cost))
    plan = torch.zeros(n, m, dtype=torch.float64, device=cost.device)
    plan[torch.as_tensor(rows, device=cost.device), torch.as_tensor(cols, device=cost.device)] = a.sum() / n
    return RawPlan(plan)


def _is_uniform(x: torch.Tensor) -> bool:
    return bool((x - x.mean()).abs().max() <= 1e-12 * x.mean())


# ------------------------------------------------------------------------------------------------ POT Sinkhorn


def _pot_sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float, max_iter: int, tol: float,
                  method: str) -> RawPlan:
    # POT stops on the L2 norm of the column error; tol/sqrt(m) bounds our L1 criterion.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, log = ot.sinkhorn(_np(a), _np(b), _np(cost), reg, method=method, numItermax=max_iter,
                                stopThr=tol * float(a.sum()) / math.sqrt(cost.shape[1]), log=True)
    notes = _caught(caught)
    numerical = any("numerical errors" in s or "overflow" in s for s in notes)
    return RawPlan(torch.from_numpy(plan).to(cost.device), int(log["niter"]) + 1, notes, numerical)


@register("sinkhorn", fallback="sinkhorn_torch_log")
def _sinkhorn_pot(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, max_iter: int,
                  tol: float) -> RawPlan:
    """POT's plain Sinkhorn-Knopp (numpy)."""
    return _pot_sinkhorn(cost, a, b, reg, max_iter, tol, "sinkhorn")


@register("sinkhorn_log", fallback="emd")
def _sinkhorn_pot_log(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, max_iter: int,
                      tol: float) -> RawPlan:
    """POT's log-domain Sinkhorn (numpy; robust but ~10x slower than the torch version)."""
    return _pot_sinkhorn(cost, a, b, reg, max_iter, tol, "sinkhorn_log")


# ---------------------------------------------------------------------------------------------- torch Sinkhorn
# Both domains are batched (k x n x m) and share one driver. A domain holds the kernel and knows how to get the
# plan's row sums (caching what the next u-update needs), the u/v updates, the relaxation and the plan.


class _Scaling:
    """Plain Sinkhorn: P = diag(u) K diag(v). Rows/columns are min-shifted first (same plan), so K has a 1 in
    every row and column and cannot produce the all-zero plan of the reference code."""

    def __init__(self, cost: torch.Tensor, reg: float) -> None:
        reduced = cost - cost.amin(2, keepdim=True)
        self.K = reduced.sub_(reduced.amin(1, keepdim=True)).mul_(-1 / reg).exp_()
        self._Kv = self.K

    def init(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(a), torch.ones_like(b)

    def row_mass(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._Kv = torch.bmm(self.K, v[:, :, None])[:, :, 0]
        return u * self._Kv

    def new_u(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return a / self._Kv

    def new_v(self, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return b / torch.bmm(u[:, None, :], self.K)[:, 0, :]

    @staticmethod
    def relax(x: torch.Tensor, new: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        return x * (new / x) ** omega

    def plan(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.K.mul_(u[:, :, None]).mul_(v[:, None, :])  # the kernel is not needed any more


class _Log:
    """Log-domain Sinkhorn on potentials f = log u, g = log v: never under/overflows, ~10x slower per iteration."""

    def __init__(self, cost: torch.Tensor, reg: float) -> None:
        self.S = cost / -reg
        self._lse = self.S

    def init(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(a), torch.zeros_like(b)

    def row_mass(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        self._lse = torch.logsumexp(self.S + g[:, None, :], 2)
        return torch.exp(f + self._lse)

    def new_u(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.log(a) - self._lse

    def new_v(self, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return torch.log(b) - torch.logsumexp(self.S + f[:, :, None], 1)

    @staticmethod
    def relax(x: torch.Tensor, new: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        return x + omega * (new - x)

    def plan(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.S + f[:, :, None] + g[:, None, :])


def _sinkhorn_driver(dom: _Scaling | _Log, a: torch.Tensor, b: torch.Tensor, max_iter: int,
                     tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Sinkhorn with adaptive over-relaxation; returns plans (k x n x m) and iterations (k,).

    Near-permutation plans (structured costs at reg ~0.05) make plain Sinkhorn crawl (thousands of iterations).
    After 20 plain iterations the per-iteration contraction theta is estimated from the error and the updates are
    over-relaxed with omega = 2 / (1 + sqrt(1 - theta)) (Lehmann et al. 2021, "A note on overrelaxation in the
    Sinkhorn algorithm"). A problem whose error then grows is restored to its last checkpoint and runs plain.
    Stops on the L1 row error (free: it reuses K v); the last column update is plain so columns are exact.
    """
    k = a.shape[0]
    x, y = dom.init(a, b)
    tol_k = tol * a.sum(1)
    omega = torch.ones(k, 1, dtype=a.dtype, device=a.device)
    frozen = torch.zeros(k, dtype=torch.bool, device=a.device)  # no (more) acceleration
    saved_x, saved_y, prev_err = x, y, torch.full((k,), math.inf, dtype=a.dtype, device=a.device)
    switch_err = prev_err
    iters = torch.full((k,), max_iter, dtype=torch.long, device=a.device)
    for it in range(max_iter + 1):
        err = (dom.row_mass(x, y) - a).abs().sum(1)
        stop = (err <= tol_k) | ~torch.isfinite(err)
        iters = torch.where(stop & (iters == max_iter), it, iters)
        if it == max_iter or bool(stop.all()):
            break
        if it and it % 10 == 0:
            # The row error jumps up to ~10x when relaxation starts (columns are no longer exact), so only a
            # blow-up counts as divergence.
            bad = (omega[:, 0] > 1) & ~(err <= 100 * switch_err)
            if bool(bad.any()):  # roll back to the switch point and continue plain
                x, y = torch.where(bad[:, None], saved_x, x), torch.where(bad[:, None], saved_y, y)
                omega[bad] = 1.0
            if it >= 20:
                theta = (err / prev_err) ** 0.1
                start = ~frozen & ~stop & (theta > 0.5) & (theta < 1)
                omega[start, 0] = (2 / (1 + torch.sqrt(1 - theta[start]))).clamp(max=1.95)
                saved_x, saved_y = torch.where(start[:, None], x, saved_x), torch.where(start[:, None], y, saved_y)
                switch_err, frozen = torch.where(start, err, switch_err), frozen | start
            prev_err = err
        x = dom.relax(x, dom.new_u(a, y), omega)
        y = dom.relax(y, dom.new_v(b, x), omega)
    y = dom.new_v(b, x)
    return dom.plan(x, y), iters


def _torch_sinkhorn(domain: type[_Scaling] | type[_Log], cost: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor, reg: float, max_iter: int, tol: float) -> list[RawPlan]:
    """Run a torch domain on a batch (k x n x m) with marginals (k x n), (k x m); one RawPlan per problem."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans, iters = _sinkhorn_driver(domain(cost, reg), a, b, max_iter, tol)
    finite = torch.isfinite(plans.sum((1, 2))).tolist()  # entries are >= 0: a NaN/inf reaches the sum
    return [RawPlan(p, int(i), [] if ok else ["non-finite scalings (under/overflow)"], not ok)
            for p, i, ok in zip(plans, iters.tolist(), finite, strict=True)]


@register("sinkhorn_torch", fallback="sinkhorn_torch_log")
def _sinkhorn_torch(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, max_iter: int,
                    tol: float) -> RawPlan:
    """Own plain Sinkhorn in torch (float64, on the cost's device), over-relaxed."""
    return _torch_sinkhorn(_Scaling, cost[None], a[None], b[None], reg, max_iter, tol)[0]


@register("sinkhorn_torch_log", fallback="emd")
def _sinkhorn_torch_log(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, max_iter: int,
                        tol: float) -> RawPlan:
    """Own log-domain Sinkhorn in torch (float64, on the cost's device), over-relaxed."""
    return _torch_sinkhorn(_Log, cost[None], a[None], b[None], reg, max_iter, tol)[0]


_BATCHED = {"sinkhorn_torch": _Scaling, "sinkhorn_torch_log": _Log}

# ----------------------------------------------------------------------------------------------------- driver


def _breakdown(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, str | None, bool]:
    """Relative L1 marginal error, why the plan is unusable (None if usable) and whether that is numerical."""
    rows, cols = plan.sum(1), plan.sum(0)  # entries are >= 0, so a NaN/inf entry shows in the sums
    if not bool(torch.isfinite(rows).all() and torch.isfinite(cols).all()):
        return math.inf, "non-finite entries", True
    if not bool((rows > 0).any()):
        return math.inf, "all-zero plan", True
    err = float(((rows - a).abs().sum() + (cols - b).abs().sum()) / a.sum())
    return err, (f"marginal error {err:.2g} > {BREAKDOWN_TOL:g}" if err > BREAKDOWN_TOL else None), False


def _marginals(cost: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    n, m = cost.shape[-2:]
    opts = {"dtype": torch.float64, "device": cost.device}
    a = torch.full((n,), 1 / n, **opts) if a is None else torch.as_tensor(a).to(**opts)
    b = torch.full((m,), 1 / m, **opts) if b is None else torch.as_tensor(b).to(**opts)
    if a.shape != (n,) or b.shape != (m,):
        raise ValueError(f"marginals a{tuple(a.shape)}, b{tuple(b.shape)} do not fit a {n}x{m} cost")
    for name, x in (("a", a), ("b", b)):
        if not bool(torch.isfinite(x).all()) or bool((x < 0).any()) or float(x.sum()) <= 0:
            raise ValueError(f"marginal {name} must be finite, non-negative and have positive mass")
    if abs(float(a.sum() - b.sum())) > 1e-6 * float(a.sum()):
        raise ValueError(f"marginals have different mass: sum(a)={float(a.sum())}, sum(b)={float(b.sum())}")
    return a, b


def _check_cost(cost: torch.Tensor) -> torch.Tensor:
    if cost.dim() < 2 or 0 in cost.shape:
        raise ValueError(f"cost must be a non-empty matrix, got shape {tuple(cost.shape)}")
    cost = cost.detach().to(torch.float64)
    if not math.isfinite(float(cost.sum())):  # cheaper than isfinite(); only overflow gives a false alarm
        raise ValueError("cost has NaN or inf entries")
    return cost


def _sharpness(plan: torch.Tensor) -> float:
    rows = plan.sum(1)
    keep = rows > 0
    return float((plan.amax(1)[keep] / rows[keep]).mean()) if bool(keep.any()) else 0.0


def _pick(method: str, a: torch.Tensor, b: torch.Tensor, exact_fast: bool) -> str:
    if method not in SOLVERS:
        raise ValueError(f"unknown OT method {method!r}; known: {sorted(SOLVERS)}")
    if method == "emd" and exact_fast and len(a) == len(b) and _is_uniform(a) and _is_uniform(b):
        return "lsa"
    return method


def _finish(raw: RawPlan, method: str, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float,
            max_iter: int, tol: float, exact_fast: bool, cost_range: tuple[float, float],
            history: list[str]) -> tuple[torch.Tensor, PlanInfo]:
    """Check a solver's plan; on breakdown warn and continue down the fallback chain."""
    notes = history + [f"{method}: {s}" for s in raw.notes]
    err, reason, numerical = _breakdown(raw.plan, a, b)
    if reason is None:
        exact = method in ("emd", "lsa")
        converged = err <= (1e-9 if exact else tol * 1.01)
        if not converged:
            notes.append(f"{method}: not converged, marginal error {err:.2g} after {raw.iterations} iterations")
        info = PlanInfo(method, 0 if exact else raw.iterations, converged, _sharpness(raw.plan), cost_range, notes)
        return raw.plan, info
    if method in ("emd", "lsa"):
        raise RuntimeError(f"exact OT solver {method!r} failed ({reason}); notes: {notes}")
    nxt = _pick(FALLBACK.get(method, "emd") if numerical or raw.numerical else "emd", a, b, exact_fast)
    msg = f"OT solver {method!r} broke down at reg={reg:g} ({reason}); falling back to {nxt!r}"
    warnings.warn(msg, OTFallbackWarning, stacklevel=3)
    raw = SOLVERS[nxt](cost, a, b, reg=reg, max_iter=max_iter, tol=tol)
    return _finish(raw, nxt, cost, a, b, reg, max_iter, tol, exact_fast, cost_range, notes + [msg])


def solve(cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
          method: str = "sinkhorn_torch", reg: float = 0.06, max_iter: int = 1000, tol: float = 1e-6,
          exact_fast: bool = True) -> tuple[torch.Tensor, PlanInfo]:
    """Transport plan P (n x m, float64, rows sum to a, columns to b; uniform marginals by default).

    The cost is min-max normalised first, so ``reg`` is relative to its range. method: "emd" (``ot.emd``; with
    ``exact_fast`` a square uniform problem uses "lsa", the same permutation ~2x faster), "lsa", "sinkhorn"
    (``ot.sinkhorn``), "sinkhorn_log" (POT log-domain), "sinkhorn_torch" (default: own over-relaxed torch
    Sinkhorn, on the cost's device) or "sinkhorn_torch_log". ``tol`` bounds the relative L1 marginal error.
    A broken plan triggers an ``OTFallbackWarning`` and the next solver (log-domain, then EMD).
    """
    cost = _check_cost(cost)
    if cost.dim() != 2:
        raise ValueError(f"solve takes one n x m cost, got shape {tuple(cost.shape)}; see solve_batch")
    a, b = _marginals(cost, a, b)
    cost_range = (float(cost.min()), float(cost.max()))
    norm = normalise_cost(cost)
    rows, cols = a > 0, b > 0
    if not bool(rows.all() and cols.all()):  # zero-mass rows/columns: solve on the support, embed
        plan, info = solve(norm[rows][:, cols], a[rows], b[cols], method=method, reg=reg, max_iter=max_iter,
                           tol=tol, exact_fast=exact_fast)
        full = torch.zeros_like(norm)
        full[rows.nonzero()[:, 0][:, None], cols.nonzero()[:, 0][None, :]] = plan
        info.cost_range, info.sharpness = cost_range, _sharpness(full)
        return full, info
    method = _pick(method, a, b, exact_fast)
    raw = SOLVERS[method](norm, a, b, reg=reg, max_iter=max_iter, tol=tol)
    return _finish(raw, method, norm, a, b, reg, max_iter, tol, exact_fast, cost_range, [])


def solve_batch(costs: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
                method: str = "sinkhorn_torch", reg: float = 0.06, max_iter: int = 1000, tol: float = 1e-6,
                exact_fast: bool = True) -> tuple[torch.Tensor, list[PlanInfo]]:
    """Many same-sized problems at once: costs (k x n x m) -> plans (k x n x m), one PlanInfo each.

    Each cost is normalised on its own; a (n,) and b (m,) are shared. The torch Sinkhorns run as one batched
    iteration (bmm); other methods, and problems that break down, go through ``solve`` one by one.
    """
    costs = _check_cost(costs)
    if costs.dim() != 3:
        raise ValueError(f"solve_batch takes k x n x m costs, got shape {tuple(costs.shape)}")
    a, b = _marginals(costs, a, b)
    kw = {"method": method, "reg": reg, "max_iter": max_iter, "tol": tol, "exact_fast": exact_fast}
    if method not in _BATCHED or not bool((a > 0).all() and (b > 0).all()):
        results = [solve(c, a, b, **kw) for c in costs]
        return torch.stack([p for p, _ in results]), [i for _, i in results]
    k = costs.shape[0]
    norm = normalise_cost(costs)
    raws = _torch_sinkhorn(_BATCHED[method], norm, a.expand(k, -1), b.expand(k, -1), reg, max_iter, tol)
    plans, infos = [], []
    for cost, cost_n, raw in zip(costs, norm, raws, strict=True):
        plan, info = _finish(raw, method, cost_n, a, b, reg, max_iter, tol, exact_fast,
                             (float(cost.min()), float(cost.max())), [])
        plans.append(plan)
        infos.append(info)
    return torch.stack(plans), infos
