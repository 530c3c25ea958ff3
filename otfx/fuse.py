"""Stage 5: fuse. Align every model to the anchor (the first) with transport maps, then average."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from otfx import checks
from otfx.align.activations import collect
from otfx.align.config import FusionConfig, FusionError
from otfx.align.maps import TransportMaps
from otfx.align.match import check_same_architecture
from otfx.align.orthogonal import StreamFallbackWarning
from otfx.align.rewrite import rewrite_params
from otfx.api import analyse
from otfx.infer.result import Inference
from otfx.select import select_and_fuse, should_select
from otfx.trace import Traced, eval_mode, main_output, trace


def _analysed(models, args, kwargs) -> list[Inference]:
    """Trace (if needed) and analyse each model; refuse one changed since it was traced or with NaN/inf."""
    out = []
    for i, m in enumerate(models):
        if isinstance(m, (Traced, Inference)):
            out.append(analyse(m))
        elif isinstance(m, nn.Module):
            if args is None:
                raise FusionError(f"model {i} ({type(m).__name__}) is not traced: pass args=(example inputs,) "
                                  "or otfx.trace(model, args) first")
            out.append(analyse(trace(m, args, kwargs, name=f"model {i} ({type(m).__name__})")))
        else:
            raise FusionError(f"model {i} is a {type(m).__name__}, not a torch.nn.Module or otfx.Traced")
        checks.check_traced_unchanged(out[-1].traced)
        checks.check_finite_params(out[-1], out[-1].traced.name)
    return out


def _check_inputs(inferences: list[Inference]) -> None:
    anchor = inferences[0]
    for other in inferences[1:]:
        check_same_architecture(anchor, other)
        if _same_inputs(anchor.traced, other.traced):
            continue  # traced on these very inputs: they fit it as they fit its trace (one forward pass saved)
        try:
            with torch.no_grad(), eval_mode(other.traced.model) as model:
                other.traced.main_output(model(*anchor.traced.args, **anchor.traced.kwargs))
        except Exception as err:  # noqa: BLE001 - any failure means the anchor's inputs do not fit
            raise FusionError(f"the anchor's example inputs do not fit {other.traced.name}: {err}") from err


def _same_inputs(anchor: Traced, other: Traced) -> bool:
    """Whether ``other`` was traced on inputs equal to the anchor's (same structure, equal tensors off the meta
    device, equal other values)."""
    from torch.utils._pytree import tree_flatten

    leaves_a, spec_a = tree_flatten((anchor.args, anchor.kwargs))
    leaves_b, spec_b = tree_flatten((other.args, other.kwargs))
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.is_meta or y.is_meta:
                return False
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif type(x) is not type(y) or not _equal(x, y):
            return False
    return True


def _equal(x, y) -> bool:
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 - an array or an object without a truth value: not known to be equal
        return False


def _write(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for fqn, value in values.items():
            params[fqn].copy_(value.to(params[fqn].dtype))
    return model


def _blend_into(dest: torch.Tensor, acc: torch.Tensor | None, anchor: torch.Tensor, w_anchor: float,
                value: torch.Tensor, w_value: float, chunk: int = 1 << 22) -> None:
    """dest = (acc, or w_anchor * anchor) + w_value * value, summed in float64 ``chunk`` elements at a time
    (no float64 copy of a whole embedding table)."""
    if not dest.is_contiguous() or dest.numel() <= chunk:
        total = acc if acc is not None else anchor.to(torch.float64, copy=True).mul_(w_anchor)
        dest.copy_(total.add_(value, alpha=w_value))
        return
    dest_flat, value_flat, anchor_flat = dest.view(-1), value.reshape(-1), anchor.reshape(-1)
    acc_flat = acc.reshape(-1) if acc is not None else None
    for start in range(0, dest_flat.numel(), chunk):
        part = slice(start, start + chunk)
        total = acc_flat[part] if acc_flat is not None else anchor_flat[part].to(torch.float64, copy=True)
        if acc_flat is None:
            total.mul_(w_anchor)
        dest_flat[part].copy_(total.add_(value_flat[part], alpha=w_value))


def compute_maps(anchor: Inference, other: Inference, config: FusionConfig, data=None,
                 timings: dict[str, float] | None = None, release: bool = False,
                 fallback: str | None = None) -> TransportMaps:
    """Transport maps from ``other`` to ``anchor`` (evaluated by the rewrite); the activations the
    configuration reads are collected first, in one batched pass per model (their time is added to
    ``timings["collect"]``). ``release``: drop each plan once the rewrite no longer needs it. ``fallback``: see
    ``TransportMaps``."""
    maps = TransportMaps(anchor, other, config, fallback=fallback)
    maps.release = release
    if data is not None:
        wanted = maps.activation_nodes()
        if wanted:
            t0 = time.perf_counter()
            maps.acts.anchor = collect(anchor.traced, data, wanted, config.tokens)
            maps.acts.other = collect(other.traced, data, wanted, config.tokens)
            if timings is not None:
                timings["collect"] = timings.get("collect", 0.0) + time.perf_counter() - t0
    return maps


def fuse(*models, args: tuple | None = None, kwargs: dict | None = None, data=None,
         config: FusionConfig | None = None, progress: Callable[[list], Iterable] | None = None,
         **options) -> nn.Module:
    """Fuse two or more transformers of one architecture into one model of the anchor's (the first's) shapes.

    Every other model is aligned to the anchor with transport maps computed over the map graph, then the
    parameters are averaged with ``weights`` (uniform by default). ``options`` are the fields of
    :class:`FusionConfig` (``cost``, ``solver``, ``reg``, ``residual``, ``heads``, ``qk``, ``tokens``,
    ``weights``, ``max_iter``, ``repair``, ``anchor_free``, ``select``), over ``config`` or the defaults. ``data``:
    batches of inputs for activation costs and repair; with it, the options left None are chosen among a few
    candidates by how well each fused model agrees with the parents on ``data`` (``select``, no labels).
    ``progress``: wraps the selection's list of candidates as it is fused, e.g. ``tqdm.tqdm`` (None: silent).
    Returns a new module; the inputs are not modified.
    ``fused.otfx_report`` holds per-map statistics and stage timings.
    """
    data = list(data) if data is not None else None
    given = FusionConfig.make(config, **options)
    config = given.resolved(data is not None, len(models))
    config.validate(len(models), data is not None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    inferences = _analysed(models, args, kwargs)
    _check_inputs(inferences)
    timings["trace_and_infer"] = time.perf_counter() - start
    if should_select(given, data is not None):
        result = select_and_fuse([i.traced for i in inferences], data, given, fuse, progress)
        fused = result.best_model
        timings["total"] = time.perf_counter() - start
        fused.otfx_report = {**fused.otfx_report, "selection": result.to_dict(),
                             "timings": {**fused.otfx_report.get("timings", {}), "selection": result.timings,
                                         "total": timings["total"]}}
        return fused
    if config.anchor_free:
        from otfx.align.barycentre import anchor_free_fuse

        fused = anchor_free_fuse(*[i.traced for i in inferences], weights=config.weights,
                                 data=data if config.maps_need_data() else None, cost=config.cost,
                                 tokens=config.tokens)
        stats, aligned = [], fused.otfx_aligned
    else:
        with warnings.catch_warnings():
            auto = given.residual is None  # the automatic choice: the paper's mean where no stream can rotate
            if auto:
                warnings.simplefilter("ignore", StreamFallbackWarning)
            fused, stats = _fuse_to_anchor(inferences, config, data, timings, "mean" if auto else None)
        aligned = None
    if config.repair:
        from otfx.align.repair import repair

        t0 = time.perf_counter()
        fused = repair(fused, [i.traced for i in inferences], data, config.weights, aligned=aligned)
        timings["repair"] = time.perf_counter() - t0
    if config.refit:
        t0 = time.perf_counter()
        fused = refit_fused(fused, [i.traced for i in inferences], config, data, aligned)
        timings["refit"] = time.perf_counter() - t0
    checks.check_finite_params(fused, "the fused model", error=checks.NonFiniteError)
    timings["total"] = time.perf_counter() - start
    fused.otfx_report = {"config": vars(config), "maps": stats, "timings": timings}
    return fused


def refit_fused(fused: nn.Module, traced: list[Traced], config: FusionConfig, data, aligned: list | None = None,
                targets: dict | None = None) -> nn.Module:
    """``fused`` refitted as ``fuse`` refits it: towards ``aligned`` (the anchor-free fusion's own aligned
    models) or else ``refit_targets``; ``targets``, a cache of those by what they depend on, shared by calls."""
    from otfx.align.refit import refit

    if aligned is None:
        key = (config.cost, config.residual == "orthogonal", repr(config.tokens))
        cache = targets if targets is not None else {}
        if key not in cache:
            cache[key] = refit_targets(traced, config, data)
        aligned = cache[key]
    return refit(fused, traced, data, config.weights, aligned=aligned)


def refit_targets(inferences: list, config: FusionConfig, data) -> list:
    """The parents in the anchor's spaces for the refit's targets, by a function-preserving alignment with the
    fusion's cost and its kind of stream map: rotated streams where the fusion rotated them (on the BERT pair,
    permuted targets for a rotated fusion cost 0.13 nats of test loss after the refit), permuted otherwise."""
    traced = [i.traced if isinstance(i, Inference) else i for i in inferences]
    anchor = traced[0]
    residual = "orthogonal" if config.residual == "orthogonal" else "shared"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StreamFallbackWarning)
        return [anchor] + [align(t, to=anchor, data=data, cost=config.cost, tokens=config.tokens,
                                 residual=residual) for t in traced[1:]]


def _fuse_to_anchor(inferences: list[Inference], config: FusionConfig, data,
                    timings: dict[str, float], fallback: str | None = None) -> tuple[nn.Module, list[dict]]:
    """The anchor's copy with every parameter the weighted mean of the models aligned to the anchor."""
    anchor = inferences[0]
    weights_n = config.model_weights(len(inferences))
    fused = copy.deepcopy(anchor.traced.model)
    fused_params = dict(fused.named_parameters(remove_duplicate=False))
    # float64 sums, one tensor at a time: w0 * anchor + w1 * aligned_1 + ...; with two models no tensor outlives
    # its own rewrite, with more the partial sums wait for the next model
    partial: dict[str, torch.Tensor] = {}
    stats = []
    last = len(inferences) - 1
    for k, other in enumerate(inferences[1:], start=1):
        t0 = time.perf_counter()
        maps = compute_maps(anchor, other, config, data, timings, release=True, fallback=fallback)

        # the anchor as the maps see it (with residual="orthogonal", its norms' gains folded)
        anchor_params = maps.params_anchor

        def sink(fqn: str, value: torch.Tensor, k: int = k, anchor_params=anchor_params) -> None:
            acc = partial.pop(fqn, None)
            if k == last:
                _blend_into(fused_params[fqn], acc, anchor_params[fqn].detach(), weights_n[0], value, weights_n[k])
            else:
                if acc is None:
                    acc = anchor_params[fqn].detach().to(torch.float64, copy=True).mul_(weights_n[0])
                partial[fqn] = acc.add_(value, alpha=weights_n[k])

        with torch.no_grad():
            rewrite_params(maps, sink)
        timings[f"align_model_{k}"] = time.perf_counter() - t0
        for stage, seconds in maps.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        stats.extend({"model": k, **vars(s)} for s in maps.stats)
        del maps
    return fused, stats


