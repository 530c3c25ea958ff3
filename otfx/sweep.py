"""Choose fusion options on validation data: fuse over a grid of ``FusionConfig`` options, score every fused model
(and the parents, vanilla averaging and the output ensemble) and keep the best."""

from __future__ import annotations

import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from otfx.align.config import FusionConfig, FusionError, choices
from otfx.fuse import align, ensemble, vanilla_fuse
from otfx.fuse import fuse as _fuse
from otfx.infer.result import Inference
from otfx.trace import Traced, main_output, trace

#: regularisations of the default grid: around the defaults (0.06 without repair, 0.25 with it)
DEFAULT_REGS = (0.03, 0.06, 0.1, 0.25)
#: which way each built-in metric is better
METRICS = {"accuracy": True, "loss": False}
#: failures of one combination that end that row only (a solver underflow, a layer the options cannot align)
_ROW_ERRORS = (ValueError, ArithmeticError, RuntimeError)


def uses_reg(solver: str) -> bool:
    """Whether a registered solver reads ``reg`` (its signature names it; EMD and LSA take none)."""
    from otfx.align.solvers import SOLVERS

    fn = SOLVERS.get(solver)
    return fn is None or "reg" in inspect.signature(fn).parameters


def default_grid(has_data: bool, solver: str | None = None) -> dict[str, tuple]:
    """Every registered cost x every registered residual policy x (``solver`` over ``DEFAULT_REGS``, and EMD
    once) x repair off and, with data, on. Combinations a configuration refuses (a cost that reads activations
    without data) are skipped by the sweep with the reason."""
    solver = solver or FusionConfig().solver
    allowed = choices()
    solvers = (solver,) if solver == "emd" else (solver, "emd")
    return {"cost": allowed["cost"], "residual": allowed["residual"], "solver": solvers, "reg": DEFAULT_REGS,
            "repair": (False, True) if has_data else (False,)}


def combinations(grid: Mapping[str, Sequence] | Sequence[Mapping], solver: str | None = None) -> list[dict]:
    """The option dicts of a grid, in order, repair varying fastest (the sweep reuses an alignment for its
    repaired copy). A mapping is a product of axes; a sequence lists the combinations. A solver that reads no
    ``reg`` (EMD) gets ``reg=None`` and its duplicates are dropped: EMD is one entry, not one per reg."""
    if isinstance(grid, Mapping):
        axes = [k for k in grid if k != "repair"] + (["repair"] if "repair" in grid else [])
        values = []
        for axis in axes:
            v = grid[axis]
            v = list(v) if isinstance(v, (list, tuple, set, frozenset, range)) else [v]
            if not v:
                raise FusionError(f"grid axis {axis!r} has no values")
            values.append(v)
        combos = [dict(zip(axes, c)) for c in itertools.product(*values)]
    else:
        if isinstance(grid, (str, bytes)) or not all(isinstance(c, Mapping) for c in grid):
            raise FusionError("grid must map options to values ({'reg': [0.03, 0.1]}) or list option dicts "
                              f"([{{'reg': 0.1}}, {{'solver': 'emd'}}]), got {grid!r:.80}")
        combos = [dict(c) for c in grid]
        if not combos:
            raise FusionError("the grid lists no combinations")
    out, seen = [], set()
    for combo in combos:
        if "reg" in combo and not uses_reg(combo.get("solver", solver or FusionConfig().solver)):
            combo["reg"] = None
        key = repr(sorted(combo.items()))
        if key not in seen:
            seen.add(key)
            out.append(combo)
    return out


@dataclass
class SweepRow:
    """One combination of the grid: its options, the configuration it resolves to and how it fared."""

    options: dict  # the swept values (an axis -> its value here); reg None for a solver without one
    config: FusionConfig  # every option, automatic choices made (reg, repair)
    status: str = "ok"  # "ok", "skipped" (the configuration is refused) or "failed" (fusion raised)
    score: float | None = None
    reason: str | None = None
    seconds: float = 0.0  # fusion time of this row (a repaired row reusing its unrepaired twin: the repair only)
    reused_alignment: bool = False

    def as_dict(self, metric: str = "score") -> dict:
        out = {**self.options, metric: self.score, "status": self.status, "seconds": round(self.seconds, 3)}
        if self.reason:
            out["reason"] = self.reason
        if self.reused_alignment:
            out["reused_alignment"] = True
        return out

    def label(self) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in self.options.items() if v is not None)


