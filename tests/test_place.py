"""commit.place: a finished file takes its name, or the run says what kept it from it, naming the file and the errno,
with nothing left under two names. The failures are real: a folder or file made append-only or immutable
(chattr +a / +i, which stop root too), so the kernel itself refuses the rename, the link or the unlink."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager

import pytest

from mertools import MertoolsError
from mertools.commit import place

from conftest import run_cli


@contextmanager
def attr(path, flag):
    """``chattr +flag path`` for the block; skips where the file system or the user cannot set it."""
    p = subprocess.run(["chattr", f"+{flag}", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"chattr +{flag} unavailable here: {p.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", f"-{flag}", str(path)], check=True)


def test_a_temporary_that_cannot_be_unlinked_after_its_link_is_not_left_under_two_names_unsaid(tmp_path):
    """An append-only folder refuses renames (so the no-replace rename falls back to a hard link) and unlinks: the
    link gave the file its name and the temporary kept its own. place() raised the unlink's bare PermissionError
    naming the temporary; it must name the final file, the errno and both names left."""
    d = tmp_path / "d"
    d.mkdir()
    tmp, final = d / ".out.bin.tmp", d / "out.bin"
    tmp.write_bytes(b"finished")
    with attr(d, "a"):
        with pytest.raises(MertoolsError) as err:
            place(tmp, final, overwrite=False)
    msg = str(err.value)
    assert msg.startswith(f"{final}: ") and "EPERM" in msg and f"named both {final} and {tmp.name}" in msg, msg
    assert "\n" not in msg


def test_a_file_that_cannot_be_renamed_nor_linked_says_why_and_keeps_its_name_free(tmp_path):
    """An immutable temporary: the no-replace rename and the hard link are both refused with EPERM (what a file
    system without hard links answers too), and so is the plain rename after them. The user got the rename's bare
    PermissionError about the temporary; now one line names the final file and the errno, and nothing took it."""
    tmp, final = tmp_path / ".out.bin.tmp", tmp_path / "out.bin"
    tmp.write_bytes(b"finished")
    with attr(tmp, "i"):
        with pytest.raises(MertoolsError) as err:
            place(tmp, final, overwrite=False)
    msg = str(err.value)
    assert msg.startswith(f"{final}: ") and "EPERM" in msg and "run again" in msg, msg
    assert not final.exists() and tmp.read_bytes() == b"finished"


def test_pack_into_an_append_only_folder_does_not_claim_nothing_was_left(extracted, tmp_path):
    """Through the command: pack's archive took its name by a link and its temporary could not be removed. The run
    said "<temporary>: permission denied" (the cleanup's own error, hiding the first) while both names stayed; now
    one line names the archive, the errno and both names."""
    from test_pack import Q4

    d = tmp_path / "d"
    d.mkdir()
    archive = d / "a.tar.zst"
    with attr(d, "a"):
        p = run_cli("pack", extracted(Q4), archive, "-q")
        left = sorted(x.name for x in d.iterdir())
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"error: {archive}: " in p.stderr and "EPERM" in p.stderr and "named both" in p.stderr, p.stderr
    assert "nothing was left behind" not in p.stderr
    assert len(left) == 2 and "a.tar.zst" in left  # what the message says is what is there


def test_a_write_refused_in_a_folder_that_keeps_the_temporary_does_not_say_nothing_was_left(extracted, tmp_path):
    """A write refused mid-pack (RLIMIT_FSIZE, as a full disk or a quota) in an append-only folder: the cleanup
    cannot remove the temporary either (drop_temp keeps quiet so as not to hide the first error), and the line said
    "nothing was left behind" beside a temporary as large as the limit. It must name the temporary left."""
    import resource
    import sys

    from test_pack import Q4

    d = tmp_path / "d"
    d.mkdir()
    archive = d / "a.tar.zst"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # the archive is ~1 MB

    with attr(d, "a"):
        p = subprocess.run([sys.executable, "-m", "mertools.cli", "pack", extracted(Q4), archive, "-q"],
                           capture_output=True, text=True, preexec_fn=small_files, timeout=300)
        left = [x.name for x in d.iterdir()]
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"error: {archive}: " in p.stderr and "File too large" in p.stderr, p.stderr
    assert "nothing was left behind" not in p.stderr and len(left) == 1 and left[0] in p.stderr, (p.stderr, left)
