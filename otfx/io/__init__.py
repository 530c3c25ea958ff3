"""Reading models and data from disk and writing fused models and reports, for the command line and scripts.

Every output goes through one policy (:mod:`otfx.io.output`): never onto an input (real paths compared), only
over an earlier otfx output, written into a temporary sibling, fsynced and renamed, cleaned up on signals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class OtfxInputError(ValueError):
    """A model, data set or output path given to otfx cannot be used; the message says which and what to do."""


from otfx.io.data import load_data, load_labelled  # noqa: E402
from otfx.io.models import InputSpec, LoadedModel, example_inputs, load_model, save_model  # noqa: E402
from otfx.io.output import (  # noqa: E402
    MARKER,
    Terminated,
    atomic_dir,
    atomic_file,
    atomic_path,
    check_output_dir,
    check_output_file,
    terminate_as_exception,
)
from otfx.io.report import FusionReport, package_versions, write_report  # noqa: E402

__all__ = [
    "MARKER",
    "FusionReport",
    "InputSpec",
    "LoadedModel",
    "OtfxInputError",
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "check_output_dir",
    "check_output_file",
    "example_inputs",
    "load_data",
    "load_labelled",
    "load_model",
    "package_versions",
    "save_model",
    "terminate_as_exception",
    "Terminated",
    "write_report",
]


@contextlib.contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Silence transformers' own progress bars (ours cover loading and saving), restoring them afterwards."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
