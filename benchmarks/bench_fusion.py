"""Time ``otfx.fuse`` stage by stage and measure its peak memory; write ``benchmarks/RESULTS.md``.

Configurations: the paper's ViT (HF ``ViTForImageClassification``, image 32, patch 4, hidden 384, MLP 1536, 7 layers,
12 heads) fused by weights with Sinkhorn (reg 0.06) and EMD, and by activations of 200 digits images (8x8 upscaled
to 32x32, 3 channels) end to end (trace + collect + fuse); a BERT-base pair (``BertForMaskedLM``, hidden 768, MLP
3072, 12 layers, 12 heads, vocabulary 30522); curves of time and peak memory against width (hidden 128..768 at
depth 4) and depth (2..12 at hidden 384) of the ViT. Parents are "random" (two seeds) or "structured" (a model and
a permuted copy of it with Gaussian noise of 0.5 x each tensor's std, like two runs from one initialisation:
solvers iterate differently on such costs).

Each configuration runs in its own process with one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``):
the targets in a fresh interpreter, the curves in a child forked from a warm parent (imports done, two tiny models
fused once; a forked child does not count the shared libraries' pages in its RSS until it touches them, ~300 MB
less than a fresh interpreter, so the curves plot the peak *above* the RSS before fusing). Reported: min of 3 runs
(1 run when the first takes over ``--slow`` seconds; the targets always get 3, except POT's Sinkhorn on the
structured ViT pair) of wall and process-CPU time, the stage times of ``fused.otfx_report["timings"]`` from the
fastest run, and the process's peak RSS (``ru_maxrss``: imports, both models, tracing and fusion) next to its RSS
just before fusing.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/bench_fusion.py`` (``--only NAME ...`` for a
subset, ``--tag before`` with ``PYTHONPATH`` pointing at another checkout to time that one; ``--no-write`` leaves
RESULTS.md alone). Raw results go to ``benchmarks/results/bench_fusion[_TAG].json``, curves to
``benchmarks/results/bench_fusion_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: two threads on a shared 2-core box crawl
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KEEP = "## Discussion"  # RESULTS.md keeps everything from this heading on when the tables are rewritten

PAPER_VIT = {"model": "vit", "hidden": 384, "layers": 7, "heads": 12, "mlp": 1536}
BERT_BASE = {"model": "bert", "hidden": 768, "layers": 12, "heads": 12, "mlp": 3072}
CURVES = (("random", "sinkhorn"), ("random", "emd"), ("structured", "emd"))  # (parents, solver) of the curves


def _configs() -> dict[str, dict]:
    c: dict[str, dict] = {}
    for parents in ("random", "structured"):
        for solver in ("sinkhorn", "emd", "sinkhorn_torch"):
            c[f"vit_{solver}_{parents}"] = {**PAPER_VIT, "parents": parents, "cost": "weights", "solver": solver}
    c["vit_acts_window6"] = {**PAPER_VIT, "parents": "random", "cost": "activations", "solver": "emd",
                             "tokens": ["window", 6], "images": 200, "batch": 50}
    c["vit_acts_all"] = {**PAPER_VIT, "parents": "random", "cost": "activations", "solver": "emd", "tokens": "all",
                         "images": 200, "batch": 50, "runs": 1}
    c["vit_acts_window6_traced2"] = {**c["vit_acts_window6"], "trace_batch": 2, "runs": 1}
    for solver in ("sinkhorn", "emd"):
        c[f"bert_base_{solver}"] = {**BERT_BASE, "parents": "random", "cost": "weights", "solver": solver}
    for parents, solver in CURVES:
        for hidden in (128, 256, 384, 768):
            c[f"width_{hidden}_{solver}_{parents}"] = {
                "model": "vit", "hidden": hidden, "layers": 4, "heads": hidden // 32, "mlp": 4 * hidden,
                "parents": parents, "cost": "weights", "solver": solver, "curve": "width"}
        for layers in (2, 8, 12):
            c[f"depth_{layers}_{solver}_{parents}"] = {
                **PAPER_VIT, "layers": layers, "parents": parents, "cost": "weights", "solver": solver,
                "curve": "depth"}
    return c


CONFIGS = _configs()
for _name in ("vit_sinkhorn_random", "vit_sinkhorn_structured", "vit_emd_random", "vit_emd_structured",
              "vit_acts_window6", "bert_base_sinkhorn", "bert_base_emd"):
    # the targets: a fresh interpreter each (its RSS includes the shared libraries' pages, which a forked child
    # does not count), and all 3 runs however slow, except POT's Sinkhorn on the structured pair (~30 s a run)
    CONFIGS[_name].update(fresh=True, slow=1e9 if _name != "vit_sinkhorn_structured" else 12.0)
# (config, target seconds, target peak RSS as a multiple of the two models' size)
TARGETS = [("vit_sinkhorn_random", 0.5, None), ("vit_sinkhorn_structured", 0.5, None),
           ("vit_emd_random", 2.5, None), ("vit_emd_structured", 2.5, None), ("vit_acts_window6", 8.0, None),
           ("bert_base_sinkhorn", 30.0, 3.0), ("bert_base_emd", 30.0, 3.0)]


# ------------------------------------------------------------------------------------------------------ worker


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(cfg: dict, seed: int):
    import torch

    torch.manual_seed(seed)
    if cfg["model"] == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=cfg["hidden"],
                           num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                           intermediate_size=cfg["mlp"], num_labels=10)
        return ViTForImageClassification(config).eval()
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                        intermediate_size=cfg["mlp"])
    return BertForMaskedLM(config).eval()


def _digits(n: int):
    """``n`` scikit-learn digits, bilinearly upscaled from 8x8 to 32x32, as 3 standardised channels."""
    import torch
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None]
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - x.mean()) / x.std()


def worker(cfg: dict) -> dict:
    import gc
    import resource
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import otfx
    from otfx.symmetry import noisy_copy

    if cfg["model"] == "vit":
        images = _digits(cfg.get("images", 2))
        args = (images[:cfg.get("trace_batch", cfg.get("batch", 2))],)
        data = ([(images[i:i + cfg["batch"]],) for i in range(0, len(images), cfg["batch"])]
                if cfg["cost"] == "activations" else None)
    else:
        args, data = (torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0)),), None
    a = _build(cfg, 0)
    start = time.perf_counter()
    ta = otfx.trace(a, args)
    b = _build(cfg, 1) if cfg["parents"] == "random" else noisy_copy(ta)
    tb = otfx.trace(b, args)
    trace_s = time.perf_counter() - start
    size_mb = sum(p.numel() * p.element_size() for m in (a, b) for p in m.parameters()) / 2**20
    kwargs = {"cost": cfg["cost"], "solver": cfg["solver"], "reg": cfg.get("reg", 0.06), "data": data}
    if "tokens" in cfg:
        kwargs["tokens"] = tuple(cfg["tokens"]) if isinstance(cfg["tokens"], list) else cfg["tokens"]
    rss_before = _rss_mb()
    runs = []
    for i in range(cfg.get("runs", 3)):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        timings = {}
        if cfg["cost"] == "activations":  # end to end: tracing is part of it
            t0 = time.perf_counter()
            ta, tb = otfx.trace(a, args), otfx.trace(b, args)
            timings["trace"] = time.perf_counter() - t0
        fused = otfx.fuse(ta, tb, **kwargs)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        timings.update(fused.otfx_report.get("timings", {}))
        maps = fused.otfx_report.get("maps", [])
        runs.append({"wall_s": wall, "cpu_s": cpu, "timings": timings,
                     "iterations": [m.get("iterations", 0) for m in maps],
                     "methods": sorted({m.get("method", "") for m in maps})})
        del fused
        if i == 0 and wall > cfg.get("slow", 12.0):
            break
    best = min(runs, key=lambda r: r["wall_s"])
    return {"config": cfg, "otfx": otfx.__file__, "runs": len(runs), "wall_s": best["wall_s"],
            "cpu_s": min(r["cpu_s"] for r in runs), "all_wall_s": [r["wall_s"] for r in runs],
            "timings": best["timings"], "iterations": [min(best["iterations"], default=0),
                                                       max(best["iterations"], default=0)],
            "methods": best["methods"], "setup_trace_s": trace_s, "models_mb": size_mb,
            "params_m": sum(p.numel() for p in a.parameters()) / 1e6,
            "rss_before_mb": rss_before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------------------ driver


def warm_up() -> None:
    """Import everything and fuse two tiny models once, so that forked children start warm."""
    import torch

    torch.set_num_threads(1)
    import otfx

    tiny = {"model": "vit", "hidden": 32, "layers": 1, "heads": 2, "mlp": 64}
    args = (_digits(2),)
    ta, tb = otfx.trace(_build(tiny, 0), args), otfx.trace(_build(tiny, 1), args)
    otfx.fuse(ta, tb, solver="emd")
    _build(BERT_BASE | {"layers": 1, "hidden": 32, "heads": 2, "mlp": 64}, 0)


def run_fresh(name: str, cfg: dict, timeout: float) -> dict:
    """Run one configuration in a new interpreter (``--worker``)."""
    import subprocess

    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "config": cfg, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"name": name, "config": cfg, "error": (proc.stderr or proc.stdout).strip()[-2000:]}
    out = json.loads(lines[-1])
    out.update(name=name, process_s=time.perf_counter() - start, load_avg=os.getloadavg(), process="fresh")
    return out


def run_config(name: str, slow: float, timeout: float) -> dict:
    """Run one configuration in a new interpreter (``fresh`` configurations) or in a forked child of this warm
    process: its peak RSS is its own ``ru_maxrss``, which starts from this process's RSS (imports and the warm-up;
    see ``rss_before_mb``) less the shared libraries' pages that the child has not touched."""
    import select

    cfg = {"slow": slow, **CONFIGS[name]}
    if cfg.get("fresh"):
        return run_fresh(name, cfg, timeout)
    start = time.perf_counter()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            out = json.dumps(worker(cfg))
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            out = json.dumps({"error": f"{type(err).__name__}: {err}"[-2000:]})
        with os.fdopen(write, "w") as f:
            f.write(out)
        os._exit(0)
    os.close(write)
    chunks, deadline = [], start + timeout
    with os.fdopen(read) as f:
        while True:
            ready, _, _ = select.select([f], [], [], max(0.0, deadline - time.perf_counter()))
            if not ready:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return {"name": name, "config": cfg, "error": f"timed out after {timeout:.0f} s"}
            chunk = f.read()
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    text = "".join(chunks)
    out = json.loads(text) if text else {"error": "the child process died without a result"}
    out.update(name=name, config=out.get("config", cfg), process_s=time.perf_counter() - start,
               load_avg=os.getloadavg(), process="forked")
    return out


