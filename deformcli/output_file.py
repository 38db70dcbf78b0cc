"""Writing output files safely: every file deformcli writes goes through :func:`writing`.

- The location is checked before any work (:func:`check_output`): the parent is a writable
  directory, the output is not one of the inputs (same inode, through links), and an existing
  output is only ever replaced when it is a regular file and ``replace`` is set.
- The file is written inside a private temporary directory (created exclusively, mode 0700) in
  the target directory, so nothing planted there (a symlink, say) is written through; then it is
  fsynced and published atomically: with ``os.link`` (or ``renameat2(RENAME_NOREPLACE)``),
  which fails if anything appeared at the output meanwhile, so two concurrent runs never
  silently replace each other; or, when replacing, with ``os.replace``.
- The new file gets the mode any tool would give it (``0o666 & ~umask``; a replaced file keeps
  its mode), not ``mkstemp``'s 0600.
- On any error, Ctrl-C or SIGTERM the temporary directory is removed and nothing appears at the
  output. Temporary directories are named ``.<name>.deformcli-<pid>-<random>``, so a later run
  removes the ones a killed run (SIGKILL) left behind.

Knows nothing of the command line: problems raise :class:`OutputError` subclasses that name the
path; the CLI words the flags.
"""

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from deformcli.errors import DeformcliError

__all__ = ["OutputError", "OutputExistsError", "check_output", "writing"]

_TEMP_MARK = ".deformcli-"


class OutputError(DeformcliError):
    """The output cannot be written where asked (names the path and the reason)."""


class OutputExistsError(OutputError):
    """The output exists and replacing it was not asked for."""

    def __init__(self, path: Path, detail: str = "already exists") -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path


def check_output(
    output: str | os.PathLike, *, replace: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """Check, before any work, that ``output`` can be written; returns it as a Path.

    Raises OutputError when the parent is not a writable directory, when the output is a
    directory, one of ``inputs`` (the same file, through any link), or exists and is not a
    regular file; OutputExistsError when it exists and ``replace`` is not set.
    """
    output = Path(output)
    parent = output.parent
    if not parent.exists():
        raise OutputError(f"{output}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{output}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{output}: the directory {parent} is not writable")
    for source in inputs:
        with contextlib.suppress(OSError):
            if os.path.samefile(output, source):
                raise OutputError(f"{output}: is the input {source}; refusing to overwrite it")
    try:
        status = os.lstat(output)
    except FileNotFoundError:
        return output
    if stat.S_ISDIR(status.st_mode):
        raise OutputError(f"{output}: is a directory")
    if stat.S_ISLNK(status.st_mode):
        raise OutputError(f"{output}: is a symbolic link; refusing to write through or over it")
    if not stat.S_ISREG(status.st_mode):
        raise OutputError(f"{output}: exists and is not a regular file; refusing to replace it")
    if not replace:
        raise OutputExistsError(output)
    return output


@contextlib.contextmanager
def writing(
    output: str | os.PathLike, *, replace: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Write ``output`` safely: yields a temporary path to write the whole file to.

    When the block ends without an exception the file is fsynced and published at ``output``
    (see the module docstring); otherwise, or on SIGTERM, nothing is left behind. Errors of the
    file system (no space, permission denied...) raise OutputError naming ``output``.
    """
    output = check_output(output, replace=replace, inputs=inputs)
    _remove_stale_temporaries(output)
    try:
        directory = Path(
            tempfile.mkdtemp(prefix=f".{output.name}{_TEMP_MARK}{os.getpid()}-", dir=output.parent)
        )
    except OSError as error:
        raise OutputError(f"{output}: cannot create a file there ({error.strerror})") from None
    temporary = directory / output.name
    try:
        with _cleanup_on_sigterm():
            try:
                yield temporary
            except OSError as error:
                raise _as_output_error(output, error) from None
            if not temporary.is_file():
                raise OutputError(f"{output}: nothing was written")
            _finish(temporary, output, replace)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _finish(temporary: Path, output: Path, replace: bool) -> None:
    try:
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        existing = _regular_file_mode(output) if replace else None
        os.chmod(temporary, existing if existing is not None else 0o666 & ~_umask())
        if replace and existing is not None:
            os.replace(temporary, output)
        else:
            _publish_without_replacing(temporary, output)
        _fsync_directory(output.parent)
    except OSError as error:
        raise _as_output_error(output, error) from None


def _regular_file_mode(path: Path) -> int | None:
    """The permission bits of a regular file at ``path``, None if nothing is there."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(status.st_mode):
        raise OutputError(f"{path}: exists and is not a regular file; refusing to replace it")
    return stat.S_IMODE(status.st_mode) & 0o777


def _publish_without_replacing(temporary: Path, output: Path) -> None:
    """Give ``temporary`` the name ``output`` only if nothing has that name (atomically)."""
    try:
        os.link(temporary, output, follow_symlinks=False)
        return
    except FileExistsError:
        raise OutputExistsError(output, "appeared while it was being written") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    _rename_no_replace(temporary, output)  # file systems without hard links


def _rename_no_replace(source: Path, target: Path) -> None:
    rename_no_replace = 1
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OutputError(f"{target}: this file system cannot publish a file without a race")
    at_cwd = -100
    result = renameat2(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), rename_no_replace)
    if result != 0:
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise OutputExistsError(target, "appeared while it was being written")
        raise OSError(code, os.strerror(code), str(target))


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_output_error(output: Path, error: OSError) -> OutputError:
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system",
    }
    reason = reasons.get(error.errno, error.strerror or str(error))
    return OutputError(f"{output}: cannot write it ({reason}); nothing was written")


def _remove_stale_temporaries(output: Path) -> None:
    """Remove temporary directories for ``output`` left by deformcli runs that were killed."""
    prefix = f".{output.name}{_TEMP_MARK}"
    with contextlib.suppress(OSError):
        for entry in output.parent.iterdir():
            if not entry.name.startswith(prefix) or not entry.is_dir():
                continue
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not _process_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) inside the block, so ``finally`` clauses clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(_signal, _frame):
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
