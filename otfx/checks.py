"""Checks that turn silently wrong results and raw torch errors into messages naming the model and tensor:
non-finite parameters and outputs, and example inputs that do not fit a model (device, dtype, token ids)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import torch
from torch import nn


class ModelInputError(ValueError):
    """Example inputs (or the model itself) cannot be used: meta tensors, mixed devices, wrong dtypes, ids out
    of range. The message names the input, the module and what to do."""


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf values; the message names the model and the parameter (or output)."""


class NonFiniteParameterError(NonFiniteError):
    """An input model's parameter or buffer holds NaN or inf values."""


def _module(model) -> nn.Module:
    """The nn.Module of a module, an ``otfx.Traced`` or an ``Inference``."""
    inner = getattr(model, "traced", None)  # Inference
    inner = getattr(inner, "model", None) if inner is not None else getattr(model, "model", None)
    if isinstance(model, nn.Module):
        return model
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected a torch.nn.Module, otfx.Traced or Inference, got {type(model).__name__}")


def _label(model, name: str | None) -> str:
    return name or getattr(getattr(model, "traced", model), "name", None) or type(_module(model)).__name__


def _tensors(module: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    for fqn, p in module.named_parameters():
        yield "parameter", fqn, p
    for fqn, b in module.named_buffers():
        yield "buffer", fqn, b


def check_materialised(model, name: str | None = None) -> None:
    """Refuse a model with tensors on the meta device (no values) or spread over several devices."""
    module, label = _module(model), _label(model, name)
    devices: dict[torch.device, str] = {}
    for kind, fqn, t in _tensors(module):
        if t.device.type == "meta":
            raise ModelInputError(f"{label}: {kind} {fqn} is on the meta device (it has a shape but no values); "
                                  "load real weights first (for example from_pretrained without device_map='meta', "
                                  "or model.to_empty(device='cpu') followed by loading a checkpoint)")
        devices.setdefault(t.device, fqn)
    if len(devices) > 1:
        spread = ", ".join(f"{fqn} on {dev}" for dev, fqn in devices.items())
        raise ModelInputError(f"{label} has tensors on {len(devices)} devices ({spread}); move the whole model to "
                              "one device with model.to(device)")


def check_finite_params(model, name: str | None = None, *, buffers: bool = True,
                        error: type[NonFiniteError] = NonFiniteParameterError) -> None:
    """Raise ``error`` naming every floating parameter (and buffer) of ``model`` that holds NaN or inf."""
    module, label = _module(model), _label(model, name)
    check_materialised(module, label)
    bad = []
    for kind, fqn, t in _tensors(module):
        if kind == "buffer" and not buffers or not t.is_floating_point() or t.numel() == 0:
            continue
        with torch.no_grad():
            # one reduction, no mask the size of the tensor: NaN and inf survive a sum; a finite tensor whose sum
            # overflows (half precision) falls through to the exact test
            total = t.sum(dtype=torch.float64) if t.element_size() < 4 else t.sum()
            if bool(torch.isfinite(total)) or bool(torch.isfinite(t).all()):
                continue
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            first = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0].tolist())
        bad.append(f"{kind} {fqn} {tuple(t.shape)} has {n_nan} NaN and {n_inf} inf values (first at {first})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise error(f"{label}: {'; '.join(bad[:3])}{more}. A non-finite value spreads through fusion into every "
                    "parameter it is aligned or averaged with; fix or re-train the model")


def check_finite_output(model, args: tuple, kwargs: dict | None = None, name: str | None = None,
                        output=None) -> None:
    """Run ``model`` on ``args`` (eval mode, no grad) and raise NonFiniteError if its main output (chosen by
    ``output``, see ``otfx.conventions.main_output``) has NaN or inf values; non-finite parameters are named
    first."""
    from otfx.trace import eval_mode, main_output

    module, label = _module(model), _label(model, name)
    check_finite_params(module, label, error=NonFiniteError)
    with torch.no_grad(), eval_mode(module):
        out = main_output(module(*args, **(kwargs or {})), output, name=label)
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        n_nan, n_inf = int(torch.isnan(out).sum()), int(torch.isinf(out).sum())
        raise NonFiniteError(f"{label}: its output {tuple(out.shape)} has {n_nan} NaN and {n_inf} inf values on the "
                             "example inputs although every parameter is finite (an overflow, e.g. in float16?)")


# --------------------------------------------------------------------------------------------- inputs


def _describe(x) -> str:
    return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} on {x.device}" if isinstance(
        x, torch.Tensor) else type(x).__name__