def align(model, to, *, args: tuple | None = None, kwargs: dict | None = None, data=None,
          config: FusionConfig | None = None, **options) -> nn.Module:
    """``model`` rewritten into the spaces of ``to`` (its transport maps applied, nothing averaged).

    The defaults (:meth:`FusionConfig.alignment`: EMD, one map per residual stream, head-aware, tied q/k) make
    every map a permutation that respects the model's symmetries, so the result computes the same function as
    ``model`` when widths match. ``options``: fields of :class:`FusionConfig`, as for ``fuse``.
    """
    data = list(data) if data is not None else None
    config = FusionConfig.make(config or FusionConfig.alignment(), **options).resolved(data is not None)
    config.validate(2, data is not None)
    anchor, other = _analysed([to, model], args, kwargs)
    _check_inputs([anchor, other])
    maps = compute_maps(anchor, other, config, data)
    result = copy.deepcopy(anchor.traced.model)
    params = dict(result.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        rewrite_params(maps, lambda fqn, value: params[fqn].copy_(value))
    result.otfx_report = {"config": vars(config), "maps": [vars(s) for s in maps.stats]}
    return result


def _modules(models) -> list[nn.Module]:
    """The modules of models given as modules, ``Traced`` or ``Inference``; NaN/inf parameters refused."""
    modules = [m.model if isinstance(m, Traced) else m.traced.model if isinstance(m, Inference) else m
               for m in models]
    for i, m in enumerate(modules):
        checks.check_finite_params(m, f"model {i} ({type(m).__name__})")
    return modules


def vanilla_fuse(*models, args: tuple | None = None, kwargs: dict | None = None, weights=None) -> nn.Module:
    """Plain parameter averaging, the baseline (models of identical shapes only)."""
    if len(models) < 2:
        raise FusionError(f"fusion needs at least two models, got {len(models)}")
    modules = _modules(models)
    config = FusionConfig.make(weights=weights)
    config.validate(len(models), False)
    w = config.model_weights(len(models))
    states = [dict(m.named_parameters()) for m in modules]
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != states[0].keys():
            raise FusionError(f"model {i} has different parameters from the anchor; vanilla fusion needs identical "
                              "architectures")
        for fqn, p in state.items():
            if p.shape != states[0][fqn].shape:
                raise FusionError(f"{fqn} is {tuple(p.shape)} in model {i} but {tuple(states[0][fqn].shape)} in the "
                                  "anchor; vanilla fusion needs identical shapes (use otfx.fuse)")
    values = {fqn: sum(wk * s[fqn].detach().double() for wk, s in zip(w, states)) for fqn in states[0]}
    return _write(copy.deepcopy(modules[0]), values)


class Ensemble(nn.Module):
    """Averages the main outputs of several models (the other baseline)."""

    def __init__(self, models: list[nn.Module], weights: list[float], outputs: list | None = None):
        """``outputs``: each member's output selector (see ``otfx.trace``), None for the default choice."""
        super().__init__()
        self.members = nn.ModuleList(models)
        self.weights = weights
        self.outputs = outputs or [None] * len(models)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return sum(w * main_output(m(*args, **kwargs), output)
                   for w, m, output in zip(self.weights, self.members, self.outputs))


def ensemble(*models, weights=None) -> nn.Module:
    """An output ensemble of the models (weighted mean of their logits)."""
    modules = _modules(models)
    config = FusionConfig.make(weights=weights)
    config.validate(len(models), False)
    outputs = [m.output if isinstance(m, Traced) else m.traced.output if isinstance(m, Inference) else None
               for m in models]
    return Ensemble([copy.deepcopy(m) for m in modules], config.model_weights(len(models)), outputs)
