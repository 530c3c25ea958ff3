"""Stage 1: trace a model into an ATen-level torch.fx graph with torch.export, without touching the model."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


class TraceError(RuntimeError):
    """The model could not be traced; the message says why and what to try."""


class _MainOutput(nn.Module):
    """Wraps a model so that it returns only its main output tensor (logits or last hidden state)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return main_output(self.model(*args, **kwargs))


def main_output(out) -> torch.Tensor:
    """The main tensor of a model's output: ``logits``, ``last_hidden_state`` or the first tensor found."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "prediction_logits"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, dict):
            value = out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    if hasattr(out, "to_tuple"):
        items = out.to_tuple()
    for item in items:
        if isinstance(item, torch.Tensor):
            return item
    raise TraceError(f"cannot find an output tensor in a {type(out).__name__}; return a tensor or a ModelOutput")


@dataclass
class Traced:
    """A model together with its exported ATen graph and the facts about its parameters.

    ``model`` is the caller's module (never modified); ``program`` aliases its tensors, so read it only.
    """

    model: nn.Module
    args: tuple
    kwargs: dict
    program: torch.export.ExportedProgram
    name: str
    placeholder_to_param: dict[str, str] = field(default_factory=dict)
    placeholder_to_buffer: dict[str, str] = field(default_factory=dict)
    placeholder_to_constant: dict[str, str] = field(default_factory=dict)
    user_inputs: list[str] = field(default_factory=list)
    tied: list[list[str]] = field(default_factory=list)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph_module.graph

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter by name, tied ones under each of their names."""
        return dict(self.model.named_parameters(remove_duplicate=False))

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"Traced({self.name}, {n:,} parameters, {len(self.graph.nodes)} graph nodes)"


def _call_kwargs(model: nn.Module, kwargs: dict | None) -> dict:
    """Caller's kwargs plus ``use_cache=False`` for models that take it (caches cannot be exported)."""
    kwargs = dict(kwargs or {})
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _tied_groups(model: nn.Module) -> list[list[str]]:
    by_storage: dict[tuple, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault((p.data_ptr(), tuple(p.shape), tuple(p.stride())), []).append(name)
    return [names for names in by_storage.values() if len(names) > 1]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block and restore each one's own flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def trace(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, name: str | None = None) -> Traced:
    """Trace ``model`` on example inputs with ``torch.export`` (non-strict) in eval mode.

    The model is not modified: it is put in eval mode only while it is exported, then every flag is restored.
    """
    if isinstance(model, Traced):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"otfx.trace expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    name = name or type(model).__name__
    kwargs = _call_kwargs(model, kwargs)
    with eval_mode(model):  # the mode is baked into the export
        wrapper = _MainOutput(model)
        try:
            program = torch.export.export(wrapper, args, kwargs, strict=False)
        except Exception as err:  # torch.export raises many types; all get the same advice
            reason = str(err).strip().splitlines()[0][:500] if str(err).strip() else type(err).__name__
            raise TraceError(
                f"torch.export could not trace {name}: {type(err).__name__}: {reason}\n"
                "What to try: pass use_cache=False for decoder models, load Hugging Face models with "
                "attn_implementation='eager', check that the example inputs run through model(*args, **kwargs), "
                "and remove data-dependent Python control flow from forward()."
            ) from err
    traced = Traced(model=model, args=args, kwargs=kwargs, program=program, name=name, tied=_tied_groups(model))
    sig = program.graph_signature
    for spec in sig.input_specs:
        arg = getattr(spec.arg, "name", None)
        target = (spec.target or "").removeprefix("model.")
        kind = spec.kind.name
        if kind == "PARAMETER":
            traced.placeholder_to_param[arg] = target
        elif kind == "BUFFER":
            traced.placeholder_to_buffer[arg] = target
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            traced.placeholder_to_constant[arg] = target
        elif kind == "USER_INPUT":
            traced.user_inputs.append(arg)
    return traced


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of a model, detached from the caller's tensors."""
    return copy.deepcopy(model)
