"""Export a (fused) model to ONNX with the dynamo exporter and check it against PyTorch with onnxruntime.

``export_onnx`` wraps the model so that the graph returns its main output tensor only (chosen by
:func:`otfx.conventions.main_output`, with an optional ``output=`` selector), exports it in eval mode with dynamic
batch (and, for integer token inputs, sequence) axes, falls back to fewer dynamic axes and then to static
shapes if the exporter refuses, and writes the file atomically. What was used is stored in the file's
``metadata_props`` (read it back with :func:`export_info`).

``check_onnx`` runs the file with an explicitly chosen onnxruntime provider on fresh inputs of another shape
and compares with the PyTorch model.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import keyword
import logging
import math
import os
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from otfx.conventions import (
    OutputSelectionError,
    OutputSelector,
    call_kwargs,
    check_selector,
    eval_mode,
    main_output,
)

__all__ = [
    "OnnxCheck",
    "OnnxExportError",
    "check_onnx",
    "default_providers",
    "export_command",
    "export_info",
    "export_onnx",
]

log = logging.getLogger(__name__)

#: Above this many bytes of weights the model is written with external data (``<file>.data``): protobuf
#: cannot serialise a single message over 2 GiB, and we keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = int(1.5 * 2**30)
#: Keys used in the ONNX ``metadata_props``.
META_PREFIX = "otfx."
_MAX_REASON_CHARS = 600


class OnnxExportError(RuntimeError):
    """The exporter could not handle the model; ``reason`` is the exporter's (shortened) explanation."""

    def __init__(self, model_class: str, reason: str, attempts: Sequence[str] = ()):
        self.model_class = model_class
        self.reason = reason
        self.attempts = list(attempts)
        tried = f" (tried: {', '.join(self.attempts)})" if self.attempts else ""
        super().__init__(f"cannot export {model_class} to ONNX{tried}: {reason}")


@dataclass
class OnnxCheck:
    """Result of comparing an ONNX file with its PyTorch model on the same (fresh) inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    provider: str
    passed: bool
    atol: float
    input_shapes: list
    torch_device: str = "cpu"
    output_shape: tuple = field(default_factory=tuple)
    rtol: float = 0.0  # passed: |onnx - torch| <= atol + rtol * |torch| everywhere, NaN never matches
    nonfinite: int = 0  # output entries where either side is NaN (or the infinities differ)
    dtype: str = "float32"  # the PyTorch output's dtype, which sets the default tolerances
    skipped: bool = False  # the file could not be run here (see note); nothing was compared
    note: str | None = None

    def __str__(self) -> str:
        if self.skipped:
            return f"ONNX check SKIPPED: {self.note}"
        verdict = "PASS" if self.passed else "FAIL"
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        nan = f", {self.nonfinite} NaN/inf mismatches" if self.nonfinite else ""
        return (f"ONNX check {verdict}: {self.provider} vs torch[{self.torch_device}] on inputs ({shapes}): "
                f"max|diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g}{nan} "
                f"(atol {self.atol:g}, rtol {self.rtol:g} for {self.dtype})")


#: default (atol, rtol) of ``check_onnx`` by the PyTorch output's dtype: half precision rounds at ~1e-3 (fp16)
#: and ~1e-2 (bf16) of the value, so a fixed fp32 atol would fail every correct fp16 export
TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3),
              torch.bfloat16: (2e-2, 2e-2)}


# --------------------------------------------------------------------------------------------- wrapper


@dataclass(frozen=True)
class _Slot:
    """One argument of the model call: a tensor input of the ONNX graph, or a constant baked in."""

    key: int | str  # position in ``args`` or keyword name
    name: str | None  # ONNX input name for tensors, else None
    value: Any = None  # the constant, for non-tensors


def _positional_names(model: nn.Module, n: int) -> list[str]:
    """Names for the first ``n`` positional arguments, taken from ``model.forward``'s signature."""
    names: list[str] = []
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return [names[i] if i < len(names) else f"input_{i}" for i in range(n)]


