"""What REPAIR, activation collection and orthogonal stream maps add to a fusion of the paper's ViT.

The paper's ViT (HF ``ViTForImageClassification``, image 32, patch 4, hidden 384, MLP 1536, 7 layers, 12 heads), a
structured pair (a model and its permuted noisy copy, as ``bench_fusion.py``), 200 digits images upscaled to 32x32
as calibration data (batches of 50). Timed in one process with one thread, min of 3 runs of each configuration,
stages from ``fused.otfx_report["timings"]``: ``collect`` (activations of both models), ``repair`` (REPAIR: the
parents hard-aligned to the anchor, their statistics and the fused model's, folded), ``refit`` (the least-squares
refit: the targets' alignment, then one lockstep pass of the fused model and both parents), the alignment itself.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/bench_after_alignment.py``; writes
``benchmarks/results/bench_after_alignment.json`` and prints a Markdown table. ``BENCH_RUNS=1`` times one run of
each; names (substrings) as arguments run only those configurations and update their rows of the JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OFF = {"select": "off"}  # one fusion per row: the label-free choice would fuse 8 candidates
CONFIGS = {
    "weights (default, no data)": {},
    "weights + REPAIR": {"data": True, "refit": False, **OFF},
    "weights + REPAIR + refit (select='off' with data)": {"data": True, **OFF},
    "weights + refit": {"data": True, "repair": False, **OFF},
    "activations": {"cost": "activations", "data": True, "repair": False, "refit": False, **OFF},
    "weights, orthogonal stream": {"residual": "orthogonal"},
    "activations, orthogonal stream": {"cost": "activations", "residual": "orthogonal", "data": True,
                                       "repair": False, "refit": False, **OFF},
    "activations, orthogonal stream + REPAIR": {"cost": "activations", "residual": "orthogonal", "data": True,
                                                "refit": False, **OFF},
}


def main() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from bench_fusion import _build, _digits

    import otfx
    from otfx.symmetry import noisy_copy

    cfg = {"model": "vit", "hidden": 384, "mlp": 1536, "layers": 7, "heads": 12}
    images = _digits(200)
    data = [images[i:i + 50] for i in range(0, 200, 50)]
    a = _build(cfg, 0)
    ta = otfx.trace(a, (images[:2],))
    b = noisy_copy(ta, seed=3)
    tb = otfx.trace(b, (images[:2],))
    rows = {}
    only = sys.argv[1:]  # optional substrings: run only the configurations whose names contain one
    for name, options in CONFIGS.items():
        if only and not any(o in name for o in only):
            continue
        options = dict(options)
        use_data = options.pop("data", False)
        runs = []
        for _ in range(int(os.environ.get("BENCH_RUNS", "3"))):
            t0 = time.perf_counter()
            fused = otfx.fuse(ta, tb, data=data if use_data else None, **options)
            wall = time.perf_counter() - t0
            runs.append((wall, fused.otfx_report["timings"]))
        wall, timings = min(runs, key=lambda r: r[0])
        align = timings.get("align_model_1", 0.0) - timings.get("collect", 0.0)
        rows[name] = {"wall_s": round(wall, 3), "collect_s": round(timings.get("collect", 0.0), 3),
                      "repair_s": round(timings.get("repair", 0.0), 3), "refit_s": round(timings.get("refit", 0.0), 3),
                      "align_s": round(align, 3),
                      "options": options, "data": use_data}
        print(name, rows[name], flush=True)
    out = HERE / "results" / "bench_after_alignment.json"
    if only and out.exists():  # a partial run updates its rows of the last full run
        rows = {**json.loads(out.read_text())["configs"], **rows}
        rows = {name: rows[name] for name in CONFIGS if name in rows}
    out.write_text(json.dumps({"configs": rows, "machine": os.uname().nodename, "threads": 1,
                               "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    print("\n| configuration | fuse (wall s) | collect (s) | repair (s) | refit (s) | align (s) |")
    print("| :--- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.2f} | {r['collect_s']:.2f} | {r['repair_s']:.2f} | {r.get('refit_s', 0):.2f} "
              f"| {r['align_s']:.2f} |")


if __name__ == "__main__":
    main()
