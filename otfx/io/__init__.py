"""Reading models and data from disk and writing fused models and reports, for the command line and scripts.

Every file this package writes is written atomically (a temporary sibling, then ``os.replace``), so an
interrupted run leaves either the old state or the new one, never half a model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OtfxInputError(ValueError):
    """A model, data set or output path given to otfx cannot be used; the message says which and what to do."""


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary file next to ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer that wants a file name; moved into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(out: str | Path, overwrite: bool = False, inputs: list[str | Path] = ()) -> Path:
    """Refuse an output folder that exists (unless ``overwrite``) or that is, holds or lies inside an input."""
    out = Path(out).absolute()
    for given in inputs:
        src = Path(given).absolute()
        if src == out or out in src.parents or src in out.parents:
            raise OtfxInputError(f"output {out} overlaps the input {src}; otfx never writes into its inputs, "
                                 "choose another --out")
    if out.exists() and not out.is_dir():
        raise OtfxInputError(f"output {out} exists and is not a folder; choose another --out")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise OtfxInputError(f"output folder {out} already exists; pass --overwrite to replace it or choose "
                             "another --out")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, inputs: list[str | Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it becomes ``out``, on failure it is removed.

    An existing ``out`` is refused unless ``overwrite``; when replaced, the old folder is moved aside first and
    deleted only once the new one is in place.
    """
    out = check_output_dir(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            check_output_dir(out, overwrite, inputs)  # it may have appeared meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:  # put the previous folder back
                os.replace(old / "previous", out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


from otfx.io.data import load_data, load_labelled  # noqa: E402
from otfx.io.models import InputSpec, LoadedModel, example_inputs, load_model, save_model  # noqa: E402
from otfx.io.report import FusionReport, package_versions, write_report  # noqa: E402

__all__ = [
    "FusionReport",
    "InputSpec",
    "LoadedModel",
    "OtfxInputError",
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "check_output_dir",
    "example_inputs",
    "load_data",
    "load_labelled",
    "load_model",
    "package_versions",
    "save_model",
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
