"""The one output policy of every otfx command: where a result may go, and how it gets there whole.

* Paths are compared as real paths (``..`` collapsed, symlinks followed) against every input and every file
  inside an input folder; an output that is, holds or lies inside an input is refused.
* An existing output is replaced only with ``overwrite`` and only when it is an earlier otfx output: a folder
  with the :data:`MARKER` file (or an otfx ``report.json`` / ``otfx-model.json``), or a file of the kind otfx
  writes there (an ONNX file carrying otfx metadata, a PNG, DOT or GraphML drawing).
* Results are written into a temporary sibling (``.<name>.<pid>.<random>.otfx-tmp``), fsynced, then renamed
  into place; SIGINT and SIGTERM unwind through the cleanup; a temporary left by a killed run (its process is
  gone) is removed the next time that output is written, with a warning.
* Files get ``0666 & ~umask`` and folders ``0777 & ~umask``, like any other program's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from otfx.io import OtfxInputError

#: written into every folder otfx produces; its presence is what allows ``--overwrite`` to replace the folder
MARKER = ".otfx-output"
TMP_SUFFIX = ".otfx-tmp"
OLD_SUFFIX = ".otfx-old"
#: entries beyond this many in one input folder are not listed one by one (the folder itself stays protected)
MAX_LISTED = 200_000


class StaleOutputWarning(UserWarning):
    """A temporary folder or file from an interrupted otfx run was found (and removed when its run is gone)."""


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived; raised so that temporary outputs are cleaned up on the way out."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


# --------------------------------------------------------------------------------------------- paths


def real(path: str | os.PathLike) -> Path:
    """The real path: user folder expanded, ``..`` collapsed, every symlink followed (even a dangling one)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


@dataclass
class Protected:
    """The real paths of the inputs: each given path and, for folders, every file and folder inside."""

    paths: set[Path] = field(default_factory=set)
    roots: dict[Path, str] = field(default_factory=dict)  # real path -> what the user gave

    def add(self, given: str | os.PathLike) -> None:
        top = real(given)
        if not top.exists():
            return
        self.paths.add(top)
        self.roots.setdefault(top, os.fspath(given))
        if top.is_dir():
            count = 0
            for folder, dirs, files in os.walk(top):
                count += len(dirs) + len(files)
                if count > MAX_LISTED:
                    break
                for name in dirs + files:  # symlinks (HF cache snapshots) resolve to the blobs they point to
                    self.paths.add(real(Path(folder) / name))

    def clash(self, target: Path, replaces_folder: bool) -> str | None:
        """Why ``target`` must not be written (None if it may): it is an input, holds one or lies inside one."""
        if target in self.paths:
            return f"is the input {self._name(target)}"
        for path in self.paths:
            if path in target.parents:
                return f"lies inside the input {self._name(path)}"
        if replaces_folder:
            for path in sorted(self.paths):
                if target in path.parents:
                    return f"holds the input {self._name(path)}"
        return None

    def _name(self, path: Path) -> str:
        for root, given in self.roots.items():
            if path == root:
                return given
            if root in path.parents:
                return os.path.join(given, str(path.relative_to(root)))
        return str(path)


def protect(inputs: Iterable[str | os.PathLike]) -> Protected:
    """A :class:`Protected` for all ``inputs`` (paths that do not exist are skipped)."""
    protected = Protected()
    for given in inputs:
        if given is not None:
            protected.add(given)
    return protected


# ------------------------------------------------------------------------------------------ ownership


def is_otfx_folder(path: Path) -> bool:
    """A folder an earlier otfx run wrote: it has the marker, an otfx report or an otfx model description."""
    if (path / MARKER).is_file():
        return True
    for name, key in (("report.json", "otfx_report"), ("otfx-model.json", "format")):
        with contextlib.suppress(OSError, ValueError):
            if key in json.loads((path / name).read_text()):
                return True
    return False