@dataclass
class SweepResult:
    """What ``sweep`` found: every row, the best one and its model, and the baselines on the same data."""

    rows: list[SweepRow]
    metric: str
    higher_is_better: bool
    best: SweepRow
    best_model: nn.Module
    parents: list[float]  # each input model, in the order given (the anchor first)
    vanilla: float | None  # plain weight averaging; None when it cannot be built (widths differ)
    ensemble: float | None  # the output ensemble
    notes: dict[str, str] = field(default_factory=dict)  # why a baseline is missing
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def best_config(self) -> FusionConfig:
        return self.best.config

    def scored(self) -> list[SweepRow]:
        return [r for r in self.rows if r.status == "ok"]

    def axes(self) -> list[str]:
        names: list[str] = []
        for r in self.rows:
            names += [k for k in r.options if k not in names]
        return names

    def baselines(self, names: Sequence[str] | None = None) -> dict[str, float]:
        names = list(names) if names is not None else [f"model {i}" for i in range(len(self.parents))]
        out = dict(zip(names, self.parents))
        for name, value in (("vanilla fusion", self.vanilla), ("ensemble", self.ensemble)):
            if value is not None:
                out[name] = value
        return out

    def table(self, names: Sequence[str] | None = None) -> str:
        """The rows tried (skipped ones counted by reason), then the parents, vanilla fusion and the ensemble."""
        axes = self.axes()
        cells = [[_fmt(r.options.get(a)) for a in axes] for r in self.rows]
        width = [max([len(a)] + [len(c[i]) for c in cells]) for i, a in enumerate(axes)]
        head = "  ".join(f"{a:>{w}}" for a, w in zip(axes, width)) + f"  {self.metric:>10}  {'time (s)':>8}"
        lines = [head, "-" * len(head)]
        skipped: dict[str, int] = {}
        for r, c in zip(self.rows, cells):
            if r.status == "skipped":
                skipped[r.reason or "?"] = skipped.get(r.reason or "?", 0) + 1
                continue
            value = f"{r.score:.4f}" if r.status == "ok" else "failed"
            mark = "  <- best" if r is self.best else (f"  ({r.reason})" if r.reason else "")
            lines.append("  ".join(f"{x:>{w}}" for x, w in zip(c, width)) + f"  {value:>10}  {r.seconds:>8.2f}{mark}")
        for reason, count in skipped.items():
            lines.append(f"skipped {count}: {reason}")
        lines.append("")
        for name, value in self.baselines(names).items():
            kind = "baseline" if name in ("vanilla fusion", "ensemble") else "input"
            lines.append(f"{kind:>10}  {value:>10.4f}  {name}")
        for name, why in self.notes.items():
            lines.append(f"{'baseline':>10}  {'-':>10}  {name}: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "higher_is_better": self.higher_is_better,
                "rows": [r.as_dict(self.metric) for r in self.rows], "best": self.best.as_dict(self.metric),
                "best_config": vars(self.best.config), "parents": self.parents, "vanilla": self.vanilla,
                "ensemble": self.ensemble, "notes": self.notes, "timings": self.timings}


