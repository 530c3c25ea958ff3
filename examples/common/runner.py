"""Shared helpers of the experiment scripts: cached parents, fusion variants, reg choice on validation data,
markdown tables, PNG plots and the record of the command that produced them."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Split
from .train import build_vit, cached_parent, evaluate_accuracy, train_classifier, vit_config

__all__ = [
    "ViTSpec", "Variant", "Timer", "vit_parent", "vit_parent_dir", "activation_data", "run_variant", "reg_sweep",
    "best_row", "accuracy_of", "command_line", "markdown_table", "fmt_acc", "fmt_list", "write_markdown",
    "write_json", "line_plot", "bar_plot", "results_dir", "environment", "image_setup",
    "example_parser", "output_dir", "mean_std", "finetune_best_lr", "parent_steps",
    "choose_sinkhorn", "verdict",
]

DEFAULT_REGS: tuple[float, ...] = (0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5)


# ----------------------------------------------------------------------------------------------- parents


@dataclass(frozen=True)
class ViTSpec:
    """Architecture and training budget of one ViT parent (everything that goes into its cache key)."""

    dataset: str = "digits"
    hidden: int = 64
    mlp: int = 128
    layers: int = 4
    heads: int = 4
    epochs: float = 30.0
    lr: float = 2e-3
    train_limit: int | None = None  # use only the first N training images (tests)

    @property
    def name(self) -> str:
        return f"{self.dataset}-vit-h{self.hidden}-m{self.mlp}-l{self.layers}-a{self.heads}"

    def config(self):
        return vit_config(self.dataset, hidden=self.hidden, mlp=self.mlp, layers=self.layers, heads=self.heads)


def _limited(split: Split, limit: int | None) -> Split:
    if limit is None or limit >= len(split.y_train):
        return split
    return Split(split.x_train[:limit], split.y_train[:limit], split.x_val, split.y_val, split.x_test,
                 split.y_test, split.mean, split.std, split.num_classes, split.name, split.indices)


def _parent_extra(split: Split, spec: ViTSpec) -> dict[str, Any]:
    rows = split.indices.get("train")
    epochs = int(spec.epochs) if float(spec.epochs).is_integer() else spec.epochs  # 3 and 3.0: one cache entry
    return {"epochs": epochs, "lr": spec.lr, "data": split.name,
            "n_train": len(_limited(split, spec.train_limit).y_train),
            "split_rows": int(rows.sum()) if rows is not None else None}  # a fingerprint of the held-out split


def vit_parent_dir(split: Split, spec: ViTSpec, seed: int, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`vit_parent` caches this parent (``meta.json`` there once it is trained)."""
    from .data import cache_root
    from .train import parent_key

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "parents"
    return root / parent_key(spec.name, build_vit(spec.config(), seed), seed, _parent_extra(split, spec))


def vit_parent(split: Split, spec: ViTSpec, seed: int, *, progress: bool | str = True,
               cache_dir: str | Path | None = None) -> nn.Module:
    """A ViT parent trained once on ``split`` (init and batch order from ``seed``) and cached afterwards."""
    train_split = _limited(split, spec.train_limit)
    extra = _parent_extra(split, spec)

    def train(model: nn.Module) -> nn.Module:
        return train_classifier(model, train_split, epochs=spec.epochs, seed=seed, lr=spec.lr,
                                progress=progress if isinstance(progress, str) else
                                (f"train {spec.name} seed {seed}" if progress else False))

    return cached_parent(spec.name, lambda: build_vit(spec.config(), seed), train, cache_dir, seed=seed,
                         extra=extra)


def image_setup(smoke: bool = False) -> tuple[Split, ViTSpec]:
    """The image experiments' data and parents: Fashion-MNIST with the 64/128/4 ViT for 3 epochs, or (``smoke``,
    for tests) digits with a 16/32/1 ViT for 1 epoch on 300 images."""
    from .data import load_digits_split, load_fashion_mnist

    if smoke:
        return load_digits_split(), ViTSpec("digits", hidden=16, mlp=32, layers=1, heads=2, epochs=1.0,
                                            train_limit=300)
    return load_fashion_mnist(), ViTSpec("fashion-mnist", epochs=3.0)