def is_otfx_file(path: Path) -> bool:
    """A file of the kind otfx writes under that name (so ``overwrite`` may replace it)."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    if suffix == ".onnx":
        return b"otfx." in _onnx_metadata_keys(path)
    if suffix == ".png":
        return head.startswith(b"\x89PNG\r\n\x1a\n")
    if suffix in (".dot", ".gv"):
        return head.lstrip().startswith((b"digraph", b"strict digraph", b"graph", b"strict graph"))
    if suffix == ".graphml":
        return b"<graphml" in head
    if suffix == ".json":
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            return "otfx_report" in json.loads(path.read_text())
    return False


def _onnx_metadata_keys(path: Path) -> bytes:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a readable ONNX file: not ours
        return b""
    return b" ".join(p.key.encode() for p in proto.metadata_props)


# ------------------------------------------------------------------------------------- the checks


def check_output_dir(out: str | os.PathLike, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The real folder to write ``out`` into; refuses inputs, files, and folders otfx may not replace."""
    target = real(out)
    why = protect(inputs).clash(target, replaces_folder=True)
    if why:
        raise OtfxInputError(f"output {out} {why}; otfx never writes into its inputs, choose another --out")
    if target.exists() and not target.is_dir():
        raise OtfxInputError(f"output {out} exists and is not a folder; choose another --out")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OtfxInputError(f"output folder {out} already exists; pass --overwrite to replace it or choose "
                                 "another --out")
        if not is_otfx_folder(target):
            raise OtfxInputError(f"output folder {out} exists and was not written by otfx (no {MARKER} or "
                                 "report.json in it); --overwrite only replaces earlier otfx outputs. Remove it "
                                 "yourself or choose another --out")
    return target


def check_output_file(out: str | os.PathLike, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike] = (), companions: Iterable[str] = ()) -> Path:
    """The real file to write ``out`` into; ``companions`` are suffixes of files written next to it
    (``.data`` for ONNX external weights), checked like it."""
    target = real(out)
    if target.is_dir():
        raise OtfxInputError(f"output {out} is a folder; give a file name (like {Path(out) / 'model.onnx'})")
    protected = protect(inputs)
    for path in (target, *(target.with_name(target.name + c) for c in companions)):
        why = protected.clash(path, replaces_folder=False)
        if why:
            raise OtfxInputError(f"output {path if path != target else out} {why}; otfx never writes into its "
                                 "inputs, choose another --out")
    if target.exists():
        if not overwrite:
            raise OtfxInputError(f"{out} already exists; pass --overwrite to replace it")
        if not is_otfx_file(target):
            raise OtfxInputError(f"{out} exists and is not an otfx {target.suffix or 'output'} file; --overwrite "
                                 "only replaces earlier otfx outputs. Remove it yourself or choose another name")
    return target


# -------------------------------------------------------------------------------------- permissions


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