def _is_fake(t: torch.Tensor) -> bool:
    with contextlib.suppress(ImportError):
        from torch._subclasses.fake_tensor import is_fake

        return bool(is_fake(t))
    return t.device.type == "meta"


def check_inputs(model, args: tuple = (), kwargs: dict | None = None, name: str | None = None) -> None:
    """Static checks of example inputs against ``model``, before any tracing: tensors with values, one device,
    floating inputs of the model's floating dtype, integer token ids within the input embedding."""
    module, label = _module(model), _label(model, name)
    check_materialised(module, label)
    params = list(module.parameters())
    device = params[0].device if params else None
    named = [(f"input {i}", x) for i, x in enumerate(args)] + [(f"input {k!r}", x) for k, x in (kwargs or {}).items()]
    for where, x in named:
        if not isinstance(x, torch.Tensor):
            continue
        if x.device.type == "meta":
            raise ModelInputError(f"{label}: {where} is on the meta device (no values); give real example inputs")
        if device is not None and x.device != device:
            raise ModelInputError(f"{label}: {where} ({_describe(x)}) is on {x.device} but the model is on {device}; "
                                  f"move the inputs with x.to({str(device)!r})")
    embed = _input_embedding(module)
    ids = kwargs.get("input_ids") if kwargs and "input_ids" in kwargs else args[0] if args else None
    if embed is not None and isinstance(ids, torch.Tensor):
        _check_ids(ids, embed[0], embed[1], label)


def check_meta(model, args: tuple = (), kwargs: dict | None = None, name: str | None = None) -> None:
    """For a shapes-only trace: every tensor of the model and of its inputs is on the meta device."""
    module, label = _module(model), _label(model, name)
    named = [(f"input {i}", x) for i, x in enumerate(args)] + [(f"input {k!r}", x) for k, x in (kwargs or {}).items()]
    for where, t in [(f"{kind} {fqn}", t) for kind, fqn, t in _tensors(module)] + named:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            raise ModelInputError(f"{label}: {where} is on {t.device}; a meta trace needs every tensor on the meta "
                                  "device (build the model under `with torch.device('meta')`)")


def _input_embedding(module: nn.Module) -> tuple[str, nn.Embedding] | None:
    """The token embedding a Hugging Face model declares (``get_input_embeddings``), with its name."""
    getter = getattr(module, "get_input_embeddings", None)
    if getter is None:
        return None
    try:
        embed = getter()
    except (NotImplementedError, AttributeError):
        return None
    if not isinstance(embed, nn.Embedding):
        return None
    name = next((n for n, m in module.named_modules() if m is embed), "input embedding")
    return name, embed


def _check_ids(ids: torch.Tensor, name: str, embed: nn.Embedding, label: str) -> None:
    rows = embed.num_embeddings
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise ModelInputError(f"{label}: the token ids fed to {name} (an embedding of {rows} rows) are "
                              f"{str(ids.dtype).removeprefix('torch.')}; token ids must be integers: pass "
                              "ids.long() (or --input-dtype long)")
    if ids.numel() == 0 or _is_fake(ids):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= rows:
        bad = hi if hi >= rows else lo
        raise ModelInputError(f"{label}: token id {bad} is out of range for {name}, which has {rows} rows "
                              f"(the vocabulary size); ids must lie in [0, {rows}) (--input-high {rows})")


