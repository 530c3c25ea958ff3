"""Model conventions in one place: which output is the main one, eval mode, call kwargs, parameter identity.

Every stage (trace, fuse, ensemble, export) goes through these helpers, so a model is called and read the same
way everywhere.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import nn

__all__ = [
    "MAIN_KEYS", "OutputSelectionError", "OutputSelector", "accepts", "call_kwargs", "check_selector",
    "eval_mode", "main_output", "tensor_identity", "tied_groups", "unique_parameter_names",
]

#: Output fields that are the main output when present, in this order (Hugging Face ``ModelOutput`` names).
MAIN_KEYS = ("logits", "last_hidden_state", "prediction_logits")

#: ``output=``: a key or attribute name, an index into a tuple (or a ``ModelOutput``'s tuple), or a callable
#: that takes the model's output and returns the main tensor.
OutputSelector = Union[str, int, Callable[[Any], torch.Tensor], None]  # noqa: UP007 (a runtime alias)


class OutputSelectionError(ValueError):
    """The main output cannot be chosen without guessing; the message names the candidates and the fix."""


# ----------------------------------------------------------------------------------------------- main output


def check_selector(output: OutputSelector) -> OutputSelector:
    """``output`` if it is a valid selector (None, a name, an int index or a callable), else ``TypeError``."""
    if output is None or callable(output) or isinstance(output, str):
        return output
    if isinstance(output, int) and not isinstance(output, bool):
        return output
    raise TypeError(f"output= must be a key or attribute name, an int index or a callable, "
                    f"got {type(output).__name__}")


def _children(out: Any) -> list[tuple[str, Any]]:
    """``(path suffix, value)`` of a container's items: mappings (``ModelOutput``) by key, sequences by index."""
    if isinstance(out, Mapping):
        return [(f".{k}" if isinstance(k, str) and k.isidentifier() else f"[{k!r}]", v) for k, v in out.items()]
    if isinstance(out, (tuple, list)):
        return [(f"[{i}]", v) for i, v in enumerate(out)]
    if hasattr(out, "to_tuple"):
        return [(f"[{i}]", v) for i, v in enumerate(out.to_tuple())]
    return []


