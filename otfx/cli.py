"""The ``otfx`` command line: inspect, export, fuse and sweep models saved on disk, and run the demo.

Every command exits non-zero with a one-paragraph message (no traceback; ``--debug`` shows it) when an input
cannot be used, a model cannot be traced or fusion refuses its options.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path

import torch

import otfx
from otfx.align.config import SELECT, FusionConfig, choices
from otfx.checks import (
    ModelInputError,
    NonFiniteParameterError,
    check_finite_output,
    check_finite_params,
    dry_run,
    embedding_guards,
    explain_trace_error,
    quiet_export,
)
from otfx.io import OtfxInputError, Terminated, atomic_dir, quiet_hf_progress, terminate_as_exception
from otfx.io.data import load_data, load_labelled
from otfx.io.models import InputSpec, LoadedModel, example_inputs, load_model, save_model
from otfx.io.output import atomic_file, check_output_dir, check_output_file, clean_stale
from otfx.io.report import FusionReport, write_report
from otfx.trace import TraceError, main_output

FUSE_OPTIONS = tuple(f.name for f in fields(FusionConfig))


# ----------------------------------------------------------------------------------------------- helpers


def _stderr_line(message: str) -> None:
    """One line on stderr that does not share its line with a progress bar (tqdm moves the bar below it)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