def sweep(*models, args: tuple | None = None, kwargs: dict | None = None, data=None,
          evaluate: Callable[[nn.Module], float] | None = None, val=None, metric: str | None = None,
          higher_is_better: bool | None = None, grid: Mapping[str, Sequence] | Sequence[Mapping] | None = None,
          fuse: Callable[..., nn.Module] | None = None, progress: Callable[[list], Iterable] | None = None,
          baselines: bool = True, **options) -> SweepResult:
    """Fuse ``models`` (the anchor first) once per combination of ``grid`` and keep the best on validation data.

    Score with ``evaluate(model) -> float`` (say ``metric=`` "accuracy"/"loss" or ``higher_is_better=``), or
    with ``val``: labelled batches ``[(inputs, labels), ...]`` scored by ``metric`` "accuracy" (the default) or
    "loss" (mean cross-entropy). ``data``: calibration inputs, as for ``otfx.fuse`` (activation costs, REPAIR).
    ``grid``: option -> values (their product) or a list of option dicts; default :func:`default_grid` (every
    registered cost and residual policy, Sinkhorn regs and EMD, repair off and on with data). ``options``: fixed
    ``FusionConfig`` options under the grid. A combination the configuration refuses is skipped with the reason;
    one whose fusion raises is recorded as failed; the others go on. Models are traced once (pass ``args`` for
    modules); with ``otfx.fuse`` a repaired row reuses the alignment of its unrepaired twin. ``fuse``: the fusion
    function (default ``otfx.fuse``), called as ``fuse(*models, data=data, **row_options)``. ``baselines=False``
    skips scoring the parents, vanilla averaging and the ensemble.
    """
    start = time.perf_counter()
    data = list(data) if data is not None else None
    has_data = data is not None
    score, metric, higher = _scorer(evaluate, val, metric, higher_is_better, models)
    if len(models) < 2:
        raise FusionError(f"a sweep needs at least two models, got {len(models)}")
    if fuse is None:
        options.setdefault("select", "off")  # every row fuses what the grid says, nothing chosen inside it
    if (fuse is None or fuse is _fuse) and options.get("refit") is None:
        options["refit"] = False  # otfx.fuse's rows refit only where the grid or the caller says so
    base = FusionConfig.make(**options)
    traced = [_traced(m, i, args, kwargs) for i, m in enumerate(models)]
    combos = combinations(grid if grid is not None else default_grid(has_data, base.solver), base.solver)
    _check_values(combos, base, len(models))
    timings = {"evaluate": 0.0, "fuse": 0.0}

    def timed_score(model: nn.Module) -> float:
        t0 = time.perf_counter()
        value = float(score(model, traced[0]))
        timings["evaluate"] += time.perf_counter() - t0
        return value

    t0 = time.perf_counter()
    parents = [timed_score(t.model) for t in traced] if baselines else []
    weights = base.weights
    baseline, notes = {}, {}
    for name, build in (("vanilla fusion", vanilla_fuse), ("ensemble", ensemble)) if baselines else ():
        try:
            baseline[name] = timed_score(build(*traced, weights=weights))
        except (FusionError, ValueError, RuntimeError) as err:  # vanilla fusion needs equal shapes: say so
            notes[name] = str(err).splitlines()[0][:200]
    timings["baselines"] = time.perf_counter() - t0

    fuse = fuse or _fuse
    share = fuse is _fuse and not base.anchor_free and has_data
    rows = [SweepRow(c, FusionConfig.make(base, **_given(c))) for c in combos]
    given_base = {k: v for k, v in options.items() if v is not None}
    best, best_model = None, None
    twin: tuple[str, nn.Module] | None = None  # the last unrepaired fusion, for its repaired copy
    aligned: list | None = None
    for row in progress(rows) if progress is not None else rows:
        try:
            row.config.validate(len(models), has_data)
        except FusionError as err:
            row.status, row.reason = "skipped", str(err).splitlines()[0]
            continue
        resolved = row.config.resolved(has_data, len(models))
        row.config = resolved
        call = {**given_base, **_given(row.options)}
        t0 = time.perf_counter()
        try:
            unrepaired = _alignment_key(resolved)
            if share and resolved.repair and not resolved.refit and twin is not None and twin[0] == unrepaired:
                from otfx.align.repair import repair

                if aligned is None:
                    aligned = [traced[0]] + [align(t, to=traced[0]) for t in traced[1:]]
                model = repair(twin[1], traced, data, resolved.weights, aligned=aligned)
                report = getattr(twin[1], "otfx_report", {})
                model.otfx_report = {**report, "config": vars(resolved), "reused_alignment": True,
                                     "timings": {**report.get("timings", {}), "repair": time.perf_counter() - t0}}
                row.reused_alignment = True
            else:
                model = fuse(*traced, data=data, **call)
                if share and not resolved.repair and not resolved.refit:
                    twin = (unrepaired, model)
        except _ROW_ERRORS as err:
            row.status = "failed"
            row.reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            continue
        finally:
            row.seconds = time.perf_counter() - t0
            timings["fuse"] += row.seconds
        value = timed_score(model)
        if not math.isfinite(value):
            row.status, row.reason = "failed", f"the score is not finite ({value})"
            continue
        row.score = value
        if best is None or (value > best.score if higher else value < best.score):
            best, best_model = row, model
    if best is None:
        reasons: dict[str, int] = {}
        for r in rows:
            reasons[r.reason or "?"] = reasons.get(r.reason or "?", 0) + 1
        raise FusionError(f"no combination of the {len(rows)} in the grid could be fused and scored: "
                          + "; ".join(f"{why} ({n}x)" for why, n in reasons.items()))
    timings["total"] = time.perf_counter() - start
    return SweepResult(rows, metric, higher, best, best_model, parents, baseline.get("vanilla fusion"),
                       baseline.get("ensemble"), notes, {k: round(v, 3) for k, v in timings.items()})


