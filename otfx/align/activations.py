"""Activations of chosen graph nodes, collected in one batched pass over the data, with sequence filters."""

from __future__ import annotations

import copy
import math

import torch
import torch.utils._pytree as pytree
from torch import fx

from otfx.align.config import FusionError, token_filter
from otfx.trace import Traced

CALIBRATION_BATCH = 64


def for_calibration(traced: Traced, data) -> Traced:
    """``traced``, or its model traced again at a batch of up to ``CALIBRATION_BATCH`` rows of ``data`` when it
    was traced with fewer: the exported graph has a static batch, and 200 samples through a batch-2 graph are
    100 small calls (paper-size ViT: 7x slower than batches of 50). The new graph is used only when it has the
    same nodes, op for op (node names are what activations and repair refer to); otherwise ``traced``."""
    batch = traced.args[0].shape[0] if traced.args and isinstance(traced.args[0], torch.Tensor) else 0
    tensors_in_kwargs = any(isinstance(v, torch.Tensor) for v in pytree.tree_flatten(traced.kwargs)[0])
    if not batch or batch >= CALIBRATION_BATCH or tensors_in_kwargs or data is None:
        return traced
    chunks = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]
    if not chunks or any(len(c) != len(traced.args) for c in chunks):
        return traced  # batches_like names the problem
    size = min(CALIBRATION_BATCH, sum(c[0].shape[0] for c in chunks))
    if size <= batch:
        return traced
    cache = traced.__dict__.setdefault("_calibration", {})
    if size not in cache:
        from otfx.trace import trace

        try:
            args = tuple(torch.cat([c[j] for c in chunks])[:size] for j in range(len(traced.args)))
            again = trace(traced.model, args, traced.kwargs, name=traced.name, output=traced.output)
        except Exception:  # noqa: BLE001 - any failure: the traced graph still works, only slower
            again = None
        same = again is not None and [(n.op, n.name, str(n.target)) for n in again.graph.nodes] == [
            (n.op, n.name, str(n.target)) for n in traced.graph.nodes]
        cache[size] = again if same else traced
    return cache[size]


def batches_like(traced: Traced, data) -> list[tuple]:
    """Re-cut user batches into batches of the traced shape (the exported graph has static shapes).

    Returns (inputs, number of real rows) pairs; the last batch is padded by repeating rows.
    """
    args = traced.args
    chunks = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]
    if not chunks:
        raise FusionError("data is empty: give at least one batch of inputs")
    for i, chunk in enumerate(chunks):
        if len(chunk) != len(args):
            raise FusionError(f"data batch {i} has {len(chunk)} inputs, the model was traced with {len(args)}")
        for j, (x, a) in enumerate(zip(chunk, args)):
            if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(a.shape[1:]):
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise FusionError(f"data batch {i} input {j} has shape {shape}; the traced input is "
                                  f"{tuple(a.shape)}: only the batch size may differ")
    joined = [torch.cat([c[j] for c in chunks]) for j in range(len(args))]
    total, step = joined[0].shape[0], args[0].shape[0]
    out = []
    for start in range(0, total, step):
        index = torch.arange(start, start + step).clamp(max=total - 1)
        out.append((tuple(x[index] for x in joined), min(step, total - start)))
    return out


def _sequence_filter(x: torch.Tensor, tokens) -> torch.Tensor:
    """Keep the tokens of a [batch, seq, ...] activation that the filter selects."""
    kind, n = token_filter(tokens)
    if kind == "all" or x.ndim < 3:
        return x
    seq = x.shape[1]
    if kind == "cls":
        return x[:, :1]
    side = math.isqrt(seq - 1)
    has_cls = side * side == seq - 1
    if not has_cls:
        side = math.isqrt(seq)
        if side * side != seq:
            raise FusionError(f"tokens=('window', {n}) needs a square patch grid (+ class token); got {seq} tokens")
    n = min(n, side)
    lo = (side - n) // 2
    grid = torch.arange(side * side).reshape(side, side)[lo:lo + n, lo:lo + n].reshape(-1)
    keep = torch.cat([torch.tensor([0]), grid + 1]) if has_cls else grid
    return x[:, keep]


def collect(traced: Traced, data, wanted: list[tuple[str, tuple[int, ...]]], tokens="all"
            ) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
    """Run the traced graph over ``data`` once and return, per (node name, axes), a [rows, width] matrix of
    the node's activations over those axes (flattened in order; rows are samples x kept tokens).

    Activations are kept in float32 (float64 where the graph computes in float64) and written straight into
    one preallocated matrix per node, batch by batch.
    """
    traced = for_calibration(traced, data)
    gm = traced.program.module()
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    wanted = list(dict.fromkeys(wanted))
    missing = [name for name, _ in wanted if name not in nodes]
    if missing:
        raise FusionError(f"{traced.name}: graph nodes {missing[:3]} not found for activation collection")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(nodes[name] for name, _ in wanted),)
    graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs instead of the pytree-wrapped signature
    probe = fx.GraphModule(gm, graph)
    batches = batches_like(traced, data)
    samples = sum(real for _, real in batches)
    rows: dict[tuple, torch.Tensor] = {}
    filled: dict[tuple, int] = dict.fromkeys(wanted, 0)
    with torch.no_grad():
        for inputs, real in batches:
            flat, _ = pytree.tree_flatten((inputs, traced.kwargs))
            values = probe(*flat)
            for key, value in zip(wanted, values):
                x = value[:real].detach()
                axes = key[1]
                rest = [d for d in range(x.ndim) if d not in axes]
                width = math.prod(x.shape[d] for d in axes)
                x = x.permute(*rest, *axes).reshape(*[x.shape[d] for d in rest], width)
                if len(rest) == 2 and 1 not in axes:
                    x = _sequence_filter(x, tokens)  # [batch, seq, width]
                x = x.reshape(-1, width)
                if key not in rows:
                    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                    rows[key] = torch.empty(x.shape[0] // real * samples, width, dtype=dtype)
                rows[key][filled[key]:filled[key] + x.shape[0]].copy_(x)
                filled[key] += x.shape[0]
    return rows
