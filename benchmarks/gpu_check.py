"""ONNX export + check on a GPU machine: PyTorch on CUDA vs onnxruntime's CUDA provider (CPU if absent).

Run through ``benchmarks/gpu_check.sh``. Prints what is available (card, torch CUDA, onnxruntime providers),
then one table row per zoo model: export time, devices compared, fresh input shape, max |diff|, verdict.
Exit status: 0 if every model that could run passed, 1 if one failed, 2 if nothing could run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when otfx is not installed

MODELS = ["bert", "hf_vit", "gpt2", "llama", "timm_vit", "matmul_encoder"]


def _card() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "no GPU (nvidia-smi not found)"


def _version(mod: str) -> str:
    if importlib.util.find_spec(mod) is None:
        return "MISSING"
    m = __import__(mod)
    return getattr(m, "__version__", "?")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--batch", type=int, default=3, help="batch of the fresh check inputs (export uses 2)")
    ap.add_argument("--seq", type=int, default=11, help="sequence length of the fresh token inputs (export: 8)")
    ap.add_argument("--atol", type=float, default=1e-4)
    opts = ap.parse_args()

    card = _card()
    print(f"python {platform.python_version()} | card: {card}")
    for mod in ("torch", "onnx", "onnxscript", "onnxruntime", "transformers", "timm"):
        print(f"  {mod:<13} {_version(mod)}")
    if importlib.util.find_spec("torch") is None:
        print("torch is missing: nothing to check")
        return 2
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "4")))
    cuda = torch.cuda.is_available()
    if cuda:
        card = torch.cuda.get_device_name(0)
        # Compare fp32 with fp32: no TF32 in cuBLAS / cuDNN (ORT's CUDA provider gets use_tf32=0 from otfx).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"  torch CUDA    {torch.version.cuda} build, available: {cuda}"
          + (f" ({card})" if cuda else ""))
    if importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime is missing (onnxruntime-gpu cannot be installed offline): no ORT comparison possible")
        return 2
    import onnxruntime as ort

    avail = ort.get_available_providers()
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in avail else "CPUExecutionProvider"
    print(f"  ORT providers {avail} (device {ort.get_device()}) -> using {provider}")
    if provider != "CUDAExecutionProvider":
        print("  NOTE: no CUDA provider in this onnxruntime build (needs onnxruntime-gpu); comparing with ORT CPU")

    from otfx import testing as zoo
    from otfx.export.onnx import check_onnx, export_info, export_onnx

    dev = "cuda" if cuda else "cpu"
    rows, failed, ran = [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.models:
            try:
                model, args = zoo.build(name)
                t0 = time.perf_counter()
                path = export_onnx(model, args, Path(tmp) / f"{name}.onnx")
                export_s = time.perf_counter() - t0
                shapes = export_info(path).get("shapes", "?")
                seq = opts.seq if zoo.ZOO[name].varies_seq else 8
                fresh = zoo.inputs(name, opts.batch, seq, seed=7)
                model = model.to(dev)
                args = tuple(a.to(dev) for a in args)
                t0 = time.perf_counter()
                chk = check_onnx(path, model, args, providers=[provider], atol=opts.atol, inputs=fresh)
                check_s = time.perf_counter() - t0
            except Exception as e:  # report and go on: one broken model must not hide the others
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:90]
                rows.append((name, "-", "-", "-", "-", "-", "-", f"ERROR {msg}"))
                failed += 1
                continue
            ran += 1
            failed += not chk.passed
            ort_name = chk.provider.replace("ExecutionProvider", "")
            rows.append((name, f"{export_s:.1f}", shapes, chk.torch_device, ort_name,
                         "x".join(map(str, chk.input_shapes[0])), f"{chk.max_abs_diff:.2e}",
                         f"{'PASS' if chk.passed else 'FAIL'} ({check_s:.1f}s)"))

    head = ("model", "export s", "onnx axes", "torch", "ORT", "input", "max|diff|", "result")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"\nONNX check on {card} (atol {opts.atol:g})")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"\n{ran} ran, {failed} failed")
    return 2 if ran == 0 else int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
