"""Transport-plan solvers: exact (EMD, LSA) and entropic (Sinkhorn) OT on min-max normalised costs.

Every solver shares one signature and is found by name in ``SOLVERS``. ``solve`` checks each plan and falls back
(plain Sinkhorn -> log-domain Sinkhorn -> EMD) instead of returning a broken one.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

BREAKDOWN_TOL = 1e-3  # relative L1 marginal error above which a plan is rejected
EMD_MAX_ITER = 10_000_000  # network-simplex iterations; POT's 1e5 default can stop early at n >= 3072
BATCH_BYTES = 16_000_000  # solve_batch iterates this many bytes of kernels at once (8-16 MB was fastest)


class OTFallbackWarning(UserWarning):
    """A solver broke down (zero, non-finite or unconverged plan) and another one was used."""


class OTNotConvergedWarning(UserWarning):
    """A Sinkhorn plan stopped at ``max_iter`` before its marginals met ``tol``; it was kept (close enough to
    use) and ``PlanInfo.converged`` is False."""


@dataclass
class PlanInfo:
    method: str  # the solver actually used (after any fallback)
    iterations: int  # 0 for exact solvers
    converged: bool  # the marginals met ``tol`` (exact solvers: always, unless they failed)
    sharpness: float  # mean over rows of max(P_i.)/sum(P_i.): 1 = permutation-like, 1/m = uniform
    cost_range: tuple[float, float]  # (min, max) of the raw cost before normalisation
    warnings: list[str] = field(default_factory=list)
    fallback: str | None = None  # the solver that was asked for, when another one produced the plan
    marginal_error: float = 0.0  # relative L1 marginal error of the returned plan


@dataclass
class RawPlan:
    """What a registered solver returns; ``solve`` turns it into a checked plan and a PlanInfo."""

    plan: torch.Tensor
    iterations: int = 0
    notes: list[str] = field(default_factory=list)
    numerical: bool = False  # the solver hit under/overflow (as opposed to running out of iterations)


# solver(cost, a, b, reg=, max_iter=, tol=): cost is normalised float64 (n x m) and the solver's to overwrite;
# a and b are positive float64 with equal sums.
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
    return _normalise(cost, cost.amin(dim=(-2, -1), keepdim=True), cost.amax(dim=(-2, -1), keepdim=True))


def _normalise(cost: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # One fresh buffer (page faults on big new tensors cost more than the arithmetic), converted then shifted in
    # place: ``torch.sub`` of a float32 cost and a float64 ``lo`` converts into a hidden second buffer first.
    span = hi - lo
    out = cost.to(torch.promote_types(cost.dtype, lo.dtype), copy=True)
    return out.sub_(lo).div_(torch.where(span > 0, span, 1))  # constant: (cost - lo) is already 0


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
    rows = torch.as_tensor(rows, device=cost.device)
    plan[rows, torch.as_tensor(cols, device=cost.device)] = a[rows]  # = 1/n, bit-identical to ot.emd
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
# Both domains are batched (k x n x m, marginals k x n and k x m) and iterate on the row potential f = log u.
# ``sweep`` is one Sinkhorn iteration f -> G(f) (column update, then row update) and also returns the row sums
# of the plan at f, whose columns are exact, so the L1 row error is the whole marginal error at no extra cost.


class _Scaling:
    """Plain Sinkhorn: P = diag(u) K diag(v). Rows/columns are min-shifted first (same plan), so K has a 1 in
    every row and column and cannot produce the all-zero plan of the reference code."""

    def __init__(self, cost: torch.Tensor, reg: float, a: torch.Tensor, b: torch.Tensor) -> None:
        cost.sub_(cost.amin(2, keepdim=True))  # in place: a fresh big buffer costs more in page faults
        self.K = cost.sub_(cost.amin(1, keepdim=True)).mul_(-1 / reg).exp_()
        self.a, self.b, self.log_a = a, b, torch.log(a)

    def _v(self, u: torch.Tensor) -> torch.Tensor:
        return self.b / torch.bmm(u[:, None, :], self.K)[:, 0, :]

    def sweep(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.exp(f)
        kv = torch.bmm(self.K, self._v(u)[:, :, None])[:, :, 0]
        return self.log_a - torch.log(kv), u * kv

    def plan(self, f: torch.Tensor) -> torch.Tensor:
        u = torch.exp(f)
        v = self._v(u)
        return self.K.mul_(u[:, :, None]).mul_(v[:, None, :])  # the kernel is not needed any more


class _Log:
    """Log-domain Sinkhorn: never under/overflows, ~10x slower per iteration."""

    def __init__(self, cost: torch.Tensor, reg: float, a: torch.Tensor, b: torch.Tensor) -> None:
        self.S = cost.mul_(-1 / reg)
        self.a, self.log_a, self.log_b = a, torch.log(a), torch.log(b)

    def _g(self, f: torch.Tensor) -> torch.Tensor:
        return self.log_b - torch.logsumexp(self.S + f[:, :, None], 1)

    def sweep(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.logsumexp(self.S + self._g(f)[:, None, :], 2)
        return self.log_a - lse, torch.exp(f + lse)

    def plan(self, f: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.S + f[:, :, None] + self._g(f)[:, None, :])


def _sinkhorn_driver(dom: _Scaling | _Log, max_iter: int, tol: float,
                     memory: int = 15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Sinkhorn with Anderson acceleration: plans (k x n x m), iterations (k,), blew-up flags (k,).

    Near-permutation plans (structured costs at reg ~0.05) make plain Sinkhorn crawl: one slow mode needs
    thousands of iterations. Anderson mixing of the last ``memory`` sweeps (type II, as in Walker & Ni 2011)
    removes it in ~10-30 (memory 15 beat 5 and 10 on structured costs). Safeguard: an iterate that turns
    non-finite or 10x worse than the best one is replaced by the best one's plain sweep and the problem's
    history is forgotten; after 5 such rejections it runs plain. A plain sweep that under/overflows is a
    numerical breakdown. Returns the plan at the best iterate; problems of a batch are independent.
    """
    a = dom.a
    k, n = a.shape
    flags = torch.zeros(k, dtype=torch.bool, device=a.device)
    f = best_f = best_g = torch.zeros_like(a)
    best_err = torch.full((k,), math.inf, dtype=a.dtype, device=a.device)
    blew_up, plain_only, was_plain = flags, flags, ~flags
    rejects = torch.zeros(k, dtype=torch.long, device=a.device)
    tol_k, stops = tol * a.sum(1), []
    hist_g = hist_r = a[:, :, None][:, :, :0]  # k x n x (<= memory + 1) past sweeps and residuals
    for it in range(max_iter + 1):
        g, mass = dom.sweep(f)
        err = (mass - a).abs().sum(1)
        ok = torch.isfinite(err) & torch.isfinite(g).all(1)
        err = torch.where(ok, err, math.inf)
        blew_up = blew_up | (~ok & was_plain)  # under/overflow without acceleration: numerical
        better = err < best_err
        best_f, best_g = torch.where(better[:, None], f, best_f), torch.where(better[:, None], g, best_g)
        best_err = torch.where(better, err, best_err)
        stop = (err <= tol_k) | blew_up
        stops.append(stop)
        if it == max_iter or bool(stop.all()):
            break
        g = torch.where(ok[:, None], g, best_g)  # keep NaN/inf out of the history (blown-up problems)
        bad = ~stop & ~(err <= 10 * best_err)
        if bool(bad.any()):  # reject the accelerated iterate: restart from the best one, history forgotten
            f, g = torch.where(bad[:, None], best_f, f), torch.where(bad[:, None], best_g, g)
            hist_g = torch.where(bad[:, None, None], g[:, :, None], hist_g)  # equal columns: zero differences
            hist_r = torch.where(bad[:, None, None], (g - f)[:, :, None], hist_r)
            rejects = rejects + bad
            plain_only = plain_only | (rejects >= 5)
        keep = max(0, hist_r.shape[2] - memory)
        hist_g = torch.cat([hist_g[:, :, keep:], g[:, :, None]], 2)
        hist_r = torch.cat([hist_r[:, :, keep:], (g - f)[:, :, None]], 2)
        was_plain = plain_only | bad | (hist_r.shape[2] == 1)
        if hist_r.shape[2] == 1:
            f = torch.where(stop[:, None], f, g)
            continue
        d_r, d_g = hist_r.diff(dim=2), hist_g.diff(dim=2)  # k x n x mem
        gram = d_r.transpose(1, 2) @ d_r
        ridge = 1e-10 * gram.diagonal(dim1=1, dim2=2).mean(1) + 1e-300
        gram.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        gamma = torch.linalg.solve_ex(gram, d_r.transpose(1, 2) @ hist_r[:, :, -1:])[0]  # a bad step is caught
        mixed = g - (d_g @ gamma)[:, :, 0]
        f = torch.where(stop[:, None], f, torch.where(plain_only[:, None], g, mixed))
    done = torch.stack(stops + [~flags])  # sweeps done: 1 + first iteration that stopped
    return dom.plan(best_f), (done.int().argmax(0) + 1).clamp(max=max_iter), blew_up