def load_example(file: str):
    """Another script of examples/ as a module (to reuse its setup: 05's BERT parents, 06's BERT pair)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / file
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def datasets_main(argv: Sequence[str] | None, doc: str | None, name: str, title: str, header: dict,
                  image_entry: Callable[..., dict], bert_entry: Callable[[], dict],
                  page: Callable[[dict], str]) -> int:
    """The main of an example over ``--datasets`` digits (30-epoch ViTs), Fashion-MNIST (``image_setup``) and the
    BERT pair: ``image_entry(split, spec, seeds)`` per image dataset, ``bert_entry()``; writes results.json and
    README.md (``page(results)``) with ``header`` at the top of the results."""
    from .data import load_digits_split

    p = example_parser(doc, name)
    p.add_argument("--datasets", default="digits,fashion-mnist,bert")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    out = output_dir(args, name)
    wanted = args.datasets.split(",")
    results: dict = {"command": command_line(), "environment": environment(), **header}
    if "digits" in wanted:
        print("digits", flush=True)
        results["digits"] = image_entry(load_digits_split(), ViTSpec("digits", epochs=30), [0, 1, 2, 3])
    if "fashion-mnist" in wanted:
        print("fashion-mnist", flush=True)
        split, spec = image_setup(False)
        results["fashion-mnist"] = image_entry(split, spec, [0, 1, 2, 3])
    if "bert" in wanted:
        print("bert", flush=True)
        results["bert"] = bert_entry()
    seconds = results["seconds"] = time.perf_counter() - t_start
    write_json(out / "results.json", results)
    write_markdown(out / "README.md", title, results["command"], page(results), seconds)
    print(f"wrote {out / 'README.md'} in {seconds:.0f} s")
    return 0


def example_parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """The options every example script takes: ``--out`` (results folder) and ``--smoke`` (a seconds-long run)."""
    p = argparse.ArgumentParser(description=(doc or name).strip().splitlines()[0])
    p.add_argument("--out", type=Path, help=f"results folder (default docs/results/{name} under the current "
                   "directory: run from the repository root)")
    p.add_argument("--smoke", action="store_true", help="tiny models on digits for a few seconds (tests); does "
                   "not write into docs/results unless --out says so")
    return p


def output_dir(args: argparse.Namespace, name: str) -> Path:
    """``--out``, else ``docs/results/<name>`` under the current directory (``<cache>/smoke/<name>`` for
    ``--smoke``)."""
    from .data import cache_root

    if args.out is not None:
        out = Path(args.out)
    elif getattr(args, "smoke", False):
        out = cache_root() / "smoke" / name
    else:
        out = results_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    return out


def parent_steps(split: Split, spec: ViTSpec, batch: int = 128) -> int:
    """Optimiser steps one parent was trained for (as :func:`~.train.train_classifier` counts them)."""
    n = len(_limited(split, spec.train_limit).y_train)
    return max(1, round(spec.epochs * math.ceil(n / batch)))


def finetune_schedule(split: Split, spec: ViTSpec, budget: float, smoke: bool = False
                      ) -> tuple[int, int, list[int]]:
    """(parent steps, finetune steps = ``budget`` of them rounded down to tens, evaluation checkpoints)."""
    parents = parent_steps(split, spec)
    steps = 4 if smoke else max(2, int(budget * parents) // 10 * 10)
    eval_at = sorted({0, *(round(steps * f) for f in (0.125, 0.25, 0.5, 0.75)), steps})
    return parents, steps, eval_at


def activation_data(x: torch.Tensor, n: int = 256, batch: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """``n`` inputs drawn (by ``seed``) from ``x`` (a training set), as batches for activation-based costs."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:n]
    return [x[idx[i:i + batch]] for i in range(0, len(idx), batch)]