# ------------------------------------------------------------------------------------------ signals


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Terminated` (SIGINT already raises
    KeyboardInterrupt), so ``finally`` clauses remove temporary outputs. Only in the main thread, and only for
    signals whose handler is the default one (a caller's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, raise_terminated)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP during a rename or a cleanup, so that it is not cut in half."""
    sigs = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
    blocking = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    if blocking:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------------------------------ temporaries


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.otfx-(tmp|old)(\.\w+)?$")


_LEGACY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # mkdtemp names without a pid (otfx < issue 13)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporaries that killed runs left next to ``target`` (their process is gone); warn about each,
    and about temporaries of runs still going. Returns what was removed."""
    removed = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _TMP.match(entry.name)
        if not match and _LEGACY.match(entry.name) and entry.name.startswith(f".{target.name}."):
            warnings.warn(f"found {entry}, probably left by an interrupted run of an older otfx (or of the ONNX "
                          f"exporter); remove it if nothing is writing {target}", StaleOutputWarning, stacklevel=3)
            continue
        if not match or match["name"] != target.name:
            continue
        pid = int(match["pid"])
        if _alive(pid):
            if pid != os.getpid():
                warnings.warn(f"{entry} belongs to otfx process {pid}, which is still running; two runs write "
                              f"{target}", StaleOutputWarning, stacklevel=3)
            continue
        with _signals_deferred():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        removed.append(entry)
        warnings.warn(f"removed {entry}, left by an interrupted otfx run (process {pid})", StaleOutputWarning,
                      stacklevel=3)
    return removed


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _finish_tree(root: Path) -> None:
    """Give everything in a fresh output folder the usual permissions (some writers, e.g. transformers'
    safetensors, create 0600 files) and fsync it, files first, so that the rename publishes whole files."""
    fmode, dmode = file_mode(), dir_mode()
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                with contextlib.suppress(OSError):
                    os.chmod(path, fmode | (path.stat().st_mode & 0o111 & ~_umask()))
                _fsync_path(path)
        with contextlib.suppress(OSError):
            os.chmod(folder, dmode)
        _fsync_path(Path(folder), directory=True)


def _remove(path: Path) -> None:
    with _signals_deferred():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_marker(folder: Path, command: str | None = None) -> None:
    """Mark ``folder`` as an otfx output (what lets a later ``--overwrite`` replace it)."""
    from otfx import __version__

    info = {"written_by": "otfx", "version": __version__, "command": command,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with atomic_file(folder / MARKER) as handle:
        json.dump(info, handle)
        handle.write("\n")


# ------------------------------------------------------------------------------------------ atomic writers


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file next to ``path``; on success it is fsynced and replaces ``path``, else removed."""
    target = real(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=TMP_SUFFIX, dir=target.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        os.fchmod(fd, file_mode())
        with terminate_as_exception(), os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        with _signals_deferred():
            os.replace(tmp, target)
        _fsync_path(target.parent, directory=True)
    except OSError as err:
        _remove(Path(tmp))
        raise _write_error(path, err) from err
    except BaseException:
        _remove(Path(tmp))
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix) for a writer that wants a file name; on success it is
    fsynced and moved into place, else removed."""
    target = real(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=f"{TMP_SUFFIX}{target.suffix}",
                                   dir=target.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    os.close(fd)
    try:
        os.chmod(tmp, file_mode())
        with terminate_as_exception():
            yield Path(tmp)
        _fsync_path(Path(tmp))
        with _signals_deferred():
            os.replace(tmp, target)
        _fsync_path(target.parent, directory=True)
    except BaseException:
        _remove(Path(tmp))
        raise


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
               command: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it is marked, fsynced and becomes ``out``
    (an earlier otfx output there is moved aside and deleted once the new one is in place); on failure or a
    signal it is removed. ``out`` is checked with :func:`check_output_dir` before and again at the end."""
    inputs = list(inputs)
    target = check_output_dir(out, overwrite, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), suffix=TMP_SUFFIX, dir=target.parent))
    except OSError as err:
        raise _write_error(out, err) from err
    try:
        os.chmod(tmp, dir_mode())
        with terminate_as_exception():
            yield tmp
            write_marker(tmp, command)
            _finish_tree(tmp)
            check_output_dir(out, overwrite, inputs)  # it may have appeared meanwhile
        with _signals_deferred():
            old = None
            if target.exists():
                old = target.with_name(f"{_tmp_prefix(target)}{os.urandom(4).hex()}{OLD_SUFFIX}")
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                if old is not None:  # put the previous folder back
                    os.replace(old, target)
                raise
        _fsync_path(target.parent, directory=True)
        if old is not None:
            _remove(old)
    except (OSError, OutputWriteError) as err:  # a nested writer's error names our temporary: name ``out``
        _remove(tmp)
        raise _write_error(out, err) from err
    except BaseException:
        _remove(tmp)
        raise


class OutputWriteError(OtfxInputError):
    """Writing an output failed (disk full, read-only file system, no permission); nothing was left behind."""

    def __init__(self, errno_: int, message: str):
        super().__init__(message)
        self.errno = errno_


def _write_error(out, err: OSError | OutputWriteError) -> BaseException:
    """Name the output the user gave, not our temporary path, and say that nothing was half-written."""
    import errno

    if err.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG):
        return err
    why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
           errno.EDQUOT: "the disk quota is exceeded", errno.EFBIG: "a file is too large for the file system"}
    reason = why.get(err.errno, "permission denied")
    return OutputWriteError(err.errno, f"cannot write {out}: {reason}; nothing was written (the temporary copy "
                                       "was removed) and any earlier output there is unchanged")
