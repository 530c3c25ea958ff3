"""Run a traced graph node by node with any model's tensors: what repair and refit use to see (and change) a
layer's values while the graph runs, for several models of the anchor's shapes in lockstep."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from otfx.align.activations import batches_like, for_calibration
from otfx.align.config import FusionError
from otfx.trace import Traced


class GraphRunner:
    """The values of ``traced``'s nodes for ``model``'s parameters and buffers on one batch of ``inputs``."""

    def __init__(self, traced: Traced, model: nn.Module):
        self.traced = traced
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.buffers = dict(model.named_buffers(remove_duplicate=False))
        self.constants = {spec.arg.name: traced.program.constants.get(spec.target)
                          for spec in traced.program.graph_signature.input_specs
                          if spec.kind.name in ("CONSTANT_TENSOR", "CUSTOM_OBJ")}

    def value(self, n: fx.Node, env: dict, inputs: dict):
        """``n``'s value given the values of its inputs in ``env`` and the user inputs by placeholder name."""
        traced = self.traced
        if n.op == "placeholder":
            if n.name in traced.placeholder_to_param:
                return self.params[traced.placeholder_to_param[n.name]]
            if n.name in traced.placeholder_to_buffer:
                return self.buffers[traced.placeholder_to_buffer[n.name]]
            if n.name in self.constants:
                return self.constants[n.name]
            return inputs[n.name]
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "get_attr":
            return getattr(traced.program.graph_module, n.target)
        raise FusionError(f"cannot execute graph node {n.name} ({n.op})")


class Lockstep:
    """``traced``'s graph run for several ``models`` over every calibration batch of ``data``, node by node.

    Iterating yields each node once its value is known for every model and batch (``envs[model][batch][node]``);
    the caller may read or replace those values (a repaired or refitted layer's output, see ``recompute``)
    before the next node runs. A value is dropped once nothing later reads it."""

    def __init__(self, traced: Traced, models: Sequence[nn.Module], data):
        self.traced = for_calibration(traced, data)
        self.runners = [GraphRunner(self.traced, m) for m in models]
        self.batches = batches_like(self.traced, data)
        self.inputs = user_inputs(self.traced, self.batches)
        self.nodes = {n.name: n for n in self.traced.graph.nodes}
        self.envs: list[list[dict]] = [[{} for _ in self.batches] for _ in models]

    def __iter__(self) -> Iterator[fx.Node]:
        last = last_uses(self.traced.graph)
        with torch.no_grad():
            for i, n in enumerate(self.traced.graph.nodes):
                if n.op == "output":
                    return
                for model in range(len(self.runners)):
                    self.recompute(model, n)
                yield n
                for a in n.all_input_nodes:
                    if last.get(a) == i:
                        for envs in self.envs:
                            for env in envs:
                                env.pop(a, None)

    def recompute(self, model: int, n: fx.Node) -> None:
        """``n``'s value for one model on every batch, from its inputs' values (after the model's tensors
        changed)."""
        runner = self.runners[model]
        for env, inputs in zip(self.envs[model], self.inputs):
            env[n] = runner.value(n, env, inputs)


def user_inputs(traced: Traced, batches: list[tuple]) -> list[dict]:
    """Per batch, the user inputs by placeholder name (the traced kwargs are appended as they were traced)."""
    return [dict(zip(traced.user_inputs, pytree.tree_flatten((x, traced.kwargs))[0])) for x, _ in batches]


def last_uses(graph: fx.Graph) -> dict[fx.Node, int]:
    """For each node, the position of the last node that reads it (its value can be dropped after that)."""
    last = {}
    for i, n in enumerate(graph.nodes):
        for a in n.all_input_nodes:
            last[a] = i
    return last


def as_traced(model, args: tuple | None = None, kwargs: dict | None = None) -> Traced:
    """``model`` as a ``Traced``: itself, an ``Inference``'s trace, or a module traced on ``args``."""
    from otfx.infer.result import Inference
    from otfx.trace import trace

    if isinstance(model, Traced):
        return model
    if isinstance(model, Inference):
        return model.traced
    if args is None:
        raise FusionError("pass args=(example inputs,) when the parents are not otfx.trace results")
    return trace(model, args, kwargs)


def as_module(model) -> nn.Module:
    """The module of an ``Inference``, a ``Traced`` or a module."""
    from otfx.infer.result import Inference

    return model.traced.model if isinstance(model, Inference) else model.model if isinstance(model, Traced) else model