# ----------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One way of combining the parents: ``kind`` "fuse" (options go to ``otfx.fuse``), "vanilla" or "ensemble"."""

    name: str
    kind: str = "fuse"
    options: Mapping[str, Any] = field(default_factory=dict)

    def with_options(self, **options: Any) -> Variant:
        return Variant(self.name, self.kind, {**self.options, **options})


class Timer:
    """Wall-clock seconds of named steps, in order."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - t0


def run_variant(variant: Variant, models: Sequence[nn.Module], traced: Sequence[Any] | None = None,
                data: list | None = None) -> tuple[nn.Module, float]:
    """Build ``variant`` from ``models`` (``traced``: their ``otfx.trace`` results, for fusion); returns
    ``(model, seconds)``."""
    import otfx

    t0 = time.perf_counter()
    if variant.kind == "ensemble":
        model = otfx.ensemble(*models, **variant.options)
    elif variant.kind == "vanilla":
        model = otfx.vanilla_fuse(*models, **variant.options)
    elif variant.kind == "fuse":
        if traced is None:
            raise ValueError(f"variant {variant.name!r} needs the traced models")
        options = dict(variant.options)
        options.setdefault("residual", "mean")  # the paper's policy, as the pages report it (otfx's default rotates)
        if options.get("cost") == "activations" or str(options.get("residual", "")).startswith("weighted"):
            if data is None:
                raise ValueError(f"variant {variant.name!r} needs activation data")
            options["data"] = data
            options.setdefault("repair", False)  # the paper's method, as the pages report it (fuse repairs with data)
            options.setdefault("refit", False)  # and refits with data
        model = otfx.fuse(*traced, **options)
    else:
        raise ValueError(f"variant {variant.name!r}: unknown kind {variant.kind!r}")
    return model.eval(), time.perf_counter() - t0


def reg_sweep(variant: Variant, models: Sequence[nn.Module], traced: Sequence[Any], score: Callable[[nn.Module], float],
              regs: Sequence[float] = DEFAULT_REGS, data: list | None = None,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Fuse with each Sinkhorn ``reg`` and score each result (on *validation* data); failures are kept as rows
    with ``score = None`` and the error."""
    rows = []
    for reg in regs:
        if progress is not None:
            progress(f"{variant.name} reg {reg:g}")
        try:
            model, seconds = run_variant(variant.with_options(solver="sinkhorn", reg=reg), models, traced, data)
        except (ValueError, ArithmeticError) as err:
            rows.append({"reg": reg, "score": None, "seconds": None, "error": str(err).splitlines()[0][:200]})
            continue
        rows.append({"reg": reg, "score": score(model), "seconds": seconds})
    return rows


def choose_sinkhorn(variants: Sequence[Variant], models: Sequence[nn.Module], traced: Sequence[Any],
                    score: Callable[[nn.Module], float], regs: Sequence[float], data: list | None = None
                    ) -> tuple[Variant, list[dict[str, Any]]]:
    """The variant and Sinkhorn reg with the best ``score`` (a *validation* scorer) over ``variants x regs``;
    returns the chosen variant (solver and reg set) and every tried row."""
    rows = []
    for variant in variants:
        rows += [{**r, "options": dict(variant.options)} for r in reg_sweep(variant, models, traced, score, regs,
                                                                              data)]
    best = best_row(rows)
    chosen = next(v for v in variants if dict(v.options) == best["options"])
    return chosen.with_options(solver="sinkhorn", reg=best["reg"]), rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; std 0 for one value."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def verdict(text: str, a: tuple[float, float], b: tuple[float, float], min_gap: float = 0.005) -> str:
    """A markdown bullet on the claim "a beats b" for accuracies ``(mean, std)``: it reproduces (or not) only when
    the gap exceeds both stds together and ``min_gap``; otherwise there is no clear difference."""
    (ma, sa), (mb, sb) = a, b
    margin = max(min_gap, sa + sb)
    numbers = f"({fmt_acc(ma)} vs {fmt_acc(mb)})"
    if ma - mb > margin:
        return f"- reproduces: {text} {numbers}"
    if mb - ma > margin:
        return f"- **does not reproduce**: {text} {numbers}"
    return f"- no clear difference (within {100 * margin:.2f} points): {text} {numbers}"