class _Console:
    """Progress bars and notes on stderr (silenced by --quiet); results go to stdout."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            _stderr_line(message)

    def progress(self, items: Sequence, desc: str):
        from tqdm.auto import tqdm

        # delay: only steps that take more than a second show a bar
        return tqdm(items, desc=desc, disable=self.quiet, delay=1.0, file=sys.stderr, leave=False)


def _input_spec(args: argparse.Namespace) -> InputSpec | None:
    return InputSpec.parse(args.input_shape, args.input_dtype, args.input_high)


def _load_all(args: argparse.Namespace, specs: list[str], console: _Console) -> list[LoadedModel]:
    """Load every MODEL; --checkpoint files go, in order, to the specs that are not folders."""
    checkpoints = list(args.checkpoint or [])
    needing = [i for i, s in enumerate(specs) if not Path(s).is_dir()]
    if checkpoints and len(checkpoints) not in (len(needing), len(specs)):
        raise OtfxInputError(f"got {len(checkpoints)} --checkpoint file(s) for {len(needing)} model spec(s) that "
                             "are not folders; give one --checkpoint per timm:/factory MODEL, in order")
    owners = needing if len(checkpoints) == len(needing) else list(range(len(specs)))
    paired = dict(zip(owners, checkpoints))
    spec = _input_spec(args)
    loaded = []
    for i in console.progress(range(len(specs)), "loading models"):
        loaded.append(load_model(specs[i], paired.get(i), args.model_kwargs, spec, args.allow_missing))
    for lm in loaded:
        for note in lm.notes:
            console.say(f"note: {note}")
        check_finite_params(lm.model, lm.source)
    return loaded


def _examples(args: argparse.Namespace, loaded: LoadedModel, seq: int | None = None) -> tuple:
    return example_inputs(loaded, batch=args.batch, seq=args.seq or seq or 16)


def _fit_data(args: argparse.Namespace, loaded: LoadedModel, example: tuple) -> tuple[tuple, list | None]:
    """Read --data; token data of another length re-makes the example inputs (fusion traces at one length)."""
    if not args.data:
        return example, None
    data = load_data(args.data, loaded, args.data_batch, args.data_limit, example)
    x, like = data[0][0], example[0]
    if like.ndim == 2 and not like.dtype.is_floating_point and x.shape[1] != like.shape[1]:
        if args.seq is not None or args.input_shape is not None:
            raise OtfxInputError(f"--data {args.data} has sequences of {x.shape[1]} tokens but the models are "
                                 f"traced with {like.shape[1]} (--seq/--input-shape); make them agree")
        example = _examples(args, loaded, seq=x.shape[1])
    return example, data


def _trace_all(loaded: list[LoadedModel], example: tuple, console: _Console) -> list:
    """Trace every model after a guarded run on the example inputs (their errors name the input and module)."""
    traced = []
    for lm in console.progress(loaded, "tracing"):
        dry_run(lm.model, example, name=lm.name)
        try:
            with embedding_guards(lm.model, lm.name), quiet_export():
                traced.append(otfx.trace(lm.model, example, name=lm.name))
        except TraceError as err:
            why = explain_trace_error(err)
            if why is None:
                raise
            raise TraceError(f"torch.export could not trace {lm.name}: {why}") from err
    return traced


def _check_same_architecture(loaded: list[LoadedModel]) -> None:
    """Models to fuse share a class and parameter names (widths may differ, fusion decides)."""
    first = loaded[0]
    names = dict(first.model.named_parameters())
    for other in loaded[1:]:
        if type(other.model) is not type(first.model):
            raise OtfxInputError(f"architectures do not match: {first.source} is {type(first.model).__name__}, "
                                 f"{other.source} is {type(other.model).__name__}")
        theirs = dict(other.model.named_parameters())
        missing, extra = sorted(names.keys() - theirs.keys()), sorted(theirs.keys() - names.keys())
        if missing or extra:
            what = (f"{len(missing)} parameter(s) only in {first.source} (e.g. {missing[0]})" if missing else
                    f"{len(extra)} parameter(s) only in {other.source} (e.g. {extra[0]})")
            raise OtfxInputError(f"architectures do not match: {what}")
        for name, p in names.items():
            if p.ndim != theirs[name].ndim:
                raise OtfxInputError(f"architectures do not match: {name} has shape {tuple(p.shape)} in "
                                     f"{first.source} and {tuple(theirs[name].shape)} in {other.source}")


def _parse_weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise OtfxInputError(f"--weights {text!r} is not a comma-separated list of numbers, like 0.5,0.5") from None
    if len(weights) != n:
        raise OtfxInputError(f"--weights has {len(weights)} values for {n} models")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise OtfxInputError(f"--weights {text!r} must be finite and non-negative, with a positive sum")
    return weights


def _check_tokens(text: str | None) -> str | None:
    if text is None or text in ("all", "cls"):
        return text
    kind, _, n = text.partition(":")
    if kind == "window" and n.isdigit() and int(n) > 0:
        return text
    raise OtfxInputError(f"--tokens {text!r} must be all, cls or window:N (N a positive integer)")


def _fuse_options(args: argparse.Namespace, n: int) -> dict:
    """Options the user gave (others keep otfx.fuse's defaults)."""
    reg = getattr(args, "reg", None)  # sweep has --regs instead
    options = {"cost": args.cost, "solver": args.solver, "reg": reg, "residual": args.residual,
               "heads": args.heads, "qk": args.qk, "tokens": _check_tokens(args.tokens),
               "weights": _parse_weights(args.weights, n), "max_iter": args.max_iter,
               "repair": getattr(args, "repair", None), "refit": getattr(args, "refit", None),
               "anchor_free": getattr(args, "anchor_free", None),
               "select": getattr(args, "select", None)}
    if reg is not None and not (reg > 0 and math.isfinite(reg)):
        raise OtfxInputError(f"--reg must be a positive finite number, got {reg}")
    if args.max_iter is not None and args.max_iter < 1:
        raise OtfxInputError(f"--max-iter must be at least 1, got {args.max_iter}")
    given = {k: v for k, v in options.items() if v is not None}
    if not args.data:
        config = FusionConfig.make(**{k: v for k, v in given.items() if k != "weights"})
        if config.cost_needs_data():
            raise OtfxInputError(f"--cost {config.cost} needs --data PATH (inputs to collect activations on)")
        if config.repair:
            raise OtfxInputError("--repair needs --data PATH (inputs to measure the units' statistics on)")
        if config.refit:
            raise OtfxInputError("--refit needs --data PATH (inputs to fit the layers' outputs on)")
        if config.needs_data():
            raise OtfxInputError(f"--residual {args.residual} needs --data PATH (activations weigh the residuals)")
    return given


def _call_fuse(fuse: Callable, traced: list, anchor: int, options: dict, data,
               progress: Callable[[list], Iterable] | None = None) -> torch.nn.Module:
    """Call ``fuse`` with the anchor first (its weight moved with it); ``progress`` for the selection's bar."""
    options = dict(options)
    if data is not None and progress is not None:  # only the selection (which needs data) reports progress
        options["progress"] = progress
    if data is not None:
        options["data"] = data
    models = list(traced)
    if anchor:
        models.insert(0, models.pop(anchor))
        if options.get("weights") is not None:
            weights = list(options["weights"])
            weights.insert(0, weights.pop(anchor))
            options["weights"] = weights
    return fuse(*models, **options)


def _effective_options(options: dict) -> dict:
    """The given options over FusionConfig's defaults."""
    return {**{f.name: f.default for f in fields(FusionConfig)}, **options}


def _anchor_index(args: argparse.Namespace, n: int) -> int:
    if not -n <= args.anchor < n:
        raise OtfxInputError(f"--anchor {args.anchor} is out of range for {n} models (0 to {n - 1})")
    return args.anchor % n


def _input_paths(specs: list[str], args: argparse.Namespace, loaded: Sequence[LoadedModel] = ()) -> list[Path]:
    """Everything a command reads: model folders, checkpoints, data, and what loading found (never written)."""
    paths = [Path(s) for s in specs if Path(s).exists()]
    paths += [Path(c) for c in args.checkpoint or []]
    for extra in ("data", "eval", "model_kwargs", "config"):
        value = getattr(args, extra, None)
        if value and not str(value).lstrip().startswith("{"):
            paths.append(Path(value))
    for lm in loaded:
        paths += lm.paths
    return paths


def _fusion_stats(fused: torch.nn.Module):
    return getattr(fused, "otfx_report", None)


# ---------------------------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from otfx.inspection import render_summary, write_graph

    console = _Console(args.quiet)
    outputs = [p for p in (args.dot, args.graphml, args.png) if p]
    for path in outputs:
        if Path(path).suffix.lower() not in (".dot", ".gv", ".graphml", ".png"):
            raise OtfxInputError(f"cannot tell the format of {path}; use a .dot, .graphml or .png name")
    if len({check_output_file(p, args.overwrite, _input_paths([args.model], args)) for p in outputs}) < len(outputs):
        raise OtfxInputError("--png, --dot and --graphml name the same file; give each its own")
    (loaded,) = _load_all(args, [args.model], console)
    traced = _trace_all([loaded], _examples(args, loaded), console)[0]
    inference = otfx.analyse(traced)
    print(render_summary(inference, max_rows=None if args.all else 60))
    for path in outputs:
        write_graph(inference, check_output_file(path, args.overwrite, _input_paths([args.model], args, [loaded])))
        print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from otfx.export.onnx import export_command
    except ImportError as err:
        raise OtfxInputError(f"ONNX export is not available: {err}") from None
    console = _Console(args.quiet)
    out = Path(args.out)
    check_output_file(out, args.overwrite, _input_paths([args.model], args), companions=(".data",))
    (loaded,) = _load_all(args, [args.model], console)
    target = check_output_file(out, args.overwrite, _input_paths([args.model], args, [loaded]), companions=(".data",))
    clean_stale(target)  # the exporter's own temporaries are reported
    example = _examples(args, loaded)
    if args.with_mask:
        example = _with_mask(loaded, example)
    dry_run(loaded.model, example, name=loaded.name)
    console.say(f"exporting {loaded.name} to {out}")
    check = export_command(loaded.model, example, target, args.check)
    print(f"wrote {out}")
    if check is not None:
        print(check)
        return 0 if check.passed or check.skipped else 1
    return 0


def _with_mask(loaded: LoadedModel, example: tuple) -> tuple:
    """Token ids plus an all-ones ``attention_mask`` (and zero ``token_type_ids`` where forward takes them next),
    as positional inputs in the order of ``forward``'s parameters."""
    ids = example[0]
    if len(example) != 1 or ids.is_floating_point() or ids.ndim != 2:
        raise OtfxInputError("--with-mask needs a model that takes one (batch, seq) tensor of token ids")
    params = list(inspect.signature(loaded.model.forward).parameters)
    if params[1:2] != ["attention_mask"]:
        raise OtfxInputError(f"--with-mask: {type(loaded.model).__name__}.forward takes {params[:3]}; it needs "
                             "(input_ids, attention_mask, ...) in that order")
    extra = [torch.ones_like(ids)]
    if params[2:3] == ["token_type_ids"]:
        extra.append(torch.zeros_like(ids))
    return (ids, *extra)


def _fusion_setup(args: argparse.Namespace, verb: str):
    """What fuse and sweep share: a console, the model count, otfx.fuse and the anchor index."""
    console = _Console(args.quiet)
    n = len(args.models)
    if n < 2:
        raise OtfxInputError(f"{verb} needs at least two MODELs")
    return console, n, otfx.fuse, _anchor_index(args, n)


def cmd_fuse(args: argparse.Namespace) -> int:
    if args.out is None:
        raise OtfxInputError("fuse needs --out DIR (or 'out:' in --config)")
    console, n, fuse, anchor = _fusion_setup(args, "fuse")
    options = _fuse_options(args, n)
    if args.lazy:
        return _fuse_streamed(args, anchor, options, console)
    check_output_dir(args.out, args.overwrite, _input_paths(args.models, args))
    report = FusionReport(models=list(args.models))
    with report.stage("load"):
        loaded = _load_all(args, args.models, console)
    inputs = _input_paths(args.models, args, loaded)
    check_output_dir(args.out, args.overwrite, inputs)  # loading found more files to protect
    _check_same_architecture(loaded)
    example = _examples(args, loaded[anchor])
    data = None
    if args.data:
        with report.stage("data"):
            example, data = _fit_data(args, loaded[anchor], example)
        console.say(f"data: {sum(len(b[0]) for b in data)} samples in {len(data)} batches from {args.data}")
    with report.stage("trace"):
        traced = _trace_all(loaded, example, console)
    if args.dry_run:
        return _dry_run(args, loaded, traced, anchor, _effective_options(options))
    console.say(f"fusing {n} x {type(loaded[anchor].model).__name__} (anchor {anchor}: {loaded[anchor].source})")
    with report.stage("fuse"):
        fused = _fuse_quietly(lambda: _call_fuse(fuse, traced, anchor, options, data, progress=lambda rows:
                                                 console.progress(rows, "choosing a configuration")))
    check_finite_output(fused, example, name="the fused model", output=getattr(traced[anchor], "output", None))
    resolved = (getattr(fused, "otfx_report", None) or {}).get("config") or {}  # the choices fuse made (reg, ...)
    effective = {**_effective_options(options), **{k: v for k, v in resolved.items() if k in FUSE_OPTIONS}}
    report.config = {"options": effective, "given": options, "anchor": anchor,
                     "data": args.data, "inputs": [list(t.shape) for t in example],
                     "input_dtypes": [str(t.dtype) for t in example]}
    report.add_fusion(_fusion_stats(fused))
    selection = (getattr(fused, "otfx_report", None) or {}).get("selection")
    if selection:
        report.results["selection"] = {k: selection[k] for k in ("metric", "rows", "best")}
    if args.onnx:
        report.results["onnx"] = {"file": "model.onnx", "status": "not run yet"}

    save_start = time.perf_counter()

    def extras(tmp: Path) -> None:
        report.timings["save"] = round(time.perf_counter() - save_start, 4)  # the model's files are written
        write_report(report.to_dict(), tmp / "report.json")

    # the model is saved (and in place) before any ONNX work: a failed export never loses the fused result
    out = save_model(loaded[anchor], fused, args.out, overwrite=args.overwrite, extras=extras, inputs=inputs,
                     command="fuse")
    spaces = report.spaces
    print(f"fused {n} models into {args.out} ({type(fused).__name__}"
          + (f", {len(spaces)} spaces aligned" if spaces else "") + ")")
    summary = report.to_dict()["space_summary"]
    if "sharpness" in summary:
        print(f"maps: {summary['count']}, sharpness {summary['sharpness']['min']:.2f} to "
              f"{summary['sharpness']['max']:.2f}" + (f", at most {summary['iterations']['max']:.0f} solver iterations"
                                                       if summary.get("iterations", {}).get("max") else "")
              + (f", {summary['not_converged']} not converged" if summary.get("not_converged") else "")
              + (f", {summary['fallbacks']} fallbacks" if summary.get("fallbacks") else ""))
    if selection:
        tried = [r for r in selection["rows"] if r["status"] == "ok"]
        best = selection["best"]
        chosen = ", ".join(f"{k} {best[k]}" for k in ("cost", "solver", "reg", "residual", "refit")
                           if best.get(k) is not None)
        print(f"chose {chosen} among {len(tried)} candidates ({selection['metric']} to the models' mean "
              f"{best[selection['metric']]:.4g} on --data; --select off to fuse once)")
    onnx_check, status = None, 0
    if args.onnx:
        onnx_check, status = _fused_onnx(fused, example, Path(out), report)
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
    print(f"report: {Path(args.out) / 'report.json'}")
    if onnx_check is not None:
        print(onnx_check)
    return status


def _fuse_streamed(args: argparse.Namespace, anchor: int, options: dict, console) -> int:
    """``fuse --lazy``: two HF folders fused by streaming (``otfx.stream.fuse_checkpoints``)."""
    from otfx.stream import fuse_checkpoints

    if len(args.models) != 2 or args.data or args.onnx or args.dry_run:
        raise OtfxInputError("--lazy fuses exactly two Hugging Face folders, without --data, --onnx or --dry-run")
    models = list(args.models)
    if anchor:
        models.reverse()
        if options.get("weights"):
            options["weights"] = list(reversed(options["weights"]))
    console.say(f"streaming {models[0]} (anchor) and {models[1]} into {args.out}")
    start = time.perf_counter()
    out = fuse_checkpoints(*models, args.out, shard_size=args.out_shard_size, overwrite=args.overwrite, **options)
    print(f"fused 2 models into {out} by streaming in {time.perf_counter() - start:.1f}s")
    print(f"report: {Path(out) / 'report.json'}")
    return 0


def _dry_run(args: argparse.Namespace, loaded: list[LoadedModel], traced: list, anchor: int, options: dict) -> int:
    """What ``fuse --dry-run`` prints: every model traced, the anchor's spaces, and the maps that would be solved."""
    from otfx.inspection import render_summary

    first = otfx.analyse(traced[anchor])
    print(render_summary(first, max_rows=20))
    print()
    free = first.free_spaces()
    for i, (lm, t) in enumerate(zip(loaded, traced)):
        if i == anchor:
            continue
        other = otfx.analyse(t)
        widths = sorted({(first.size(s), other.size(s)) for s in free if s < len(other.spaces.coarse.parent)})
        print(f"model {i} ({lm.source}) -> anchor {anchor} ({loaded[anchor].source}): {len(free)} free spaces "
              f"to map, widths {', '.join(f'{a}<-{b}' for a, b in widths[:8])}{' ...' if len(widths) > 8 else ''}")
    shown = {k: v for k, v in options.items() if v is not None}
    print(f"options: {', '.join(f'{k}={v}' for k, v in shown.items())}")
    print(f"dry run: nothing fused, nothing written (would write {args.out})")
    return 0


def _fused_onnx(fused: torch.nn.Module, example: tuple, out: Path, report: FusionReport):
    """Export the saved fused model to ``out/model.onnx`` and check it; the report is rewritten either way.
    Returns the check (None if the export failed) and the exit status."""
    from otfx.export.onnx import OnnxExportError, export_command

    onnx_check, status = None, 0
    try:
        with report.stage("onnx"):
            onnx_check = export_command(fused, example, out / "model.onnx", True)
        report.results["onnx"] = {"file": "model.onnx", "passed": onnx_check.passed,
                                  "max_abs_diff": onnx_check.max_abs_diff, "provider": onnx_check.provider,
                                  "atol": onnx_check.atol, "note": getattr(onnx_check, "note", None)}
        status = 0 if onnx_check.passed or getattr(onnx_check, "skipped", False) else 1
    except (OnnxExportError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        report.results["onnx"] = {"file": None, "error": first}
        print(f"otfx fuse: error: the fused model is saved in {out}, but its ONNX export failed: {first}",
              file=sys.stderr)
        status = 1
    with atomic_file(out / "report.json") as handle:
        import json

        from otfx.io.report import jsonable

        json.dump(jsonable(report.to_dict()), handle, indent=2)
        handle.write("\n")
    return onnx_check, status


def _fuse_quietly(call: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run a fusion; the solver's per-map not-converged warnings become one line (report.json has each map)."""
    from otfx.align.solvers import OTFallbackWarning, OTNotConvergedWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = call()
    late = [w for w in caught if issubclass(w.category, OTNotConvergedWarning)]
    fell = [w for w in caught if issubclass(w.category, OTFallbackWarning)]
    shown = set()
    for w in caught:  # a sweep fuses many times: each other warning once
        if w not in late and w not in fell and (w.category, str(w.message)) not in shown:
            shown.add((w.category, str(w.message)))
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if late:
        first = str(late[0].message).split("(max_iter", 1)[0].strip()
        warnings.warn(f"{len(late)} transport map(s) did not converge within --max-iter (first: {first}); their "
                      "plans were kept; raise --max-iter or --reg, or use --solver emd", UserWarning, stacklevel=2)
    if fell:
        first = str(fell[0].message)
        warnings.warn(f"{len(fell)} transport map(s) needed a fallback solver (first: {first}); report.json lists "
                      "the solver of each map", UserWarning, stacklevel=2)
    return fused


def cmd_sweep(args: argparse.Namespace) -> int:
    """Fuse over the axes asked for (otfx.sweep), score every row, the parents, vanilla fusion and the ensemble on
    --eval, and write sweep.json, sweep.txt, sweep.png (and the best model) into --out, whole or not at all."""
    from otfx.sweep import sweep

    console, n, fuse, anchor = _fusion_setup(args, "sweep")
    grid, repair = _sweep_grid(args)
    if not args.data and repair is not False and "repair" in grid:
        raise OtfxInputError("--repair both needs --data PATH (inputs to measure the units' statistics on)")
    options = _fuse_options(argparse.Namespace(**{**vars(args), "repair": repair}), n)
    options["solver"] = args.solver or FusionConfig().solver
    check_output_dir(args.out, args.overwrite, _input_paths(args.models, args))
    loaded = _load_all(args, args.models, console)
    inputs = _input_paths(args.models, args, loaded)
    check_output_dir(args.out, args.overwrite, inputs)
    _check_same_architecture(loaded)
    example, data = _fit_data(args, loaded[anchor], _examples(args, loaded[anchor]))
    evaluation = load_labelled(args.eval, loaded[anchor], args.data_batch, args.eval_limit, example)
    has_labels = all(labels is not None for _, labels in evaluation)
    metric = args.metric or ("accuracy" if has_labels else "loss")
    if metric == "accuracy" and not has_labels:
        raise OtfxInputError(f"--eval {args.eval} has no labels, so accuracy cannot be measured; give .npz with x "
                             "and y (or an image folder with class subfolders), or use --metric loss")
    traced = _trace_all(loaded, example, console)
    order = [anchor] + [i for i in range(n) if i != anchor]  # the anchor first, its weight with it
    given = dict(options)
    if given.get("weights") is not None:
        given["weights"] = [options["weights"][i] for i in order]
    result = _fuse_quietly(lambda: sweep(
        *(traced[i] for i in order), data=data, evaluate=lambda m: evaluate(m, evaluation, metric, loaded[anchor]),
        metric=metric, grid=grid, fuse=fuse, progress=lambda rows: console.progress(rows, "sweeping"), **given))
    for name, why in result.notes.items():
        console.say(f"note: no {name} baseline: {why}")
    names = [loaded[i].source for i in order]
    baselines = result.baselines(names)
    table = result.table(names)
    print(table)
    best = result.best
    swept = {**_effective_options(options), **{axis: list(values) for axis, values in grid.items()}}
    chosen = {**vars(best.config), **{k: v for k, v in best.options.items()}}  # reg None for EMD
    report_json = {"metric": metric, "rows": [r.as_dict(metric) for r in result.rows], "best": best.as_dict(metric),
                   "best_config": chosen, "baselines": baselines, "models": list(args.models), "options": swept,
                   "eval": args.eval, "data": args.data, "anchor": anchor, "timings_s": result.timings}

    def write(tmp: Path) -> None:
        write_report(report_json, tmp / "sweep.json")
        (tmp / "sweep.txt").write_text(table + "\n")
        _plot_sweep(result, baselines, tmp / "sweep.png")
        if args.save_best:
            report = FusionReport(models=list(args.models))
            report.config = {"options": chosen, "anchor": anchor, "data": args.data,
                             "selected_by": {"metric": metric, "value": best.score, "eval": args.eval,
                                             "rows": len(result.rows)}}
            report.add_fusion(_fusion_stats(result.best_model))
            save_model(loaded[anchor], result.best_model, tmp / "best", inputs=inputs, command="sweep",
                       extras=lambda best_dir: write_report(report.to_dict(), best_dir / "report.json"))

    with atomic_dir(args.out, args.overwrite, inputs, command="sweep") as tmp:
        write(tmp)
    what = ", ".join(f"{k}: {_sweep_value(v)}" for k, v in best.options.items() if v is not None) or "the defaults"
    print(f"best {what} ({metric} {best.score:.4f}); wrote {Path(args.out) / 'sweep.png'}")
    return 0


def _sweep_value(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def _sweep_grid(args: argparse.Namespace) -> tuple[dict[str, list], bool | None]:
    """The axes to sweep from --regs (with 'emd': EMD once), --costs, --residuals and --repair both; and the one
    repair setting when --repair on/off (None: otfx.fuse's default). Checked before anything is loaded."""
    from otfx.sweep import uses_reg

    solver = args.solver or FusionConfig().solver
    if not uses_reg(solver):
        raise OtfxInputError(f"--solver {solver} has no regularisation to sweep; use a Sinkhorn solver, or put "
                             "emd in --regs (--regs 0.03,0.1,emd)")
    regs, emd = _parse_regs(args.regs)
    grid: dict[str, list] = {}
    for flag, single, option in (("costs", "cost", "cost"), ("residuals", "residual", "residual")):
        text = getattr(args, flag)
        if text is None:
            continue
        if getattr(args, single) is not None:
            raise OtfxInputError(f"give --{single} (one value) or --{flag} (values to sweep), not both")
        allowed = choices()[option]
        values = list(allowed) if text.strip() == "all" else [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise OtfxInputError(f"--{flag} {text!r}: {bad[0] + ' is not' if bad else 'give'} one of "
                                 f"{', '.join(allowed)} (comma-separated, or all)")
        grid[option] = list(dict.fromkeys(values))
    if emd:
        grid["solver"] = ([solver] if regs else []) + ["emd"]
    if regs:
        grid["reg"] = regs
    repair = {"on": True, "off": False, None: None, "both": None}[args.repair]
    if args.repair == "both":
        grid["repair"] = [False, True]
    return grid, repair


def _parse_regs(text: str) -> tuple[list[float], bool]:
    """--regs: positive numbers, and 'emd' for one EMD row (no regularisation)."""
    parts = [r.strip() for r in text.split(",") if r.strip()]
    emd = "emd" in parts
    try:
        regs = [float(r) for r in parts if r != "emd"]
    except ValueError:
        raise OtfxInputError(f"--regs {text!r} is not a comma-separated list of numbers (and emd)") from None
    if not (regs or emd) or any(not (r > 0 and math.isfinite(r)) for r in regs):
        raise OtfxInputError(f"--regs {text!r} must list positive numbers (and emd)")
    return list(dict.fromkeys(regs)), emd


def _plot_sweep(result, baselines: dict, path: Path, most: int = 30) -> None:
    """Score against reg when reg is the only axis (EMD, if tried, as a line); else the best ``most`` rows
    ranked. The parents, vanilla fusion and the ensemble are dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from otfx.io import atomic_path

    scored, best, metric = result.scored(), result.best, result.metric
    by_reg = all(set(r.options) <= {"reg", "solver"} for r in result.rows)
    ranked = sorted(scored, key=lambda r: r.score, reverse=result.higher_is_better)[:most]
    fig = Figure(figsize=(6.5, 3.6 if by_reg else 1.6 + 0.22 * len(ranked)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if by_reg:
        sink = [r for r in scored if r.options.get("reg") is not None]
        ax.plot([r.options["reg"] for r in sink], [r.score for r in sink], "o-", label="fused")
        for r in scored:
            if r.options.get("reg") is None:
                ax.axhline(r.score, lw=1.5, color="tab:purple", label=f"fused, {r.config.solver}")
        if best.options.get("reg") is not None:
            ax.plot([best.options["reg"]], [best.score], "*", ms=14, color="tab:red",
                    label=f"best (reg {best.options['reg']:g})")
        ax.set_xscale("log")
        ax.set_xlabel("Sinkhorn regularisation (reg)")
        ax.set_ylabel(metric)
        line = ax.axhline
    else:
        ys = list(range(len(ranked)))[::-1]
        ax.scatter([r.score for r in ranked], ys, c=["tab:red" if r is best else "tab:blue" for r in ranked], s=18)
        ax.set_yticks(ys, [r.label() for r in ranked], fontsize=6)
        ax.set_xlabel(metric)
        ax.set_title(f"best {len(ranked)} of {len(result.rows)} rows ({len(scored)} scored)", fontsize=8)
        line = ax.axvline
    for i, (source, value) in enumerate(baselines.items()):
        label = source if source in ("vanilla fusion", "ensemble") else f"input: {Path(source).name}"
        line(value, ls="--", lw=1, color=f"C{(2, 1, 4, 5, 6, 7, 8, 9)[i % 8]}", label=label)  # C3 red: the best
    ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def evaluate(model: torch.nn.Module, batches: list, metric: str, loaded: LoadedModel | None = None) -> float:
    """Accuracy or mean cross-entropy over labelled batches; masked/causal LM loss over unlabelled token batches."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    g = torch.Generator().manual_seed(0)  # the same masks for every model compared
    try:
        with torch.no_grad():
            for inputs, labels in batches:
                out = main_output(model(*inputs))
                if labels is not None:
                    if out.ndim != 2 or out.shape[0] != labels.shape[0]:
                        raise OtfxInputError(f"the model outputs shape {tuple(out.shape)}; labelled evaluation "
                                             "needs (batch, classes) logits")
                    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= out.shape[1]):
                        raise OtfxInputError(f"the evaluation labels range from {int(labels.min())} to "
                                             f"{int(labels.max())} but the model has {out.shape[1]} classes "
                                             f"(labels 0 to {out.shape[1] - 1}); check --eval")
                    if metric == "accuracy":
                        total += float((out.argmax(-1) == labels).sum())
                    else:
                        total += float(torch.nn.functional.cross_entropy(out, labels, reduction="sum"))
                    count += len(labels)
                else:
                    loss, k = _lm_loss(model, inputs, out, g, loaded)
                    total, count = total + loss, count + k
    finally:
        model.train(was)
    return total / max(count, 1)


def _lm_loss(model: torch.nn.Module, inputs: tuple, out: torch.Tensor, g: torch.Generator,
             loaded: LoadedModel | None) -> tuple[float, int]:
    ids = inputs[0]
    if ids.dtype.is_floating_point or out.ndim != 3 or out.shape[:2] != ids.shape:
        raise OtfxInputError("unlabelled evaluation data needs token ids and a (batch, seq, vocab) language-model "
                             "output; give labels (.npz with x and y) for other models")
    config = getattr(model, "config", None)
    causal = getattr(config, "is_decoder", False) or any(s in type(model).__name__ for s in ("CausalLM", "LMHead"))
    if causal:
        loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        return float(loss), ids[:, 1:].numel()
    # masked LM: 15% of positions replaced by the mask token (or a random one), scored at those positions
    mask = torch.rand(ids.shape, generator=g) < 0.15
    mask[:, 0] |= ~mask.any(dim=1)
    tokenizer = loaded.tokenizer if loaded is not None else None
    mask_id = getattr(tokenizer, "mask_token_id", None)
    replaced = ids.clone()
    replaced[mask] = mask_id if mask_id is not None else torch.randint(0, out.shape[-1], (int(mask.sum()),),
                                                                        generator=g)
    logits = main_output(model(replaced, *inputs[1:]))
    loss = torch.nn.functional.cross_entropy(logits[mask], ids[mask], reduction="sum")
    return float(loss), int(mask.sum())


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("otfx.demo")
    except ModuleNotFoundError as err:
        if err.name != "otfx.demo":
            raise
        raise OtfxInputError("the demo is not available in this otfx installation (otfx.demo is "
                             "missing)") from None
    rest = list(args.demo_args or [])
    if rest and rest[0] == "--":
        rest = rest[1:]
    result = demo.main(rest)
    return int(result) if isinstance(result, int) else 0


# ------------------------------------------------------------------------------------------------ parser


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model loading")
    g.add_argument("--checkpoint", action="append", metavar="FILE",
                   help="state dict (.safetensors/.pt) for a timm:/factory MODEL; repeat once per such MODEL")
    g.add_argument("--model-kwargs", metavar="JSON",
                   help="constructor kwargs as a JSON object or JSON file (else <checkpoint>.json if present)")
    g.add_argument("--input-shape", metavar="SHAPE", help="example input shape with batch, like 2x3x32x32")
    g.add_argument("--input-dtype", metavar="DTYPE", help="example input dtype: float (default) or long")
    g.add_argument("--input-high", type=int, metavar="N", help="upper bound (exclusive) for integer inputs")
    g.add_argument("--batch", type=int, default=2, help="batch size of derived example inputs (default 2)")
    g.add_argument("--seq", type=int, help="sequence length of derived token inputs (default: that of token --data, "
                                           "else 16)")
    g.add_argument("--allow-missing", action="store_true",
                   help="accept checkpoints that lack tensors of the model or hold extra ones (default: an error)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of short error messages")


def _fusion_flags(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    g = p.add_argument_group("fusion (defaults: those of otfx.FusionConfig)")
    allowed = choices()
    g.add_argument("--cost", choices=allowed["cost"])
    g.add_argument("--solver", choices=allowed["solver"],
                   help="sinkhorn_torch (default): accelerated Sinkhorn; sinkhorn: POT reference; emd: exact")
    if not sweep:
        g.add_argument("--reg", type=float, help="Sinkhorn entropic regularisation (e.g. 0.06)")
    g.add_argument("--residual", choices=allowed["residual"])
    g.add_argument("--heads", choices=allowed["heads"])
    g.add_argument("--qk", choices=allowed["qk"])
    if sweep:
        g.add_argument("--repair", nargs="?", const="on", choices=["both", "on", "off"],
                       help="REPAIR after fusing: on, off, or both (each row with and without; needs --data); "
                            "default: on with --data")
        g.add_argument("--no-repair", dest="repair", action="store_const", const="off", help="same as --repair off")
    else:
        g.add_argument("--repair", action=argparse.BooleanOptionalAction, default=None,
                       help="reset every aligned unit's mean and std to the parents' after fusing (default: with "
                            "--data)")
        g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                       help="solve each linear layer by least squares to match the parents' mean outputs on --data "
                            "(default: chosen without labels with --data)")
    g.add_argument("--anchor-free", action=argparse.BooleanOptionalAction, default=None,
                   help="align every model to a common barycentre (MergeMany), not to the anchor")
    if not sweep:
        g.add_argument("--select", choices=SELECT,
                       help="with --data, fuse a few candidates for the options not given (cost, reg, residual, "
                            "refit) and keep the one that agrees best with the models' mean output on --data, no "
                            "labels read: kl (outputs are logits, the default), mse (other outputs) or off")
    g.add_argument("--tokens", metavar="all|cls|window:N")
    g.add_argument("--weights", metavar="W1,W2,...", help="model weights, like 0.5,0.5")
    g.add_argument("--max-iter", type=int, help="solver iteration limit")
    g.add_argument("--anchor", type=int, default=0, help="index of the model whose architecture is kept")
    g.add_argument("--data", metavar="PATH", help="data for activation costs (image folder, .npy/.npz, .txt, "
                                                  "datasets folder)")
    g.add_argument("--data-batch", type=int, default=16, help="batch size for --data (default 16)")
    g.add_argument("--data-limit", type=int, help="use at most this many samples of --data")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otfx", description="Fuse independently trained transformers with "
                                     "optimal transport over traced graphs.")
    parser.add_argument("--version", action="version", version=f"otfx {otfx.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the transport spaces of a model; draw its flow graph")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--dot", metavar="FILE", help="write the flow graph as DOT")
    p.add_argument("--graphml", metavar="FILE", help="write the flow graph as GraphML")
    p.add_argument("--png", metavar="FILE", help="draw the flow graph as PNG")
    p.add_argument("--all", action="store_true", help="list every space (default: the first 60)")
    p.add_argument("--overwrite", action="store_true", help="replace existing drawings written by otfx")
    _model_options(p)
    _common(p)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("export", help="export a model to ONNX (dynamic axes), optionally checked with onnxruntime")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, metavar="FILE.onnx")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch on fresh inputs")
    p.add_argument("--with-mask", action="store_true", help="token models: also export attention_mask (and "
                   "token_type_ids where forward takes them) as graph inputs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _model_options(p)
    _common(p)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("fuse", help="fuse models into one, saved like the anchor, with report.json")
    p.add_argument("models", nargs="*", metavar="MODEL", help="models to fuse, the anchor first (or in --config)")
    p.add_argument("--out", metavar="DIR", help="new folder for the fused model (required, here or in --config)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx and check it")
    p.add_argument("--config", metavar="YAML", help="models, out, weights and options in a YAML file (mergekit "
                   "style: models: [a, b], weights: [0.5, 0.5], options: {reg: 0.03}); flags given here win")
    p.add_argument("--dry-run", action="store_true", help="load and trace, print the spaces and the plan of "
                   "work; fuse and write nothing")
    p.add_argument("--lazy", action="store_true", help="stream two HF safetensors checkpoints: trace on the meta "
                   "device, read each tensor when needed, write each fused tensor at once (weights cost only)")
    p.add_argument("--out-shard-size", default="5GB", metavar="SIZE", help="with --lazy: shard size (default 5GB)")
    _fusion_flags(p)
    _model_options(p)
    _common(p)
    p.set_defaults(run=cmd_fuse)

    p = sub.add_parser("sweep", help="fuse over regularisations, costs, residual policies and repair; score each "
                       "(and vanilla fusion, the ensemble) on held-out data; keep the best")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--eval", required=True, metavar="PATH", help="held-out data (.npz with x and y for accuracy)")
    p.add_argument("--regs", default="0.01,0.03,0.06,0.1", help="regularisations, and emd for one EMD row "
                   "(default 0.01,0.03,0.06,0.1)")
    p.add_argument("--costs", metavar="C1,C2|all", help=f"costs to sweep ({', '.join(choices()['cost'])}); "
                   "default: --cost only")
    p.add_argument("--residuals", metavar="R1,R2|all", help="residual policies to sweep "
                   f"({', '.join(choices()['residual'])}); default: --residual only")
    p.add_argument("--metric", choices=["accuracy", "loss"], help="default: accuracy with labels, else loss")
    p.add_argument("--eval-limit", type=int, help="use at most this many samples of --eval")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--save-best", action="store_true", help="also save the best fused model in DIR/best")
    _fusion_flags(p, sweep=True)
    _model_options(p)
    _common(p)
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser("demo", help="run the end-to-end demo (otfx.demo; 'otfx demo --help' for its "
                       "options)", add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="arguments for the demo")
    p.set_defaults(run=cmd_demo, quiet=False, debug=False)
    parser.commands = sub.choices  # for usage errors that belong to a subcommand
    return parser


def _handled_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OtfxInputError, TraceError, ValueError, OSError, RuntimeError]
    with contextlib.suppress(ImportError):
        from otfx.export.onnx import OnnxExportError

        errors.append(OnnxExportError)
    return tuple(errors)


#: exit statuses, one per class of failure
EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _status(err: BaseException) -> int:
    """2: the inputs or options cannot be used (nothing was attempted); 1: the run or a check failed."""
    if isinstance(err, (OtfxInputError, ModelInputError, NonFiniteParameterError, FileNotFoundError,
                        IsADirectoryError, NotADirectoryError, PermissionError)):
        return EXIT_INPUT
    return EXIT_FAILED


def _one_line_warnings(command: str):
    """Warnings as one line each on stderr (``otfx fuse: warning: ...``), without source lines."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        _stderr_line(f"otfx {command}: warning: {text}")

    return show


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse; an unknown flag is reported with the usage of the subcommand it was given to."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser.commands.get(getattr(args, "command", None) or "", parser)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    args.subparser = parser.commands.get(getattr(args, "command", None) or "")
    return args


def _merge_config(args: argparse.Namespace, sub: argparse.ArgumentParser) -> None:
    """Fill what the command line left at its defaults from a YAML file (``models``, ``out``, ``weights``,
    any flag by its long name, and the same under ``options``). Paths are relative to the current folder."""
    import yaml

    path = Path(args.config)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise OtfxInputError(f"cannot read --config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise OtfxInputError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise OtfxInputError(f"--config {path} must hold a mapping (models:, out:, options: ...)")
    flat = {**{k: v for k, v in config.items() if k != "options"}, **(config.get("options") or {})}
    dests = {a.dest: a for a in sub._actions if a.dest not in ("help", "config", "run")}
    for key, value in flat.items():
        dest = str(key).replace("-", "_")
        if dest == "models":
            if args.models:
                continue
            specs, checkpoints = [], []
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    specs.append(str(item.get("model") or item.get("path")))
                    if item.get("checkpoint"):
                        checkpoints.append(str(item["checkpoint"]))
                else:
                    specs.append(str(item))
            args.models = specs
            if checkpoints and not args.checkpoint:
                args.checkpoint = checkpoints
            continue
        if dest not in dests:
            known = ", ".join(sorted(d.replace("_", "-") for d in dests))
            raise OtfxInputError(f"--config {path}: unknown key {key!r}; known: models, options, {known}")
        if getattr(args, dest) != sub.get_default(dest):
            continue  # the command line wins
        if dest == "weights" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif dest == "model_kwargs" and isinstance(value, dict):
            import json

            value = json.dumps(value)
        elif dest == "checkpoint" and not isinstance(value, list):
            value = [value]
        action = dests[dest]
        if isinstance(value, bool) and action.choices is not None and "off" in action.choices:
            value = "on" if value else "off"  # YAML reads a bare off/on as a boolean
        if action.type is not None and not isinstance(value, (list, bool)):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise OtfxInputError(f"--config {path}: {key}={value!r} is not a valid --{key}") from None
        if action.choices is not None and value not in action.choices:
            raise OtfxInputError(f"--config {path}: {key}={value!r} is not one of {', '.join(action.choices)}")
        setattr(args, dest, value)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 ok, 1 a run or check failed, 2 unusable input or
    options, 130 interrupted (SIGINT), 128 + N killed by signal N (SIGTERM: 143). Temporary outputs are removed
    on every way out."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on a Ctrl-C is a KeyboardInterrupt
    try:
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["demo"]:  # everything after 'demo' belongs to the demo, --help included
            argv = ["demo", "--", *argv[1:]]
        try:
            args = _parse(parser, argv)
        except SystemExit as exit_:  # argparse exits on --help and usage errors; report the status instead
            return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_INPUT
        return _run(args)
    except KeyboardInterrupt:
        print("otfx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as err:
        print(f"otfx: {err}", file=sys.stderr)
        return 128 + err.signum


def _run(args: argparse.Namespace) -> int:
    handled = _handled_errors()
    with terminate_as_exception(), warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = _one_line_warnings(args.command)
        try:
            if getattr(args, "config", None):
                _merge_config(args, args.subparser)
            with quiet_hf_progress():
                return int(args.run(args) or 0)
        except BrokenPipeError:  # stdout closed early (| head): not an error
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter from failing at exit
            return EXIT_OK
        except handled as err:
            if args.debug:
                raise
            message = str(err).strip() or type(err).__name__
            print(f"otfx {args.command}: error: {message}", file=sys.stderr)
            return _status(err)
        except KeyboardInterrupt:
            print(f"otfx {args.command}: interrupted; temporary files were removed", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated as err:
            print(f"otfx {args.command}: {err}; temporary files were removed", file=sys.stderr)
            return 128 + err.signum
