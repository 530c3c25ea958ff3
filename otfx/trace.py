"""Stage 1: trace a model into an ATen-level torch.fx graph with torch.export, without touching the model."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from otfx import checks
from otfx.conventions import (
    OutputSelectionError,
    OutputSelector,
    call_kwargs,
    check_selector,
    eval_mode,
    main_output,
    tied_groups,
)

__all__ = ["TraceError", "Traced", "clone_model", "eval_mode", "main_output", "trace"]


class TraceError(RuntimeError):
    """The model could not be traced; the message says why and what to try."""


class _MainOutput(nn.Module):
    """Wraps a model so that it returns only its main output tensor (see :func:`otfx.conventions.main_output`)."""

    def __init__(self, model: nn.Module, output: OutputSelector, name: str):
        super().__init__()
        self.model = model
        self.output = output
        self.name = name

    def forward(self, *args, **kwargs):
        return main_output(self.model(*args, **kwargs), self.output, name=self.name)


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
    output: OutputSelector = None  # the main-output selector given to trace; fuse, ensemble, export reuse it

    def main_output(self, out) -> torch.Tensor:
        """The main tensor of one of this model's outputs, chosen as at trace time."""
        return main_output(out, self.output, name=self.name)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph_module.graph

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter by name, tied ones under each of their names."""
        return dict(self.model.named_parameters(remove_duplicate=False))

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"Traced({self.name}, {n:,} parameters, {len(self.graph.nodes)} graph nodes)"


def trace(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, name: str | None = None,
          output: OutputSelector = None, meta: bool = False) -> Traced:
    """Trace ``model`` on example inputs with ``torch.export`` (non-strict) in eval mode.

    ``output`` says which tensor of the model's output is the main one (a key or attribute name, an index or
    a callable; see :func:`otfx.conventions.main_output`); by default a known field (``logits``...) or the only
    non-scalar tensor, and several candidates are an error naming them. The model is not modified: it is put
    in eval mode only while it is exported, then every flag is restored. ``meta=True``: a model and inputs on
    the meta device, traced for their shapes only (streaming fusion reads the values from disk).
    """
    if isinstance(model, Traced):
        if output is not None and output != model.output:  # the graph's output was chosen when it was traced
            raise ValueError(f"{model.name} was traced with output={model.output!r}; trace the module again to "
                             f"select output={output!r}")
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"otfx.trace expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    name = name or type(model).__name__
    output = check_selector(output)
    kwargs = call_kwargs(model, kwargs)
    if meta:
        checks.check_meta(model, args, kwargs, name)
    else:
        checks.check_inputs(model, args, kwargs, name)  # meta tensors, devices, token ids: named, before export
    with eval_mode(model):  # the mode is baked into the export
        wrapper = _MainOutput(model, output, name)
        try:
            # under no_grad, a model's own no_grad blocks change nothing and are traced inline (otherwise each
            # becomes a wrap_with_set_grad_enabled submodule no pass can see into)
            with checks.embedding_guards(model, name), checks.quiet_export(), torch.no_grad():
                program = torch.export.export(wrapper, args, kwargs, strict=False)
        except Exception as err:  # torch.export raises many types; all get the same advice
            if (chosen := checks.own_error(err, OutputSelectionError)) is not None:  # the fix is output=
                raise chosen from None
            if (ours := checks.own_error(err, checks.ModelInputError)) is not None:  # float ids into an embedding
                raise ours from None
            reason = str(err).strip().splitlines()[0][:500] if str(err).strip() else type(err).__name__
            reason = checks.explain_trace_error(err) or f"{type(err).__name__}: {reason}"  # a branch: its line
            raise TraceError(
                f"torch.export could not trace {name}: {reason}\n"
                "What to try: pass use_cache=False for decoder models, load Hugging Face models with "
                "attn_implementation='eager', check that the example inputs run through model(*args, **kwargs), "
                "and remove data-dependent Python control flow from forward()."
            ) from err
    traced = Traced(model=model, args=args, kwargs=kwargs, program=program, name=name, tied=tied_groups(model),
                    output=output)
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