def best_row(rows: Sequence[Mapping[str, Any]], key: str = "score", higher: bool = True) -> Mapping[str, Any]:
    """The row with the best finite ``key`` (first on ties)."""
    scored = [r for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    if not scored:
        raise ValueError("no row has a finite score: " + "; ".join(str(r.get("error", "?")) for r in rows))
    return (max if higher else min)(scored, key=lambda r: r[key])


def accuracy_of(split: Split, part: str) -> Callable[[nn.Module], float]:
    """A scorer: accuracy of a model on ``part`` of ``split``."""
    x, y = split.part(part)
    return lambda model: evaluate_accuracy(model, x, y)


def finetune_best_lr(model: nn.Module, split: Split, *, steps: int, lrs: Sequence[float], eval_at: Sequence[int],
                     seed: int = 100, progress: bool | str = True) -> dict[str, Any]:
    """Finetune a copy of ``model`` for ``steps`` steps with each learning rate; keep the one whose final
    *validation* accuracy is best and rerun it (the same batches, so the same run) with validation and test
    accuracy at ``eval_at``. Returns its ``lr``, its curve (``steps``, ``val``, ``test``) and every lr's final
    validation accuracy."""
    import copy

    from .train import finetune

    def label(what: str) -> bool | str:
        return f"{progress} {what}" if isinstance(progress, str) else progress

    final_val = {}
    for lr in lrs if len(lrs) > 1 else ():
        _, curve = finetune(copy.deepcopy(model), split, steps=steps, seed=seed, lr=lr, eval_at=(steps,),
                            eval_parts=("val",), progress=label(f"lr {lr:g}"))
        final_val[lr] = curve.acc["val"][-1]
    best = max(final_val, key=final_val.get) if final_val else lrs[0]
    _, curve = finetune(copy.deepcopy(model), split, steps=steps, seed=seed, lr=best,
                        eval_at=sorted({0, *eval_at, steps}), progress=label(f"lr {best:g}, curve"))
    return {"lr": best, "steps": curve.steps, "val": curve.acc["val"], "test": curve.acc["test"],
            "final_val_by_lr": final_val or {best: curve.acc["val"][-1]}}


# ----------------------------------------------------------------------------------------------- reports


def results_dir(name: str, root: str | Path | None = None) -> Path:
    """``<root>/<name>``, created if needed; ``root`` defaults to ``docs/results`` under the current directory."""
    d = Path(root) if root is not None else Path("docs") / "results"
    d = d / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def command_line(argv: Sequence[str] | None = None, env: Sequence[str] = ("OMP_NUM_THREADS",)) -> str:
    """The command that is running, as typed from the current directory (``python <script> args``), with the
    given environment variables in front."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]) if argv else Path("?")
    try:
        shown = str(script.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(script)
    prefix = [f"{k}={os.environ[k]}" for k in env if k in os.environ]
    if shown.endswith("__main__.py") or shown.endswith("otfx/cli.py"):
        return shlex.join([*prefix, "python", "-m", "otfx", *argv[1:]])
    return shlex.join([*prefix, "python", shown, *argv[1:]])


def environment() -> dict[str, Any]:
    """Versions, CPU threads and the git commit of the code that ran, for the record."""
    import transformers

    import otfx

    code = Path(otfx.__file__).resolve().parent  # the library's version is what the numbers depend on
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/otfx", ":/passes"], cwd=code,
                               capture_output=True, text=True, timeout=10, check=False).stdout
        dirty_paths = sorted({ln[3:] for ln in dirty.splitlines() if len(ln) > 3})  # "XY path"
        if commit and dirty_paths:  # the library had uncommitted edits when the numbers were made
            commit += " + uncommitted changes to " + ", ".join(dirty_paths)
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "git_commit": commit}


def fmt_acc(value: float | None, digits: int = 2) -> str:
    """An accuracy in [0, 1] as a percentage (``-`` for missing)."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}"


def fmt_list(values: Sequence[float], digits: int = 2) -> str:
    """Several accuracies as ``[a, b, ...]`` percentages."""
    return "[" + ", ".join(fmt_acc(v, digits) for v in values) + "]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one of ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align {align!r} does not have one letter per column ({len(headers)})")
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(sep) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def write_markdown(path: str | Path, title: str, command: str, body: str, seconds: float | None = None) -> Path:
    """Write a results page: the title, the exact command first, then ``body`` and the environment."""
    from otfx.io import atomic_file

    env = environment()
    lines = [f"# {title}", "", "Produced by:", "", "```sh", command, "```", ""]
    if seconds is not None:
        lines += [f"Wall time: {seconds:.0f} s (cached parents are reused on later runs).", ""]
    lines += [body.rstrip(), "", "---", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    with atomic_file(path) as handle:
        handle.write("\n".join(lines))
    return Path(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Raw numbers next to the markdown (non-finite floats become null)."""
    from otfx.io import atomic_file

    with atomic_file(path) as handle:
        json.dump(_jsonable(payload), handle, indent=1)
        handle.write("\n")
    return Path(path)


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    from otfx.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def line_plot(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
              xlabel: str, ylabel: str, title: str = "", refs: Mapping[str, float] | None = None,
              errors: Mapping[str, Sequence[float]] | None = None, logx: bool = False,
              marks: Mapping[str, tuple[float, float]] | None = None, size: tuple[float, float] = (6.0, 4.0)) -> Path:
    """Lines ``name -> (x, y)`` (optional error bars), horizontal reference lines and starred points."""
    fig = _figure(size)
    ax = fig.add_subplot()
    for i, (name, (x, y)) in enumerate(series.items()):
        err = (errors or {}).get(name)
        if err is not None:
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, color=f"C{i}", label=name)
        else:
            ax.plot(x, y, "o-", ms=4, color=f"C{i}", label=name)
    n = len(series)
    for j, (name, value) in enumerate((refs or {}).items()):
        ax.axhline(value, ls="--", lw=1.2, color=f"C{n + j}", label=name)
    for name, (x, y) in (marks or {}).items():
        ax.plot([x], [y], "*", ms=13, color="black", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def bar_plot(path: str | Path, groups: Mapping[str, Mapping[str, float]], *, ylabel: str, title: str = "",
             refs: Mapping[str, float] | None = None, size: tuple[float, float] = (7.0, 4.0)) -> Path:
    """Grouped bars: ``groups[group][bar] = value`` (bars with the same name share a colour)."""
    fig = _figure(size)
    ax = fig.add_subplot()
    names: list[str] = []
    for g in groups.values():
        names += [b for b in g if b not in names]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k, g in enumerate(groups.values()) if name in g]
        ys = [g[name] for g in groups.values() if name in g]
        bars = ax.bar(xs, ys, width, color=f"C{i}", label=name)
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=6)
    for j, (name, value) in enumerate((refs or {}).items()):
        ax.axhline(value, ls=":", lw=1, color=f"C{len(names) + j}", label=name)
    long = max(len(g) for g in groups) > 60 / max(1, len(groups))  # labels that would overlap: slant them
    ax.set_xticks(range(len(groups)), list(groups), rotation=20 if long else 0, ha="right" if long else "center",
                  fontsize=8)
    top = max([v for g in groups.values() for v in g.values()] + list((refs or {}).values()))
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    return _save(fig, path)