def _check_values(combos: list[dict], base: FusionConfig, n_models: int) -> None:
    """A grid value wrong on its own (a typo, reg <= 0) is an error, not a skipped row."""
    seen = set()
    for combo in combos:
        for axis, value in combo.items():
            if value is None or (axis, repr(value)) in seen:
                continue
            seen.add((axis, repr(value)))
            try:
                FusionConfig.make(base, **{axis: value}).validate(n_models, True)
            except FusionError as err:
                raise FusionError(f"grid {axis}={value!r}: {err}") from None


def _alignment_key(config: FusionConfig) -> str:
    """What the transport maps depend on: everything but repair (and reg for a solver that reads none)."""
    return repr(vars(replace(config, repair=False, reg=config.reg if uses_reg(config.solver) else None)))


def _given(options: Mapping) -> dict:
    return {k: v for k, v in options.items() if v is not None}


def _traced(model, i: int, args, kwargs) -> Traced:
    """Each model traced once for the whole sweep."""
    if isinstance(model, Traced):
        return model
    if isinstance(model, Inference):
        return model.traced
    if isinstance(model, nn.Module):
        if args is None:
            raise FusionError(f"model {i} ({type(model).__name__}) is not traced: pass args=(example inputs,) "
                              "or otfx.trace(model, args) first")
        return trace(model, args, kwargs, name=f"model {i} ({type(model).__name__})")
    raise FusionError(f"model {i} is a {type(model).__name__}, not a torch.nn.Module or otfx.Traced")


def _scorer(evaluate, val, metric, higher_is_better, models):
    """(score(model, anchor) -> float, metric name, higher is better) from the ways a caller can say it."""
    if (evaluate is None) == (val is None):
        raise FusionError("a sweep scores on validation data: pass evaluate=callable(model) -> float, or "
                          "val=[(inputs, labels), ...] with metric='accuracy' or 'loss' (one of the two)")
    if evaluate is not None:
        if not callable(evaluate):
            raise FusionError(f"evaluate must be a callable(model) -> float, got {type(evaluate).__name__}")
        if higher_is_better is None:
            if metric not in METRICS:
                raise FusionError("evaluate=: say which way is better, higher_is_better=True (accuracy) or False "
                                  f"(a loss), or metric= one of {', '.join(METRICS)}")
            higher_is_better = METRICS[metric]
        return (lambda model, anchor: evaluate(model)), metric or "score", bool(higher_is_better)
    metric = metric or "accuracy"
    if metric not in METRICS:
        raise FusionError(f"metric={metric!r} with val= is not one of {', '.join(METRICS)}; pass evaluate= for "
                          "another metric")
    if higher_is_better is not None and bool(higher_is_better) != METRICS[metric]:
        raise FusionError(f"higher_is_better={higher_is_better} contradicts metric={metric!r}")
    batches = list(val)
    if not batches:
        raise FusionError("val is empty: give at least one (inputs, labels) batch")
    for i, b in enumerate(batches):
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[1], torch.Tensor)):
            raise FusionError(f"val batch {i} is not an (inputs, labels) pair with a labels tensor")
    return (lambda model, anchor: score_batches(model, batches, metric, anchor.output)), metric, METRICS[metric]


def score_batches(model: nn.Module, batches: Sequence, metric: str = "accuracy", output=None) -> float:
    """Accuracy or mean cross-entropy of ``model`` over ``[(inputs, labels), ...]`` (inputs a tensor or a tuple
    of tensors; the model's main output, chosen by ``output`` as in ``otfx.trace``, must be (batch, classes))."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i, (inputs, labels) in enumerate(batches):
                inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
                out = main_output(model(*inputs), output)
                if out.ndim != 2 or out.shape[0] != labels.shape[0]:
                    raise FusionError(f"val batch {i}: the model outputs shape {tuple(out.shape)} for "
                                      f"{labels.shape[0]} labels; scoring needs (batch, classes) logits")
                if metric == "accuracy":
                    total += float((out.argmax(-1) == labels).sum())
                else:
                    total += float(torch.nn.functional.cross_entropy(out.double(), labels, reduction="sum"))
                count += len(labels)
    finally:
        model.train(was)
    return total / max(count, 1)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


__all__ = ["DEFAULT_REGS", "SweepResult", "SweepRow", "combinations", "default_grid", "score_batches", "sweep",
           "uses_reg"]