@contextlib.contextmanager
def embedding_guards(model: nn.Module, name: str | None = None) -> Iterator[None]:
    """While the block runs, every nn.Embedding of ``model`` checks what it is fed (integer ids, within its
    rows) and raises ModelInputError naming itself instead of torch's ``index out of range in self``."""
    module, label = _module(model), _label(model, name)
    handles = []
    for fqn, m in module.named_modules():
        if isinstance(m, nn.Embedding):
            def hook(mod, inputs, fqn=fqn):
                if inputs and isinstance(inputs[0], torch.Tensor):
                    _check_ids(inputs[0], fqn, mod, label)

            handles.append(m.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def dtype_hint(model, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """Why inputs of these dtypes may not fit ``model`` (None when nothing stands out): a floating input of
    another dtype than the model's parameters, or integers fed to a model without a token embedding."""
    module = _module(model)
    floating = {p.dtype for p in module.parameters() if p.is_floating_point()}
    named = [(f"input {i}", x) for i, x in enumerate(args)] + [(f"input {k!r}", x) for k, x in (kwargs or {}).items()]
    tokens = any(isinstance(m, nn.Embedding) for m in module.modules())
    for where, x in named:
        if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or len(floating) != 1:
            continue
        want = str(next(iter(floating))).removeprefix("torch.")
        got = str(x.dtype).removeprefix("torch.")
        if x.is_floating_point() and x.dtype not in floating:
            return f"{where} is {got} but the model's parameters are {want}: cast it with x.to(torch.{want})"
        if not x.is_floating_point() and not tokens:
            return (f"{where} is {got} but the model has no token embedding and {want} parameters: give "
                    f"{want} inputs (x.to(torch.{want}), or --input-dtype {want})")
    return None


def dry_run(model, args: tuple = (), kwargs: dict | None = None, name: str | None = None) -> None:
    """Run ``model`` once on the inputs (eval mode, no grad, embeddings guarded); a failure becomes a
    ModelInputError with the inputs' shapes and dtypes and torch's first line."""
    from otfx.trace import eval_mode

    module, label = _module(model), _label(model, name)
    check_inputs(module, args, kwargs, label)
    try:
        with torch.no_grad(), eval_mode(module), embedding_guards(module, label):
            module(*args, **(kwargs or {}))
    except ModelInputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means the inputs do not fit the model
        shown = ", ".join(_describe(x) for x in [*args, *(kwargs or {}).values()])
        hint = dtype_hint(module, args, kwargs)
        raise ModelInputError(f"{label} does not run on the example inputs ({shown}): "
                              + (hint if hint else f"{type(err).__name__}: {_first_line(err)}")) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


# ---------------------------------------------------------------------------------------- trace errors

_USER_CODE = re.compile(r'File "(?P<file>[^"\n]+)", line (?P<line>\d+), in (?P<fn>\w+)\n\s*(?P<code>[^\n]*)')


def error_chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and its causes (or, without a cause, the exception it was raised while handling), in order."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


def own_error(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``err``'s chain of causes (torch wraps errors raised in hooks)."""
    return next((e for e in error_chain(err) if isinstance(e, kind)), None)


def explain_trace_error(err: BaseException) -> str | None:
    """A short explanation of a torch.export failure we recognise (None otherwise): an input check of ours, or
    Python control flow on the values of a tensor, with the user's line."""
    ours = own_error(err, ModelInputError)
    if ours is not None:
        return str(ours)
    chain = error_chain(err)  # the user's line is in torch's own error, under ours
    text = "\n".join(str(e) for e in chain)
    if "data-dependent" in text or any("DataDependent" in type(e).__name__ for e in chain):
        err = chain[-1]
        where = ""
        for match in _USER_CODE.finditer(text):
            if "site-packages" not in match["file"] and "/torch/" not in match["file"]:
                code = f": {match['code'].strip()}" if match["code"] else ""
                where = f" at {match['file']}:{match['line']} in {match['fn']}{code}"
                break
        if not where:
            import traceback

            for frame in reversed(traceback.extract_tb(err.__traceback__)):
                if "site-packages" not in frame.filename and "/torch/" not in frame.filename \
                        and "/otfx/" not in frame.filename:
                    where = f" at {frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"
                    break
        return (f"forward() branches on the values of a tensor{where}, which torch.export cannot trace (a Python "
                "if/float()/.item() on data); rewrite it with torch.where / torch.cond or remove the branch")
    return None


@contextlib.contextmanager
def quiet_export(level: int = logging.ERROR) -> Iterator[None]:
    """Keep torch.export's warnings and partial graph dumps off the terminal while it runs."""
    import io

    names = ("torch", "torch.fx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # partial graphs are printed there; stdout is the user's
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def check_traced_unchanged(traced) -> None:
    """Refuse a traced model whose parameters were removed or reshaped since ``otfx.trace`` (a replaced layer):
    the graph would describe another model. Values edited in place are fine (the trace aliases them)."""
    model = getattr(traced, "model", None)
    program = getattr(traced, "program", None)
    if model is None or program is None:
        return
    current = dict(model.named_parameters(remove_duplicate=False))
    state = program.state_dict
    for fqn in traced.placeholder_to_param.values():
        then = state.get(f"model.{fqn}", state.get(fqn))
        now = current.get(fqn)
        if now is None:
            raise ModelInputError(f"{traced.name}: parameter {fqn} was traced but the model no longer has it; "
                                  "trace the model again after changing it")
        if then is not None and tuple(then.shape) != tuple(now.shape):
            raise ModelInputError(f"{traced.name}: parameter {fqn} had shape {tuple(then.shape)} when traced and has "
                                  f"{tuple(now.shape)} now; trace the model again after changing it")
