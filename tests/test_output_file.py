"""The one safe writer every output goes through (deformcli.output_file)."""

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from deformcli.output_file import OutputError, OutputExistsError, check_output, writing


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def write(path, data=b"new", **options):
    with writing(path, **options) as temporary:
        temporary.write_bytes(data)
    return path


def test_writes_a_regular_file_and_leaves_no_temporaries(tmp_path):
    out = write(tmp_path / "m.onnx")
    assert out.read_bytes() == b"new" and stat.S_ISREG(os.lstat(out).st_mode)
    assert leftovers(tmp_path) == []


def test_planted_symlinks_are_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    # The old fixed temporary name, and every name a guess could give, point at the victim.
    for name in (".m2.onnx.tmp", ".m2.onnx.deformcli-tmp", "m2.onnx"):
        (tmp_path / name).symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        write(tmp_path / "m2.onnx", replace=True)
    (tmp_path / "m2.onnx").unlink()
    out = write(tmp_path / "m2.onnx")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "m2.onnx").is_symlink() and out.read_bytes() == b"new"


def test_two_writers_never_silently_replace_each_other(tmp_path):
    out = tmp_path / "o.safetensors"
    first = writing(out)
    second = writing(out)
    first.__enter__().write_bytes(b"first")
    second.__enter__().write_bytes(b"second")
    first.__exit__(None, None, None)
    with pytest.raises(OutputExistsError, match="appeared while it was being written"):
        second.__exit__(None, None, None)
    assert out.read_bytes() == b"first" and leftovers(tmp_path) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        out = write(tmp_path / "o.bin")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_replacing_keeps_the_files_mode(tmp_path):
    out = tmp_path / "o.bin"
    out.write_bytes(b"old")
    out.chmod(0o640)
    with pytest.raises(OutputExistsError, match="already exists"):
        write(out)
    write(out, replace=True)
    assert out.read_bytes() == b"new" and stat.S_IMODE(out.stat().st_mode) == 0o640


def test_only_regular_files_are_replaced(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        write(fifo, replace=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for replace in (False, True):
        with pytest.raises(OutputError, match="symbolic link"):
            write(dangling, replace=replace)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/null", replace=True)


def test_the_output_is_never_an_input_through_any_link(tmp_path):
    source = tmp_path / "model.pth"
    source.write_bytes(b"weights")
    hard = tmp_path / "hard.pth"
    os.link(source, hard)
    for output in (source, hard, tmp_path / "." / "model.pth"):
        with pytest.raises(OutputError, match="is the input"):
            check_output(output, replace=True, inputs=(source,))
    assert source.read_bytes() == b"weights"


def test_bad_locations_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    cases = {
        tmp_path / "missing" / "o.bin": "does not exist",
        tmp_path / "file" / "o.bin": "is not a directory",
        tmp_path / "dir": "is a directory",
    }
    for output, message in cases.items():
        with pytest.raises(OutputError, match=message):
            check_output(output, replace=True)


def test_write_errors_name_the_output_and_leave_nothing(tmp_path):
    out = tmp_path / "o.bin"
    no_space = pytest.raises(OutputError, match=r"o.bin: cannot write it \(no space left")
    with no_space, writing(out) as temporary:
        temporary.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ValueError, match="boom"), writing(out) as temporary:
        temporary.write_bytes(b"partial")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        from deformcli.output_file import writing
        with writing({str(tmp_path / "o.bin")!r}) as temporary:
            temporary.write_bytes(b"x" * 1_000_000)
            os.kill(os.getpid(), signal.SIGTERM)
            temporary.write_bytes(b"never")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_later_run_removes_what_a_killed_run_left(tmp_path):
    # SIGKILL cannot be caught: its temporary directory stays, named with the dead process id.
    script = textwrap.dedent(
        f"""
        import os, signal
        from deformcli.output_file import writing
        with writing({str(tmp_path / "o.bin")!r}) as temporary:
            temporary.write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    subprocess.run([sys.executable, "-c", script], timeout=60)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".o.bin.deformcli-")
    alive = tmp_path / f".o.bin.deformcli-{os.getppid()}-keep"
    alive.mkdir()  # a live process's run is left alone
    write(tmp_path / "o.bin")
    assert leftovers(tmp_path) == [alive.name]