def _torch_sinkhorn(domain: type[_Scaling] | type[_Log], cost: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor, reg: float, max_iter: int, tol: float) -> list[RawPlan]:
    """Run a torch domain on a batch (k x n x m) with marginals (k x n), (k x m); one RawPlan per problem."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans, iters, blew_up = _sinkhorn_driver(domain(cost, reg, a, b), max_iter, tol)
    raws = []
    for plan, it, bad in zip(plans, iters.tolist(), blew_up.tolist(), strict=True):
        notes = [f"scalings under/overflowed at iteration {it}; kept the best finite iterate"] if bad else []
        raws.append(RawPlan(plan, it, notes, bad))
    return raws


@register("sinkhorn_torch", fallback="sinkhorn_torch_log")
def _sinkhorn_torch(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, max_iter: int,
                    tol: float) -> RawPlan:
    """Own plain Sinkhorn in torch (float64, on the cost's device), Anderson-accelerated."""
    return _torch_sinkhorn(_Scaling, cost[None], a[None], b[None], reg, max_iter, tol)[0]


@register("sinkhorn_torch_log", fallback="emd")
def _sinkhorn_torch_log(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, max_iter: int,
                        tol: float) -> RawPlan:
    """Own log-domain Sinkhorn in torch (float64, on the cost's device), Anderson-accelerated."""
    return _torch_sinkhorn(_Log, cost[None], a[None], b[None], reg, max_iter, tol)[0]


BATCHED = {"sinkhorn_torch": _Scaling, "sinkhorn_torch_log": _Log}

# ----------------------------------------------------------------------------------------------------- driver


def _breakdown(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, str | None, bool, float]:
    """Relative L1 marginal error, why the plan is unusable (None if usable), whether that is numerical, and
    the plan's sharpness."""
    rows, cols = plan.sum(1), plan.sum(0)  # entries are >= 0, so a NaN/inf entry shows in the sums
    if not bool(torch.isfinite(rows).all() and torch.isfinite(cols).all()):
        return math.inf, "non-finite entries", True, 0.0
    keep = rows > 0
    if not bool(keep.any()):
        return math.inf, "all-zero plan", True, 0.0
    err = float(((rows - a).abs().sum() + (cols - b).abs().sum()) / a.sum())
    sharpness = float((plan.amax(1)[keep] / rows[keep]).mean())
    return err, (f"marginal error {err:.2g} > {BREAKDOWN_TOL:g}" if err > BREAKDOWN_TOL else None), False, sharpness


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
    if abs(float(a.sum() - b.sum())) > 1e-12 * float(a.sum()):  # ot.emd insists on equal masses (to 1e-7)
        b = b * (a.sum() / b.sum())
    return a, b


def _prepare(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised float64 cost and the raw per-problem (min, max) as float64 (k x 2); rejects NaN/inf."""
    if cost.dim() < 2 or 0 in cost.shape:
        raise ValueError(f"cost must be a non-empty matrix, got shape {tuple(cost.shape)}")
    cost = cost.detach()
    if not cost.is_floating_point():
        cost = cost.to(torch.float64)
    lo = cost.amin(dim=(-2, -1), keepdim=True).to(torch.float64)  # min/max propagate NaN
    hi = cost.amax(dim=(-2, -1), keepdim=True).to(torch.float64)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("cost has NaN or inf entries")
    return _normalise(cost, lo, hi), torch.stack([lo.flatten(), hi.flatten()], 1)


def _check_options(reg: float, max_iter: int, tol: float) -> None:
    """Refuse options no solver can use: reg must be positive and finite, max_iter at least 1."""
    if isinstance(reg, bool) or not isinstance(reg, numbers.Real) or not (math.isfinite(reg) and reg > 0):
        raise ValueError(f"reg must be a positive finite number, got {reg!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")


def _pick(method: str, a: torch.Tensor, b: torch.Tensor, exact_fast: bool) -> str:
    if method not in SOLVERS:
        raise ValueError(f"unknown OT method {method!r}; known: {sorted(SOLVERS)}")
    if method == "emd" and exact_fast and len(a) == len(b) and _is_uniform(a) and _is_uniform(b):
        return "lsa"
    return method


@dataclass
class _Job:
    """One problem on its way down the fallback chain."""

    fresh_cost: Callable[[], torch.Tensor]  # a new normalised cost (solvers may overwrite theirs)
    a: torch.Tensor
    b: torch.Tensor
    reg: float
    max_iter: int
    tol: float
    exact_fast: bool
    cost_range: tuple[float, float]
    asked: str = ""  # the method the caller asked for (after the lsa fast path)


def _finish(raw: RawPlan, method: str, job: _Job, history: list[str]) -> tuple[torch.Tensor, PlanInfo]:
    """Check a solver's plan; on breakdown warn and continue down the fallback chain."""
    notes = history + [f"{method}: {s}" for s in raw.notes]
    err, reason, numerical, sharpness = _breakdown(raw.plan, job.a, job.b)
    if reason is None and history and err > job.tol * 1.01:  # a fallback must converge, else on to EMD
        reason = f"fallback not converged (marginal error {err:.2g})"
    if reason is None:
        exact = method in ("emd", "lsa")
        converged = err <= (1e-9 if exact else job.tol * 1.01)
        if not converged:
            msg = f"{method}: not converged, marginal error {err:.2g} after {raw.iterations} iterations"
            notes.append(msg)
            warnings.warn(f"OT solver {msg} (max_iter={job.max_iter}, reg={job.reg:g}, tol={job.tol:g}); the plan "
                          "is kept; raise max_iter or reg", OTNotConvergedWarning, stacklevel=3)
        info = PlanInfo(method, 0 if exact else raw.iterations, converged, sharpness, job.cost_range, notes,
                        fallback=job.asked if method != job.asked else None, marginal_error=err)
        return raw.plan, info
    if method in ("emd", "lsa"):
        raise RuntimeError(f"exact OT solver {method!r} failed ({reason}); notes: {notes}")
    numerical = numerical or raw.numerical
    nxt = _pick(FALLBACK.get(method, "emd") if numerical else "emd", job.a, job.b, job.exact_fast)
    why = f"{reason}{', after under/overflow' if numerical and 'non-finite' not in reason else ''}"
    msg = f"OT solver {method!r} broke down at reg={job.reg:g} ({why}); falling back to {nxt!r}"
    warnings.warn(msg, OTFallbackWarning, stacklevel=3)
    raw = SOLVERS[nxt](job.fresh_cost(), job.a, job.b, reg=job.reg, max_iter=job.max_iter, tol=job.tol)
    return _finish(raw, nxt, job, notes + [msg])


def solve(cost: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
          method: str = "sinkhorn_torch", reg: float = 0.06, max_iter: int = 1000, tol: float = 1e-6,
          exact_fast: bool = True) -> tuple[torch.Tensor, PlanInfo]:
    """Transport plan P (n x m, float64, rows sum to a, columns to b; uniform marginals by default).

    The cost is min-max normalised first, so ``reg`` is relative to its range. method: "emd" (``ot.emd``; with
    ``exact_fast`` a square uniform problem uses "lsa", the same permutation ~2x faster), "lsa", "sinkhorn"
    (``ot.sinkhorn``), "sinkhorn_log" (POT log-domain), "sinkhorn_torch" (default: own Anderson-accelerated
    torch Sinkhorn, on the cost's device) or "sinkhorn_torch_log". ``tol`` bounds the relative L1 marginal error.
    A broken plan triggers an ``OTFallbackWarning`` and the next solver (log-domain, then EMD).
    """
    if cost.dim() != 2:
        raise ValueError(f"solve takes one n x m cost, got shape {tuple(cost.shape)}; see solve_batch")
    _check_options(reg, max_iter, tol)
    norm, lo_hi = _prepare(cost)
    a, b = _marginals(norm, a, b)
    cost_range = (float(lo_hi[0, 0]), float(lo_hi[0, 1]))
    rows, cols = a > 0, b > 0
    if not bool(rows.all() and cols.all()):  # zero-mass rows/columns: solve on the support, embed
        plan, info = solve(norm[rows][:, cols], a[rows], b[cols], method=method, reg=reg, max_iter=max_iter,
                           tol=tol, exact_fast=exact_fast)
        full = torch.zeros_like(norm)
        full[rows.nonzero()[:, 0][:, None], cols.nonzero()[:, 0][None, :]] = plan
        info.cost_range, info.sharpness = cost_range, _breakdown(full, a, b)[3]
        return full, info
    method = _pick(method, a, b, exact_fast)
    job = _Job(lambda: _prepare(cost)[0], a, b, reg, max_iter, tol, exact_fast, cost_range, method)
    return _finish(SOLVERS[method](norm, a, b, reg=reg, max_iter=max_iter, tol=tol), method, job, [])


def solve_batch(costs: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
                method: str = "sinkhorn_torch", reg: float = 0.06, max_iter: int = 1000, tol: float = 1e-6,
                exact_fast: bool = True) -> tuple[torch.Tensor, list[PlanInfo]]:
    """Many same-sized problems at once: costs (k x n x m) -> plans (k x n x m), one PlanInfo each.

    Each cost is normalised on its own; a (n,) and b (m,) are shared. The torch Sinkhorns iterate chunks of
    problems together (bmm; chunks of ~BATCH_BYTES stay in cache); square uniform exact problems ("emd" with
    ``exact_fast``, "lsa") are normalised a chunk at a time and matched by ``linear_sum_assignment`` (the plans
    ``solve`` gives); other methods, and problems that break down, go through ``solve`` / the fallback chain
    one by one.
    """
    if costs.dim() != 3 or 0 in costs.shape:
        raise ValueError(f"solve_batch takes non-empty k x n x m costs, got shape {tuple(costs.shape)}")
    k, n, m = costs.shape
    _check_options(reg, max_iter, tol)
    a, b = _marginals(costs, a, b)
    kw = {"method": method, "reg": reg, "max_iter": max_iter, "tol": tol, "exact_fast": exact_fast}
    if n == m and method in ("emd", "lsa") and (exact_fast or method == "lsa") and _is_uniform(a) and _is_uniform(b):
        return _lsa_batch(costs, a, b)
    if method not in BATCHED or not bool((a > 0).all() and (b > 0).all()):
        results = [solve(c, a, b, **kw) for c in costs]
        return torch.stack([p for p, _ in results]), [i for _, i in results]
    out = torch.empty(k, n, m, dtype=torch.float64, device=costs.device)
    infos: list[PlanInfo] = []
    per = max(1, BATCH_BYTES // (8 * n * m))
    for start in range(0, k, per):
        norm, lo_hi = _prepare(costs[start:start + per])
        kk = len(norm)
        raws = _torch_sinkhorn(BATCHED[method], norm, a.expand(kk, -1), b.expand(kk, -1), reg, max_iter, tol)
        for j, (raw, (lo, hi)) in enumerate(zip(raws, lo_hi.tolist(), strict=True)):
            job = _Job(lambda i=start + j: _prepare(costs[i])[0], a, b, reg, max_iter, tol, exact_fast, (lo, hi),
                       method)
            out[start + j], info = _finish(raw, method, job, [])
            infos.append(info)
    return out, infos


def _lsa_batch(costs: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, list[PlanInfo]]:
    """The "lsa" plans of many square uniform problems (what ``solve`` gives each, without its per-problem
    checks: a permutation plan cannot break down), normalised a chunk at a time."""
    k, n, _ = costs.shape
    plans = torch.zeros(k, n, n, dtype=torch.float64, device=costs.device)
    ranges: list[tuple[float, float]] = []
    per = max(1, BATCH_BYTES // (8 * n * n))
    for start in range(0, k, per):
        norm, lo_hi = _prepare(costs[start:start + per])
        ranges += [(lo, hi) for lo, hi in lo_hi.tolist()]
        for j, cost in enumerate(_np(norm)):
            rows, cols = linear_sum_assignment(cost)
            rows = torch.as_tensor(rows, device=costs.device)
            plans[start + j, rows, torch.as_tensor(cols, device=costs.device)] = a[rows]
    row_sums, col_sums = plans.sum(2), plans.sum(1)
    errs = (((row_sums - a).abs().sum(1) + (col_sums - b).abs().sum(1)) / a.sum()).tolist()
    sharpness = (plans.amax(2) / row_sums).mean(1).tolist()
    infos = [PlanInfo("lsa", 0, err <= 1e-9, sharp, cost_range, [], marginal_error=err)
             for err, sharp, cost_range in zip(errs, sharpness, ranges, strict=True)]
    return plans, infos