def machine() -> dict:
    import ot
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "pot": ot.__version__,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _stage(r: dict, *keys: str) -> float:
    return sum(r["timings"].get(k, 0.0) for k in keys)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def tables(results: dict[str, dict], before: dict[str, dict]) -> str:
    ok = {k: r for k, r in results.items() if "error" not in r}
    lines = ["## Targets", "",
             "Times in seconds (min of runs); RSS in MB, with its multiple of the two models' parameter size: the "
             "process's peak, and the peak above the RSS just before fusing.", "",
             "| configuration | target | before: wall / cpu | after: wall / cpu | peak RSS (x models) | "
             "above pre-fusion RSS (x models) | models MB | met |",
             "|---|---|---|---|---|---|---|---|"]
    for name, seconds, rss_x in TARGETS:
        r = ok.get(name)
        if r is None:
            lines.append(f"| {name} | <= {seconds:g} s | - | not run | | | | |")
            continue
        ratio = r["peak_rss_mb"] / r["models_mb"]
        extra = r["peak_rss_mb"] - r["rss_before_mb"]
        b = before.get(name)
        if b and "error" not in b:
            btext = f"{_fmt(b['wall_s'])} / {_fmt(b['cpu_s'])}"
        else:
            btext = b["error"].strip().splitlines()[-1][:90] if b else "-"
        met = r["wall_s"] <= seconds and (rss_x is None or ratio <= rss_x)
        target = f"<= {seconds:g} s" + (f", RSS < {rss_x:g}x" if rss_x else "")
        lines.append(f"| {name} | {target} | {btext} | {_fmt(r['wall_s'])} / {_fmt(r['cpu_s'])} | "
                     f"{r['peak_rss_mb']:.0f} ({ratio:.2f}x) | {extra:.0f} ({extra / r['models_mb']:.2f}x) | "
                     f"{r['models_mb']:.0f} | {'yes' if met else 'no'} |")
    lines += ["", "## Stages (fastest run, wall s)", "",
              "| configuration | runs | total | trace | collect | rows | cost | solve | plans+prepare | rewrite | "
              "other | iterations | RSS before MB | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in ok.items():
        t = r["timings"]
        total = r["wall_s"]
        known = _stage(r, "trace", "collect", "rows", "cost", "solve", "plans", "prepare", "rewrite")
        lines.append(
            f"| {name} | {r['runs']} | {_fmt(total)} | {_fmt(t.get('trace'))} | {_fmt(t.get('collect'))} | "
            f"{_fmt(t.get('rows'))} | {_fmt(t.get('cost'))} | {_fmt(t.get('solve'))} | "
            f"{_fmt(_stage(r, 'plans', 'prepare'))} | {_fmt(t.get('rewrite'))} | {_fmt(total - known)} | "
            f"{r['iterations'][0]}-{r['iterations'][1]} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][-200:]!r} |")
    if before:
        lines += ["", "## Before (the tree before this work, same script)", "",
                  "| configuration | runs | wall s | cpu s | peak RSS MB |", "|---|---|---|---|---|"]
        for name, r in before.items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'].strip().splitlines()[-1][:160]} | | | |")
            else:
                lines.append(f"| {name} | {r['runs']} | {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} | "
                             f"{r['peak_rss_mb']:.0f} |")
    lines += ["", "## Curves (ViT, weights; width at depth 4, depth at hidden 384)", "",
              "| curve | hidden | layers | solver | parents | params (M, one model) | wall s | cpu s | solve s | "
              "peak RSS MB | RSS before MB | process |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = {"width": "hidden", "depth": "layers"}
    for curve, r in sorted(_curve_points(ok), key=lambda x: (x[0], x[1]["config"]["solver"],
                                                             x[1]["config"]["parents"], x[1]["config"][key[x[0]]])):
        c = r["config"]
        lines.append(f"| {curve} | {c['hidden']} | {c['layers']} | {c['solver']} | {c['parents']} | "
                     f"{r['params_m']:.1f} | {_fmt(r['wall_s'])} | "
                     f"{_fmt(r['cpu_s'])} | {_fmt(r['timings'].get('solve'))} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_before_mb']:.0f} | {r.get('process', '')} |")
    return "\n".join(lines) + "\n"


def _curve_points(results: dict[str, dict]) -> list[tuple[str, dict]]:
    """(curve, result) pairs: the width sweep, and the depth sweep with the width sweep's hidden-384 point
    (depth 4) and the paper's ViT (depth 7) added."""
    points = []
    for name, r in results.items():
        c = r["config"]
        if c.get("curve") == "width":
            points.append(("width", r))
            if c["hidden"] == 384:
                points.append(("depth", r))
        elif c.get("curve") == "depth":
            points.append(("depth", r))
        elif name.startswith("vit_") and c["cost"] == "weights" and (c["parents"], c["solver"]) in CURVES:
            points.append(("depth", r))
    return points


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    points = _curve_points({k: r for k, r in results.items() if "error" not in r})
    for col, (curve, key, label) in enumerate((("width", "hidden", "hidden size (depth 4)"),
                                               ("depth", "layers", "layers (hidden 384)"))):
        series: dict[tuple, list] = {}
        for which, r in points:
            c = r["config"]
            if which == curve:
                series.setdefault((c["solver"], c["parents"]), []).append(
                    (c[key], r["wall_s"], r["peak_rss_mb"] - r["rss_before_mb"], r["peak_rss_mb"]))
        for (solver, parents), pts in sorted(series.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [p[1] for p in pts], marker="o", label=f"{solver}, {parents}")
            axes[1][col].plot(xs, [p[2] for p in pts], marker="o", label=f"{solver}, {parents}")
        axes[0][col].set(xlabel=label, ylabel="fuse wall time, s (min of runs)", title=f"time vs {curve}")
        axes[1][col].set(xlabel=label, ylabel="peak RSS above pre-fusion RSS, MB", title=f"memory vs {curve}")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("otfx.fuse, two ViTs, weights-based, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(text: str, meta: dict, command: str, path: Path) -> None:
    old = path.read_text() if path.exists() else ""
    keep = old[old.index(KEEP):] if KEEP in old else f"{KEEP}\n\n(hand-written)\n"
    head = (f"# Fusion benchmarks\n\nCommand: `{command}` (wall {meta['elapsed_s']:.0f} s, load average "
            f"{meta['load_before'][0]:.1f} before / {meta['load_after'][0]:.1f} after).\n\n"
            f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
            f"{meta['machine']['memory_gb']} GB; Python {meta['machine']['python']}, torch "
            f"{meta['machine']['torch']}, transformers {meta['machine']['transformers']}, POT "
            f"{meta['machine']['pot']}; 1 thread. Raw results: `benchmarks/results/bench_fusion.json`; curves: "
            "`benchmarks/results/bench_fusion_curves.png`.\n\n")
    path.write_text(head + text + "\n" + keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="configuration names (default: all)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file (e.g. 'before')")
    parser.add_argument("--slow", type=float, default=12.0, help="one run only when the first takes longer (s)")
    parser.add_argument("--timeout", type=float, default=400.0, help="per configuration (s)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md and the plot")
    parser.add_argument("--render", action="store_true", help="only rewrite RESULTS.md and the plot from the JSON")
    opts = parser.parse_args()
    if opts.worker:
        print(json.dumps(worker(json.loads(opts.worker))))
        return
    if opts.render:
        saved = json.loads((RESULTS / "bench_fusion.json").read_text())
        render(saved["results"], saved["meta"])
        return
    names = opts.only or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_{opts.tag}" if opts.tag else ""
    start, load_before = time.perf_counter(), os.getloadavg()
    warm_up()
    results = {}
    for name in names:
        r = run_config(name, opts.slow, opts.timeout)
        results[name] = r
        status = r.get("error", "")[:200] or (f"{r['wall_s']:.3f} s wall, {r['cpu_s']:.3f} s cpu, peak "
                                              f"{r['peak_rss_mb']:.0f} MB, {r['runs']} run(s)")
        print(f"{name}: {status}", flush=True)
    meta = {"machine": machine(), "elapsed_s": time.perf_counter() - start, "load_before": load_before,
            "load_after": os.getloadavg(), "argv": sys.argv[1:]}
    out = RESULTS / f"bench_fusion{suffix}.json"
    if opts.only and out.exists():  # a partial run updates the file
        old = json.loads(out.read_text())
        results = {**old.get("results", {}), **results}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if not (opts.no_write or opts.tag):
        render(results, meta)


def render(results: dict[str, dict], meta: dict) -> None:
    """Rewrite RESULTS.md (up to its hand-written part) and the curves' plot."""
    before_path = RESULTS / "bench_fusion_before.json"
    before = json.loads(before_path.read_text())["results"] if before_path.exists() else {}
    argv = meta.get("argv") or []
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_fusion.py" + (" " + " ".join(argv) if argv else "")
    write_results(tables(results, before), meta, command, HERE / "RESULTS.md")
    plot(results, RESULTS / "bench_fusion_curves.png")


if __name__ == "__main__":
    main()
