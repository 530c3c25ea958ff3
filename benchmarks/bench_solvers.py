"""Time the transport-plan solvers of ``otfx.align.solvers`` and write ``benchmarks/RESULTS_solvers.md``.

Costs are ``torch.cdist(X, Y)`` of Gaussian rows (d = n clipped to [384, 3072]): "random" has independent X and
Y, "structured" has Y = X[perm] + 0.5 noise (two fine-tunes of one init). One thread, min of 3 runs (1 run when a
call takes over ``--slow`` seconds) of the process CPU time: the 2-core box is shared, and wall time under load
was 1.5-3x the CPU time. Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_solvers.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from otfx.align.solvers import OTFallbackWarning, PlanInfo, solve, solve_batch

METHODS = ["lsa", "emd", "sinkhorn", "sinkhorn_torch", "sinkhorn_log", "sinkhorn_torch_log"]
MAX_N = {"sinkhorn_log": 384, "sinkhorn_torch_log": 768}  # ~10-600 ms per iteration beyond this
VIT = [(38, 384), (7, 1536)]  # weight-based fusion of the paper's ViT: problems per width
KEEP = "## Conclusions"


def make_cost(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = min(max(n, 384), 3072)
    x = torch.randn(n, d, generator=g) / d**0.5
    noise = torch.randn(n, d, generator=g) / d**0.5
    y = noise if kind == "random" else x[torch.randperm(n, generator=g)] + 0.5 * noise
    return torch.cdist(x, y)


def timed(fn: Callable[[], object], slow: float) -> tuple[float, object]:
    """Min CPU time over 3 runs (1 if the first is slower than ``slow`` seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OTFallbackWarning)
            start = time.process_time()
            out = fn()
            best = min(best, time.process_time() - start)
        if best > slow:
            break
    return best, out


def cell(seconds: float, info: PlanInfo, method: str) -> str:
    text = f"{seconds:.3g}"
    if info.iterations:
        text += f" ({info.iterations} it)"
    if info.method != method and not (method == "emd" and info.method == "lsa"):
        text += f" -> {info.method}"
    return text + ("" if info.converged else " nc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 384, 768, 1536, 3072])
    parser.add_argument("--reg", type=float, default=0.06)
    parser.add_argument("--slow", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_solvers.md"))
    parser.add_argument("--no-vit", action="store_true", help="skip the ViT workload table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    rows = []
    for n in args.sizes:
        for kind in ("random", "structured"):
            cost = make_cost(n, kind)
            cells = []
            for method in METHODS:
                if n > MAX_N.get(method, n):
                    cells.append("-")
                    continue
                kw = {"exact_fast": False} if method == "emd" else {}
                run = lambda c=cost, m=method, k=kw: solve(c, method=m, reg=args.reg, **k)  # noqa: E731
                sec, (_, info) = timed(run, args.slow)
                cells.append(cell(sec, info, method))
                print(n, kind, method, cells[-1], flush=True)
            sharp = solve(cost, reg=args.reg)[1].sharpness
            rows.append(f"| {n} | {kind} | {sharp:.3f} | " + " | ".join(cells) + " |")

    vit_rows = []
    if not args.no_vit:
        for kind in ("random", "structured"):
            groups = [torch.stack([make_cost(n, kind, seed) for seed in range(k)]) for k, n in VIT]
            runs = {
                "emd (lsa fast path)": lambda g=groups: [solve_batch(c, method="emd") for c in g],
                "emd (ot.emd)": lambda g=groups: [solve_batch(c, method="emd", exact_fast=False) for c in g],
                "sinkhorn (POT), loop": lambda g=groups: [solve_batch(c, method="sinkhorn", reg=args.reg) for c in g],
                "sinkhorn_torch, loop": lambda g=groups: [[solve(x, reg=args.reg) for x in c] for c in g],
                "sinkhorn_torch, solve_batch": lambda g=groups: [solve_batch(c, reg=args.reg) for c in g],
            }
            for name, fn in runs.items():
                sec, out = timed(fn, args.slow)
                infos = [i for res in out for i in (res[1] if isinstance(res, tuple) else [r[1] for r in res])]
                its = [i.iterations for i in infos]
                used = sorted({i.method for i in infos})
                nc = sum(not i.converged for i in infos)
                vit_rows.append(f"| {kind} | {name} | {sec:.3g} | {min(its)}-{max(its)} | {', '.join(used)} | {nc} |")
                print(kind, name, vit_rows[-1], flush=True)

    command = "OMP_NUM_THREADS=1 python benchmarks/bench_solvers.py " + " ".join(sys.argv[1:])
    header = "| n | cost | sharpness | " + " | ".join(METHODS) + " |"
    lines = [
        "# Transport-plan solver timings",
        "",
        f"Command: `{command.strip()}` (wall time {time.perf_counter() - t0:.0f} s; {platform.processor() or 'cpu'},"
        f" {os.cpu_count()} cores, torch {torch.__version__}, 1 thread).",
        "",
        f"CPU seconds per `solve` call (min of 3), reg={args.reg}, tol=1e-6 (relative L1 marginal error),"
        " max_iter=1000, including cost normalisation and the plan checks. `(k it)`: iterations;"
        " `-> x`: fell back to x; `nc`: accepted but not converged (marginal error between tol and 1e-3);"
        " `-`: not run (too slow). Sharpness is the plan's (sinkhorn_torch). `emd` is `ot.emd`"
        " (exact_fast=False); `lsa` is what `method=\"emd\"` runs by default on square uniform problems.",
        "",
        header,
        "|" + "---|" * (3 + len(METHODS)),
        *rows,
    ]
    if vit_rows:
        lines += [
            "",
            "## ViT weight-fusion workload: 38 problems of 384x384 + 7 of 1536x1536",
            "",
            "| cost | method | total CPU s | iterations | used | not converged |",
            "|---|---|---|---|---|---|",
            *vit_rows,
        ]
    old = args.out.read_text() if args.out.exists() else ""
    if KEEP in old:  # hand-written conclusions survive reruns
        lines += ["", old[old.index(KEEP):].strip()]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
