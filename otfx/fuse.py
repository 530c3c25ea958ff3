"""Stage 5: fuse. Align every model to the anchor (the first) with transport maps, then average."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from otfx.align.activations import collect
from otfx.align.config import FusionConfig, FusionError
from otfx.align.maps import TransportMaps
from otfx.align.match import check_same_architecture
from otfx.align.rewrite import aligned_params, unique_params
from otfx.api import analyse
from otfx.infer.result import Inference
from otfx.trace import Traced, main_output, trace


def _analysed(models, args, kwargs) -> list[Inference]:
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
    return out


def _check_inputs(inferences: list[Inference]) -> None:
    anchor = inferences[0]
    for other in inferences[1:]:
        check_same_architecture(anchor, other)
        try:
            with torch.no_grad():
                other.traced.model.eval()
                main_output(other.traced.model(*anchor.traced.args, **anchor.traced.kwargs))
        except Exception as err:  # noqa: BLE001 - any failure means the anchor's inputs do not fit
            raise FusionError(f"the anchor's example inputs do not fit {other.traced.name}: {err}") from err


def _activations(anchor: Inference, other: Inference, maps: TransportMaps, data) -> None:
    """Collect, in one batched pass per model, the activations that the maps will read."""
    wanted: list[tuple[str, tuple[int, ...]]] = []
    for root in list(maps.producers) + [maps.root(s) for r in maps.combines.values() for s in r.inputs]:
        layer_nodes = [r.node for r in anchor.records if r.kind == "layer" and r.output is not None
                       and maps.root(r.output) == root]
        node = maps.activation_node(root, layer_nodes)
        if node is not None:
            wanted.append(node)
    maps.acts_anchor = collect(anchor.traced, data, wanted, maps.config.tokens)
    maps.acts_other = collect(other.traced, data, wanted, maps.config.tokens)


def _write(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for fqn, value in values.items():
            params[fqn].copy_(value.to(params[fqn].dtype))
    return model


def compute_maps(anchor: Inference, other: Inference, config: FusionConfig, data=None) -> TransportMaps:
    maps = TransportMaps(anchor, other, config)
    if data is not None and (config.cost == "activations" or config.residual.startswith("weighted")):
        _activations(anchor, other, maps, data)
    return maps


def fuse(*models, args: tuple | None = None, kwargs: dict | None = None, cost: str = "weights",
         solver: str = "sinkhorn", reg: float = 0.06, data=None, residual: str = "mean", heads: str = "cross",
         qk: str = "untied", tokens="all", weights=None, max_iter: int = 1000) -> nn.Module:
    """Fuse two or more transformers of one architecture into one model of the anchor's (the first's) shapes.

    Every other model is aligned to the anchor with transport maps computed over the inferred flow graph,
    then the parameters are averaged with ``weights`` (uniform by default). Returns a new module; the inputs
    are not modified. ``fused.otfx_report`` holds per-map statistics and stage timings.
    """
    config = FusionConfig(cost, solver, reg, residual, heads, qk, tokens,
                          tuple(weights) if weights is not None else None, max_iter)
    data = list(data) if data is not None else None
    config.validate(len(models), data is not None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    inferences = _analysed(models, args, kwargs)
    _check_inputs(inferences)
    timings["trace_and_infer"] = time.perf_counter() - start
    anchor = inferences[0]
    weights_n = config.model_weights(len(models))
    names = unique_params(anchor)
    anchor_params = anchor.traced.parameters()
    total = {fqn: anchor_params[fqn].detach().double() * weights_n[0] for fqn in names}
    stats = []
    for k, other in enumerate(inferences[1:], start=1):
        t0 = time.perf_counter()
        maps = compute_maps(anchor, other, config, data)
        aligned = aligned_params(maps)
        timings[f"align_model_{k}"] = time.perf_counter() - t0
        for fqn in names:
            total[fqn] += weights_n[k] * aligned[fqn]
        stats.extend({"model": k, **vars(s)} for s in maps.stats)
    fused = _write(copy.deepcopy(anchor.traced.model), total)
    timings["total"] = time.perf_counter() - start
    fused.otfx_report = {"config": vars(config), "maps": stats, "timings": timings}
    return fused


def align(model, to, *, args: tuple | None = None, kwargs: dict | None = None, cost: str = "weights",
          solver: str = "emd", reg: float = 0.06, data=None, residual: str = "shared", heads: str = "aware",
          qk: str = "tied", tokens="all") -> nn.Module:
    """``model`` rewritten into the spaces of ``to`` (its transport maps applied, nothing averaged).

    The defaults (EMD, one map per residual stream, head-aware, tied q/k) make every map a permutation that
    respects the model's symmetries, so the result computes the same function as ``model`` when widths match.
    """
    config = FusionConfig(cost, solver, reg, residual, heads, qk, tokens)
    data = list(data) if data is not None else None
    config.validate(2, data is not None)
    anchor, other = _analysed([to, model], args, kwargs)
    _check_inputs([anchor, other])
    maps = compute_maps(anchor, other, config, data)
    aligned = aligned_params(maps)
    result = _write(copy.deepcopy(anchor.traced.model), aligned)
    result.otfx_report = {"config": vars(config), "maps": [vars(s) for s in maps.stats]}
    return result


def vanilla_fuse(*models, args: tuple | None = None, kwargs: dict | None = None, weights=None) -> nn.Module:
    """Plain parameter averaging, the baseline (models of identical shapes only)."""
    if len(models) < 2:
        raise FusionError(f"fusion needs at least two models, got {len(models)}")
    modules = [m.model if isinstance(m, Traced) else m.traced.model if isinstance(m, Inference) else m
               for m in models]
    config = FusionConfig(weights=tuple(weights) if weights is not None else None)
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

    def __init__(self, models: list[nn.Module], weights: list[float]):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.weights = weights

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return sum(w * main_output(m(*args, **kwargs)) for w, m in zip(self.weights, self.members))


def ensemble(*models, weights=None) -> nn.Module:
    """An output ensemble of the models (weighted mean of their logits)."""
    modules = [m.model if isinstance(m, Traced) else m.traced.model if isinstance(m, Inference) else m
               for m in models]
    config = FusionConfig(weights=tuple(weights) if weights is not None else None)
    config.validate(len(models), False)
    return Ensemble([copy.deepcopy(m) for m in modules], config.model_weights(len(models)))
