"""otfx: fuse independently trained transformers with optimal transport, over traced graphs.

Pipeline: ``trace`` -> ``analyse`` (transport spaces and the TM flow graph) -> ``fuse`` / ``align`` ->
``export_onnx`` / ``check_onnx``.
"""

import sys as _sys


def _quiet_interrupt_while_importing() -> None:
    """Run as the ``otfx`` command, a Ctrl-C while torch is still loading ends it with one line and status 130
    instead of an import traceback; ``otfx.cli.main`` puts Python's own handler back once it starts."""
    import os
    import signal

    def interrupted(signum, frame):
        os.write(2, b"otfx: interrupted\n")
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


_AS_COMMAND = _sys.argv[0].rsplit("/", 1)[-1] == "otfx" if _sys.argv else False
if _AS_COMMAND or getattr(_sys, "orig_argv", [])[1:3] == ["-m", "otfx"]:
    _quiet_interrupt_while_importing()

from otfx.align.config import FusionConfig, FusionError  # noqa: E402 - after the interrupt guard
from otfx.api import analyse  # noqa: E402 - after the interrupt guard
from otfx.fuse import align, ensemble, fuse, vanilla_fuse  # noqa: E402 - after the interrupt guard
from otfx.inspection import inspect_model as inspect  # noqa: E402 - after the interrupt guard
from otfx.sweep import sweep  # noqa: E402 - after the interrupt guard
from otfx.symmetry import random_symmetry  # noqa: E402 - after the interrupt guard
from otfx.trace import Traced, TraceError, trace  # noqa: E402 - after the interrupt guard

__version__ = "0.1.0"


def export_onnx(model, args, path, **options):
    """Export a model to ONNX (see ``otfx.export.onnx.export_onnx``; imported lazily, onnx is heavy)."""
    from otfx.export.onnx import export_onnx as _export

    return _export(model, args, path, **options)


def check_onnx(path, model, args, **options):
    """Check an ONNX file against PyTorch with onnxruntime (see ``otfx.export.onnx.check_onnx``)."""
    from otfx.export.onnx import check_onnx as _check

    return _check(path, model, args, **options)


__all__ = ["FusionConfig", "FusionError", "TraceError", "Traced", "align", "analyse", "check_onnx", "ensemble",
           "export_onnx", "fuse", "inspect", "random_symmetry", "sweep", "trace", "vanilla_fuse"]