def _identifier(name: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "input"
    if base[0].isdigit() or keyword.iskeyword(base) or base in ("self", "forward"):
        base = f"in_{base}"
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _plan(model: nn.Module, args: tuple, kwargs: dict | None) -> tuple[list[_Slot], dict[str, Any]]:
    """Split the call into tensor inputs (named, in order) and constants; returns (slots, constant kwargs)."""
    kwargs = call_kwargs(model, kwargs)  # HF decoders: a DynamicCache in the output breaks torch.export
    taken: set[str] = set(k for k, v in kwargs.items() if not isinstance(v, torch.Tensor))
    slots = []
    for i, (a, n) in enumerate(zip(args, _positional_names(model, len(args)), strict=True)):
        is_tensor = isinstance(a, torch.Tensor)
        slots.append(_Slot(i, _identifier(n, taken)) if is_tensor else _Slot(i, None, a))
    consts = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            slots.append(_Slot(k, _identifier(k, taken)))
        else:
            consts[k] = v
    return slots, consts


class _Wrapper(nn.Module):
    """Calls the model with plain tensor inputs and returns its main output tensor only."""

    def __init__(self, model: nn.Module, slots: list[_Slot], consts: dict[str, Any], output: OutputSelector):
        super().__init__()
        self.model = model
        self._slots = slots
        self._consts = consts
        self._output = output

    def call(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        it = iter(tensors)
        args, kwargs = [], dict(self._consts)
        for s in self._slots:
            v = next(it) if s.name is not None else s.value
            if isinstance(s.key, int):
                args.append(v)
            else:
                kwargs[s.key] = v
        return main_output(self.model(*args, **kwargs), self._output, name=type(self.model).__name__)


def _make_wrapper(model: nn.Module, slots: list[_Slot], consts: dict[str, Any],
                  output: OutputSelector = None) -> _Wrapper:
    """A ``_Wrapper`` whose ``forward`` has one named parameter per tensor input (dynamic_shapes needs it)."""
    names = [s.name for s in slots if s.name is not None]
    params, tup = ", ".join(names), "".join(n + ", " for n in names)
    src = f"def forward(self, {params}):\n    return self.call(({tup}))\n"
    ns: dict[str, Any] = {}
    exec(src, ns)  # names are sanitised identifiers, see _identifier
    cls = type(f"OnnxExport_{type(model).__name__}", (_Wrapper,), {"forward": ns["forward"]})
    return cls(model, slots, consts, check_selector(output))


# --------------------------------------------------------------------------------------------- export


def _dynamic_candidates(names: list[str], tensors: list[torch.Tensor], dynamic: bool) -> list[dict]:
    """Dynamic-shape specs to try in order: batch+seq, batch only, static (``{name: {axis: dim name}}``)."""
    full: dict[str, dict[int, str]] = {}
    seq_names: dict[int, str] = {}
    for n, t in zip(names, tensors, strict=True):
        axes: dict[int, str] = {}
        # torch.export specialises sizes 0 and 1, so such axes cannot be dynamic.
        if t.ndim >= 1 and t.shape[0] >= 2:
            axes[0] = "batch"
        if t.ndim == 2 and not t.is_floating_point() and not t.is_complex() and t.shape[1] >= 2:
            size = int(t.shape[1])  # inputs with equal length share one symbol (ids + mask)
            axes[1] = seq_names.setdefault(size, "seq" if not seq_names else f"seq_{len(seq_names)}")
        full[n] = axes
    batch_only = {n: {a: d for a, d in axes.items() if a == 0} for n, axes in full.items()}
    static: dict[str, dict[int, str]] = {n: {} for n in names}
    out: list[dict] = []
    for c in ([full, batch_only, static] if dynamic else [static]):
        if c not in out:
            out.append(c)
    return out


def _to_dynamic_shapes(spec: dict[str, dict[int, str]]) -> dict[str, Any] | None:
    if not any(spec.values()):
        return None
    dims: dict[str, torch.export.Dim] = {}
    return {n: ({a: dims.setdefault(d, torch.export.Dim(d)) for a, d in axes.items()} or None)
            for n, axes in spec.items()}


def _describe(spec: dict[str, dict[int, str]]) -> str:
    used = sorted({d for axes in spec.values() for d in axes.values()})
    return "dynamic " + "+".join(used) if used else "static"


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    return e


def _user_frame(e: BaseException) -> str | None:
    """``File "...", line N, in f | code`` of the innermost traceback frame outside torch and this module."""
    skip = (os.sep + "torch" + os.sep, os.sep + "onnxscript" + os.sep, os.sep + "onnx_ir" + os.sep, __file__)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not any(k in f.filename for k in skip)]
    if not frames:
        return None
    f = frames[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}' + (f" | {f.line.strip()}" if f.line else "")


def _short_reason(e: BaseException) -> str:
    """The exporter's reason, short: the innermost exception's first line and the user code it names."""
    root = _root_cause(e)
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    parts = lines[:1]
    marker = "The following call raised this error:"
    if marker in lines:  # torch.export names the offending user frame and code line here
        parts += lines[lines.index(marker) + 1: lines.index(marker) + 3]
    elif frame := _user_frame(root):
        parts.append(frame)
    stage = f"{type(e).__name__} <- " if root is not e else ""
    reason = f"{stage}{type(root).__name__}: {' | '.join(parts)}"
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."


@contextlib.contextmanager
def _quiet_torch_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Raise torch's loggers to ``level`` (failed capture attempts dump whole graphs as warnings)."""
    names = ["torch"] + [n for n in logging.root.manager.loggerDict if n.startswith("torch.")]
    saved = [(lg, lg.level) for lg in map(logging.getLogger, names)]
    for lg, lvl in saved:
        lg.setLevel(max(lvl, level))
    try:
        yield
    finally:
        for lg, lvl in saved:
            lg.setLevel(lvl)


def _graph_axes(program: Any) -> dict[str, dict[int, str]]:
    """The symbolic (dynamic) axes of each graph input of an ``ONNXProgram``."""
    out: dict[str, dict[int, str]] = {}
    for v in program.model.graph.inputs:
        dims = list(v.shape) if v.shape is not None else []
        out[str(v.name)] = {a: str(getattr(d, "value", d))
                            for a, d in enumerate(dims) if not isinstance(d, int)}
    return out


def _weight_bytes(program: Any) -> int:
    total = 0
    for init in program.model.graph.initializers.values():
        v = init.const_value
        if v is not None:
            total += int(v.nbytes)
    return total


def _sidecar(path: Path) -> Path:
    """Where the exporter puts external data for ``path``."""
    return path.with_name(path.name + ".data")


def export_onnx(model: nn.Module, args: tuple, path: str | Path, *, kwargs: dict | None = None,
                dynamic: bool = True, opset: int | None = None, output: OutputSelector = None) -> Path:
    """Export ``model(*args, **kwargs)``'s main output to ONNX at ``path`` and return the path.

    Tensor arguments become graph inputs named after ``model.forward``'s parameters; other arguments are
    baked in as constants (HF decoders get ``use_cache=False``); ``output`` selects the main output as in
    :func:`otfx.trace` (pass the traced model's ``.output``). Axes are dynamic where the exporter allows
    it: batch (+ sequence for 2-D integer inputs), else batch only, else static; the choice is stored in the
    file's metadata (see :func:`export_info`). Weights go to ``<path>.data`` only when they exceed
    ``EXTERNAL_DATA_BYTES`` (~1.5 GiB), otherwise the file is self-contained. The file appears whole or not
    at all (an existing file at ``path`` is left untouched on failure). The caller's model is not modified.

    Raises:
        OnnxExportError: the exporter could not handle the model (with its shortened reason).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name, like {path / 'model.onnx'}")
    args = tuple(args)
    model_class = type(model).__name__
    slots, consts = _plan(model, args, kwargs)
    names = [s.name for s in slots if s.name is not None]
    tensors = [args[s.key] if isinstance(s.key, int) else kwargs[s.key] for s in slots if s.name is not None]
    if not tensors:
        raise ValueError(f"{model_class}: no tensor inputs to export")
    wrapper = _make_wrapper(model, slots, consts, output)

    program, requested, failures = None, None, []
    captured = io.StringIO()  # torch.export prints partial graphs of failed attempts to stderr
    t0 = time.perf_counter()
    with eval_mode(model), warnings.catch_warnings(), _quiet_torch_logs(), \
            contextlib.redirect_stderr(captured):
        warnings.simplefilter("ignore")  # the exporter warns a lot about internals; errors are what matter
        for spec in _dynamic_candidates(names, tensors, dynamic):
            try:
                program = torch.onnx.export(
                    wrapper, tuple(tensors), dynamo=True, dynamic_shapes=_to_dynamic_shapes(spec),
                    input_names=names, output_names=["output"], opset_version=opset, verbose=False)
                requested = spec
                break
            except Exception as e:  # any exporter failure means "try the next, simpler spec"
                if isinstance(_root_cause(e), OutputSelectionError):  # no spec helps: the fix is output=
                    raise _root_cause(e) from None
                failures.append((_describe(spec), e))
                log.info("ONNX export of %s with %s failed: %s", model_class, _describe(spec),
                         _short_reason(e))
    seconds = time.perf_counter() - t0
    if captured.getvalue():
        log.debug("exporter stderr:\n%s", captured.getvalue())
    if program is None:
        # The static attempt's reason is the fundamental one; dynamic-shape failures are side effects.
        raise OnnxExportError(model_class, _short_reason(failures[-1][1]), [d for d, _ in failures]) \
            from failures[-1][1]

    # The exporter may quietly specialise axes it was asked to keep dynamic: record what the graph has.
    used = _graph_axes(program)
    notes = [f"{d}: {_short_reason(e)}" for d, e in failures]
    if _describe(used) != _describe(requested):
        notes.append(f"asked for {_describe(requested)}, the exporter specialised the rest")
    external = _weight_bytes(program) > EXTERNAL_DATA_BYTES
    meta = {
        "model_class": f"{type(model).__module__}.{model_class}",
        "inputs": json.dumps(names),
        "dynamic_axes": json.dumps({n: {str(a): d for a, d in axes.items()} for n, axes in used.items()}),
        "shapes": _describe(used),
        "fallbacks": json.dumps(notes),
        "external_data": str(external).lower(),
        "export_seconds": f"{seconds:.2f}",
        "torch_version": torch.__version__,
    }
    for k, v in meta.items():
        program.model.metadata_props[META_PREFIX + k] = v

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = tmp / path.name  # same basename: the external-data reference is the file's name + ".data"
        try:
            program.save(staged, external_data=external)
        except Exception as e:
            raise OnnxExportError(model_class, f"saving failed: {_short_reason(e)}") from e
        if _sidecar(staged).exists():
            os.replace(_sidecar(staged), _sidecar(path))
            try:
                os.replace(staged, path)
            except BaseException:
                _sidecar(path).unlink(missing_ok=True)
                raise
        else:
            os.replace(staged, path)
            _sidecar(path).unlink(missing_ok=True)  # stale weights of an earlier export to this path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s (%s, %.1f s)", model_class, path, _describe(used), seconds)
    return path


def export_info(path: str | Path) -> dict[str, Any]:
    """The otfx metadata stored in an ONNX file by :func:`export_onnx` (JSON fields decoded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    info: dict[str, Any] = {}
    for p in proto.metadata_props:
        if p.key.startswith(META_PREFIX):
            key = p.key[len(META_PREFIX):]
            try:
                info[key] = json.loads(p.value) if key in ("inputs", "dynamic_axes", "fallbacks") else p.value
            except json.JSONDecodeError:
                info[key] = p.value
    return info


# --------------------------------------------------------------------------------------------- check


def default_providers() -> list[str]:
    """CUDA (with CPU behind it) when onnxruntime has it, else CPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: Path, providers: list[str]) -> Any:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    missing = [p for p in providers if p not in avail]
    if missing:
        raise ValueError(f"onnxruntime provider(s) {missing} not available in this onnxruntime build "
                         f"(onnxruntime {ort.__version__}, available: {avail}); not falling back silently")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if torch.get_num_threads() == 1:
        so.intra_op_num_threads = 1
    # A check wants fp32 numbers: keep ORT's CUDA matmuls off TF32 (if this build knows the option).
    opts = [{"use_tf32": "0"} if p == "CUDAExecutionProvider" else {} for p in providers]
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers, provider_options=opts)
    except Exception as e:
        if not any(opts):
            raise
        log.warning("onnxruntime rejected provider options %s (%s); retrying without them", opts, e)
        sess = ort.InferenceSession(str(path), so, providers=providers)
    got = sess.get_providers()
    if not got or got[0] != providers[0]:
        raise RuntimeError(f"onnxruntime created a session on {got} although {providers[0]} was asked for "
                           "(provider failed to initialise?)")
    return sess


def _fresh_inputs(tensors: list[torch.Tensor], onnx_shapes: list[list | None], names: list[str],
                  seed: int) -> list[torch.Tensor]:
    """New random inputs: every dynamic axis (symbolic in the ONNX graph) one larger than in the example."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, shape, n in zip(tensors, onnx_shapes, names, strict=True):
        new = list(t.shape)
        for a, d in enumerate(shape or []):
            if a < len(new) and not isinstance(d, int):  # symbolic (str) or unknown (None)
                new[a] += 1
        if t.is_floating_point():
            x = torch.randn(new, generator=g, dtype=torch.float32).to(t.dtype)
        elif t.dtype == torch.bool or "mask" in n.lower():
            x = torch.ones(new, dtype=t.dtype)  # a valid "attend to everything" mask
        else:
            hi = int(t.max()) if t.numel() else 1
            x = torch.randint(0, max(hi, 0) + 1, new, generator=g, dtype=t.dtype)
        out.append(x.to(t.device))
    return out


def _abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| with NaN anywhere (NaN vs NaN included: a NaN output is never right) as inf, equal
    infinities as 0."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
    d[np.isnan(d)] = np.inf  # inf - inf: equal infinities are set back to 0 below, NaN inputs stay inf
    d[np.isinf(a) & (a == b)] = 0.0
    d[np.isnan(a) | np.isnan(b)] = np.inf
    return d


def _check_feed(fresh: list[torch.Tensor], names: list[str], onnx_inputs: list, named: bool) -> None:
    """Inputs must have the rank (and the static sizes) of the ONNX graph's inputs: say which does not."""
    by_name = {i.name: i for i in onnx_inputs}
    for k, (n, x) in enumerate(zip(names, fresh, strict=True)):
        spec = by_name.get(n) if named else (onnx_inputs[k] if k < len(onnx_inputs) else None)
        if spec is None or spec.shape is None:
            continue
        if x.ndim != len(spec.shape):
            raise ValueError(f"input {n!r} has {x.ndim} dims {tuple(x.shape)} but the ONNX graph expects "
                             f"{len(spec.shape)} ({'x'.join(map(str, spec.shape))})")
        for axis, (got, want) in enumerate(zip(x.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise ValueError(f"input {n!r} has size {got} on axis {axis} but that axis is static ({want}) "
                                 f"in the ONNX graph ({'x'.join(map(str, spec.shape))})")


def _unsupported(err: BaseException, model: nn.Module, providers: list[str]) -> str | None:
    """Why onnxruntime cannot run a file here, when it is a known gap rather than a broken export."""
    text = str(err)
    if "NOT_IMPLEMENTED" not in text and "Could not find an implementation" not in text:
        return None
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    low = sorted(dtypes & {"bfloat16", "float16"})
    what = f"{'/'.join(low)} " if low else ""
    op = text.split("implementation for", 1)[1].split("node", 1)[0].strip() if "implementation for" in text else "an op"
    return (f"onnxruntime ({providers[0]}) has no {what}kernel for {op}; the ONNX file was written but not "
            f"checked. Check a float32 export instead (model.float()) or run it where the provider supports "
            f"{what or 'these '}ops")


def check_onnx(path: str | Path, model: nn.Module, args: tuple, *, providers: list[str] | None = None,
               atol: float | None = None, inputs: tuple | None = None, seed: int = 0,
               kwargs: dict | None = None, output: OutputSelector = None, rtol: float | None = None) -> OnnxCheck:
    """Run the ONNX file with onnxruntime and the PyTorch model (eval mode) on fresh inputs and compare.

    ``args`` / ``kwargs`` are the export-time arguments. Fresh inputs are ``inputs`` (positional tensors,
    then tensor kwargs, in export order) or, by default, random ones with every dynamic axis one larger
    (ints within ``[0, max(args)]``, ``randn`` for floats, all-ones masks). ``providers`` defaults to CUDA if
    onnxruntime has it, else CPU; unavailable providers raise ``ValueError`` instead of falling back. PyTorch
    runs on the model's device; ``output`` selects its main output as at export.

    It passes when ``|onnx - torch| <= atol + rtol * |torch|`` everywhere; NaN on either side is a mismatch.
    ``atol``/``rtol`` default to :data:`TOLERANCES` for the PyTorch output's dtype (fp16/bf16 looser). A
    file onnxruntime has no kernels for here (bf16 on CPU) gives a ``skipped`` check saying so.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an ONNX file")
    providers = list(providers) if providers else default_providers()
    try:
        sess = _session(path, providers)
    except Exception as e:
        why = _unsupported(e, model, providers)
        if why is None:
            raise
        return OnnxCheck(math.nan, math.nan, providers[0], False, math.nan, [], skipped=True, note=why)
    slots, consts = _plan(model, tuple(args), kwargs)
    names = [s.name for s in slots if s.name is not None]
    tensors = [args[s.key] if isinstance(s.key, int) else kwargs[s.key] for s in slots if s.name is not None]
    onnx_inputs = list(sess.get_inputs())
    by_name = {i.name: i for i in onnx_inputs}
    named = bool(by_name.keys() & set(names))  # else the file was not written by export_onnx: go by position
    if inputs is None:
        shapes = [(by_name[n].shape if n in by_name else None) if named else
                  (onnx_inputs[k].shape if k < len(onnx_inputs) else None) for k, n in enumerate(names)]
        fresh = _fresh_inputs(tensors, shapes, names, seed)
    else:
        fresh = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in inputs]
        if len(fresh) != len(names):
            raise ValueError(f"inputs has {len(fresh)} tensors, the export has {len(names)}: {names}")
    _check_feed(fresh, names, onnx_inputs, named)

    try:
        device = next(iter(model.parameters())).device
    except StopIteration:
        device = tensors[0].device
    wrapper = _make_wrapper(model, slots, consts, output)
    with eval_mode(model), torch.no_grad():
        out = wrapper(*(x.to(device) for x in fresh)).detach()
    dtype = out.dtype
    ref = out.float().cpu().numpy()
    default_atol, default_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol

    if named:
        feed = {n: x.detach().cpu().numpy() for n, x in zip(names, fresh, strict=True) if n in by_name}
    else:
        feed = {i.name: x.detach().cpu().numpy() for i, x in zip(onnx_inputs, fresh, strict=False)}
    try:
        got = sess.run(None, feed)[0]
    except Exception as e:
        why = _unsupported(e, model, providers)
        if why is not None:
            return OnnxCheck(math.nan, math.nan, sess.get_providers()[0], False, atol, [tuple(x.shape) for x in fresh],
                             str(device), tuple(ref.shape), rtol, dtype=str(dtype).removeprefix("torch."),
                             skipped=True, note=why)
        shapes = {k: v.shape for k, v in feed.items()}
        raise RuntimeError(f"onnxruntime failed on inputs {shapes} "
                           f"(graph inputs {[(i.name, i.shape) for i in sess.get_inputs()]}): {e}") from e
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch output shape {ref.shape}")
    d = _abs_diff(np.asarray(got), ref)
    finite = np.isfinite(d)
    nonfinite = int((~finite).sum())
    max_d = float(d.max()) if d.size else 0.0
    mean_d = float(d[finite].mean()) if finite.any() else (0.0 if not d.size else math.inf)
    limit = atol + rtol * np.abs(np.nan_to_num(ref.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    passed = bool((d <= limit).all()) and nonfinite == 0
    return OnnxCheck(max_abs_diff=max_d, mean_abs_diff=mean_d, provider=sess.get_providers()[0],
                     passed=passed, atol=atol, input_shapes=[tuple(x.shape) for x in fresh],
                     torch_device=str(device), output_shape=tuple(ref.shape), rtol=rtol, nonfinite=nonfinite,
                     dtype=str(dtype).removeprefix("torch."))


def export_command(model: nn.Module, args: tuple, out: str | Path, check: bool) -> OnnxCheck | None:
    """What ``otfx export`` does: export to ``out`` (dynamic axes) and optionally check it with ORT."""
    path = export_onnx(model, args, out)
    info = export_info(path)
    log.info("wrote %s (%s, %s s)", path, info.get("shapes"), info.get("export_seconds"))
    return check_onnx(path, model, args) if check else None