def _tensors(out: Any, path: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a (nested) output, with its path (``output[1]``, ``output.logits``)."""
    if isinstance(out, torch.Tensor):
        yield path, out
        return
    for suffix, value in _children(out):
        yield from _tensors(value, path + suffix)


def _describe(candidates: Iterable[tuple[str, torch.Tensor]]) -> str:
    return ", ".join(f"{p} (shape {tuple(t.shape)})" for p, t in candidates) or "none"


def _select(out: Any, output: str | int | Callable[[Any], torch.Tensor], who: str) -> Any:
    """Apply an explicit selector; errors name what the output does offer."""
    if callable(output):
        return output(out)
    if isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            return out[output]
        if not isinstance(out, (torch.Tensor, Mapping)) and hasattr(out, output):
            return getattr(out, output)  # a dataclass field or a namedtuple's name
        keys = list(out.keys()) if isinstance(out, Mapping) else list(getattr(out, "_fields", ()))
        raise OutputSelectionError(f"output={output!r}: {who} returns a {type(out).__name__} without that field "
                                   f"(fields: {keys or 'none'}); tensors in it: {_describe(_tensors(out))}")
    items = [v for _, v in _children(out)]
    if isinstance(out, torch.Tensor) or not -len(items) <= output < len(items):
        raise OutputSelectionError(f"output={output}: {who} returns a {type(out).__name__} with {len(items)} "
                                   f"items; tensors in it: {_describe(_tensors(out))}")
    return items[output]


def _known_key(out: Any) -> torch.Tensor | None:
    for key in MAIN_KEYS:
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def main_output(out: Any, output: OutputSelector = None, *, name: str | None = None) -> torch.Tensor:
    """The main tensor of a model's output ``out``.

    With ``output=`` (see :data:`OutputSelector`) that tensor. Otherwise: a tensor output itself; else the first
    :data:`MAIN_KEYS` field present; else the only tensor with at least one dimension. Several candidates are
    an :class:`OutputSelectionError` naming them (never a guess); a 0-dim tensor (a loss) is never the main
    output. ``name`` names the model in errors.
    """
    who = name or "the model"
    if output is not None:
        value = _select(out, check_selector(output), who)
        what = f"output={output!r}" if not callable(output) else "the output= callable"
    elif isinstance(out, torch.Tensor):
        value, what = out, "its output"
    else:
        value, what = _known_key(out), "its main field"
        if value is None:
            found = list(_tensors(out))
            candidates = [(p, t) for p, t in found if t.ndim > 0]
            if len(candidates) != 1:
                many = f"{len(candidates)} tensors" if candidates else "no tensor with a dimension"
                raise OutputSelectionError(
                    f"{who} returns a {type(out).__name__} with {many} and none is a known main output "
                    f"({', '.join(MAIN_KEYS)}): {_describe(found)}. Pass output= to otfx.trace (a key or "
                    "attribute name, an index, or a callable) to say which tensor is the model's output.")
            value = candidates[0][1]
    if not isinstance(value, torch.Tensor):
        raise OutputSelectionError(f"{what} of {who} is a {type(value).__name__}, not a tensor")
    if value.ndim == 0:
        raise OutputSelectionError(f"{what} of {who} is a 0-dim tensor (a loss?), which is never a main output; "
                                   f"tensors in the output: {_describe(_tensors(out))}; pass output= to choose")
    return value


# ----------------------------------------------------------------------------------------------- calling


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block and restore each one's own flag afterwards, errors too."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter called ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def call_kwargs(model: nn.Module, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's kwargs plus ``use_cache=False`` for models that take it (a KV cache cannot be exported)."""
    kwargs = dict(kwargs or {})
    if "use_cache" not in kwargs and accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return kwargs


# ----------------------------------------------------------------------------------------------- identity


def tensor_identity(t: torch.Tensor) -> tuple:
    """A key equal for two tensors exactly when they are the same memory viewed the same way.

    Storage identity plus offset, shape, stride and dtype; never ``data_ptr()`` alone, which is 0 for every
    meta tensor (so every same-shaped meta parameter would look tied).
    """
    try:
        storage = t.untyped_storage()
        # _cdata is the address of the C++ StorageImpl: distinct for distinct meta storages, unlike data_ptr()
        owner = getattr(storage, "_cdata", None) or id(storage)
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without a storage
        return ("object", id(t))
    return ("storage", t.device.type, owner, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _named(module_or_params: nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
           ) -> list[tuple[str, torch.Tensor]]:
    if isinstance(module_or_params, nn.Module):
        return list(module_or_params.named_parameters(remove_duplicate=False))
    if isinstance(module_or_params, Mapping):
        return list(module_or_params.items())
    return list(module_or_params)


def _groups(module_or_params) -> list[list[str]]:
    # the tensors stay referenced by ``named`` while keys are compared, so no storage address is reused
    named = _named(module_or_params)
    by_key: dict[tuple, list[str]] = {}
    for name, t in named:
        by_key.setdefault(tensor_identity(t), []).append(name)
    return list(by_key.values())


def tied_groups(module_or_params) -> list[list[str]]:
    """Names that share one tensor (groups of two or more, in parameter order); meta-device safe."""
    return [names for names in _groups(module_or_params) if len(names) > 1]


def unique_parameter_names(module_or_params) -> list[str]:
    """One name per distinct tensor (a tied group by its first name), in order; meta-device safe.

    ``module_or_params``: a module (all names, ``remove_duplicate=False``), a ``{name: tensor}`` mapping or
    ``(name, tensor)`` pairs.
    """
    return [names[0] for names in _groups(module_or_params)]
