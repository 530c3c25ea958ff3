"""Least-squares refit after fusion (PLeaS, Nasery et al. 2024): layer by layer in graph order, each linear
layer's weight and bias are solved in closed form so that, on the fused model's own inputs, its outputs best
match the weighted mean of the aligned parents' outputs, each parent run on its own inputs.

With the fused model's inputs X (rows: samples x tokens, a column of ones for the bias) and the target Y, the
solution is ``(X^T X + l I)^-1 (X^T Y + l W0)``: a ridge pull ``l = ridge * tr(X^T X) / d`` towards the fused
weights W0 keeps directions the calibration data does not reach. Later layers are refitted on the refitted
values. The fused model keeps the anchor's graph: only the values of linear weights and biases change.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from otfx.align.config import FusionError
from otfx.align.config import normalised_weights as _weights
from otfx.align.execute import GraphRunner, Lockstep, as_module, as_traced
from otfx.trace import Traced

#: ridge strength, relative to the mean diagonal of X^T X: 1e-3 was best or within 0.7 points of the best of
#: 1e-4, 1e-3 and 1e-2 on validation over digits and Fashion-MNIST ViTs (2 and 4 models) and the BERT pair
RIDGE = 1e-3


@dataclass(frozen=True)
class Layer:
    """A refittable linear layer: graph node, its input node, weight and bias (fully qualified names);
    ``transposed``: the weight is stored (in, out), as ``addmm`` reads it (GPT-2's Conv1D), not (out, in)."""

    node: str
    input: str
    weight: str
    bias: str | None
    transposed: bool = False


def refit_layers(traced: Traced) -> list[Layer]:
    """The ``aten.linear`` and ``aten.addmm`` nodes of ``traced`` in graph order whose weight (and bias) are
    parameters read by that node only (a weight tied to an embedding is left alone) and whose input is not a
    parameter."""
    params = traced.placeholder_to_param

    def own_param(node) -> str | None:
        if isinstance(node, fx.Node) and node.op == "placeholder" and node.name in params and len(node.users) == 1:
            return params[node.name]
        return None

    layers = []
    for n in traced.graph.nodes:
        if n.op != "call_function" or len(n.args) < 2:
            continue
        if n.target is torch.ops.aten.linear.default:
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        elif n.target is torch.ops.aten.addmm.default and len(n.args) == 3 and not n.kwargs:
            b, x, w = n.args
        else:
            continue
        weight = own_param(w)
        bias = own_param(b) if b is not None else None
        if weight is None or (b is not None and bias is None) or not isinstance(x, fx.Node) or x.name in params:
            continue
        layers.append(Layer(n.name, x.name, weight, bias, n.target is torch.ops.aten.addmm.default))
    return layers


def _real_rows(value: torch.Tensor, real: int, size: int) -> torch.Tensor:
    """The rows of the ``real`` samples of a batch of ``size`` (the rest repeat rows to fill the traced batch):
    the first ``real`` along the batch axis, or their rows when the batch was flattened with the tokens."""
    if value.shape[0] == size:
        return value[:real]
    return value[: real * (value.shape[0] // size)]


def _solve(gram: torch.Tensor, cross: torch.Tensor, start: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_T |X T - Y|^2 + l |T - start|^2 from X^T X (``gram``) and X^T Y (``cross``), in float64."""
    d = gram.shape[0]
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross + lam * start)


def _run(anchor: Traced, fused: nn.Module, parents: Sequence[nn.Module], weights: Sequence[float], data,
         ridge: float) -> dict[str, float]:
    """Refit ``fused``'s linear layers in place; returns each layer's squared error after its refit, relative to
    its target's."""
    run = Lockstep(anchor, [fused, *parents], data)
    layers = {layer.node: layer for layer in refit_layers(run.traced)}
    report: dict[str, float] = {}
    with torch.no_grad():
        for n in run:
            layer = layers.get(n.name)
            if layer is not None:
                report[n.name] = _refit(layer, run.nodes[layer.input], n, run.runners[0], run.envs, run.batches,
                                        weights, ridge)
                run.recompute(0, n)  # later layers see the refitted values
    return report


def _refit(layer: Layer, x_node: fx.Node, n: fx.Node, fused: GraphRunner, envs, batches, weights, ridge) -> float:
    """Solve one layer from the fused inputs and the parents' mean outputs; write it into ``fused``'s tensors
    (the caller recomputes the fused output). Returns the squared error after the refit, relative to the target's."""
    w = fused.params[layer.weight]
    d_out, d_in = (w.shape[1], w.shape[0]) if layer.transposed else (w.shape[0], w.shape[1])
    width = d_in + (layer.bias is not None)
    gram = torch.zeros(width, width, dtype=torch.float64, device=w.device)
    cross = torch.zeros(width, d_out, dtype=torch.float64, device=w.device)
    target_energy = 0.0
    for b, (args, real) in enumerate(batches):
        size = args[0].shape[0]
        # products of one batch in float32, summed in float64: the float64 products of the paper's ViT (fc2:
        # 13,000 rows x 1536) took 94 s of a 140 s fusion
        x = _real_rows(envs[0][b][x_node], real, size).reshape(-1, d_in).float()
        if layer.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        y = sum(wk * _real_rows(envs[k + 1][b][n], real, size).reshape(-1, d_out).float()
                for k, wk in enumerate(weights))
        gram += (x.T @ x).double()
        cross += (x.T @ y).double()
        target_energy += float(y.double().square().sum())
    start = w.double() if layer.transposed else w.double().T
    if layer.bias is not None:
        start = torch.cat([start, fused.params[layer.bias].double()[None]], dim=0)
    theta = _solve(gram, cross, start, ridge)
    w.copy_((theta[:d_in] if layer.transposed else theta[:d_in].T).to(w.dtype))
    if layer.bias is not None:
        fused.params[layer.bias].copy_(theta[d_in].to(w.dtype))
    # |X T - Y|^2 = T^T G T - 2 T^T C + |Y|^2, relative to |Y|^2
    err = float((theta * (gram @ theta)).sum() - 2 * (theta * cross).sum()) + target_energy
    return err / max(target_energy, 1e-30)


def refit(fused: nn.Module, parents: Sequence, data, weights: Sequence[float] | None = None, *,
          aligned: Sequence | None = None, ridge: float = RIDGE) -> nn.Module:
    """A copy of ``fused`` whose linear layers are refitted, in graph order, to the weighted mean (``weights``,
    anchor first) of the aligned parents' outputs on ``data`` (batches of unlabelled inputs).

    ``parents``: ``otfx.trace`` results, anchor first (the fused model has the anchor's graph and shapes).
    ``aligned``: the parents rewritten into the anchor's spaces (default: ``otfx.align(parent, to=anchor)``).
    The inputs are not modified; ``result.otfx_refit`` holds each layer's relative error after its refit.
    """
    from otfx.fuse import align

    if len(parents) < 2:
        raise FusionError("refit needs the parents (anchor first, at least two)")
    traced = [as_traced(p) for p in parents]
    data = list(data)
    w = _weights(weights, len(parents))
    if aligned is None:
        aligned = [traced[0]] + [align(p, to=traced[0]) for p in traced[1:]]
    if len(aligned) != len(parents):
        raise FusionError(f"aligned has {len(aligned)} models for {len(parents)} parents")
    result = copy.deepcopy(as_module(fused))
    report = _run(traced[0], result, [as_module(m) for m in aligned], w, data, ridge)
    result.otfx_refit = {"ridge": ridge, "relative_error": report}
    return result
