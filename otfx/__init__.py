"""otfx: fuse independently trained transformers with optimal transport, over traced graphs.

Pipeline: ``trace`` -> ``analyse`` (transport spaces and the TM flow graph) -> ``fuse`` / ``align`` ->
``export_onnx`` / ``check_onnx``.
"""

from otfx.align.config import FusionConfig, FusionError
from otfx.api import analyse
from otfx.fuse import align, ensemble, fuse, vanilla_fuse
from otfx.inspection import inspect_model as inspect
from otfx.symmetry import random_symmetry
from otfx.trace import Traced, TraceError, trace

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
           "export_onnx", "fuse", "inspect", "random_symmetry", "trace", "vanilla_fuse"]
