"""Shared helpers for probe tests: fixture trees and a reader that simulates EACCES.

Tests run as root, where ``chmod 000`` does not stop a read, so "permission denied" is
simulated with :class:`DenyingReader`, a fake :class:`probes.base.SysfsReader` that answers
EACCES for chosen paths exactly as the kernel does for a root-only sysfs file.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from probes.base import SysfsReader

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"


def fixture_root(board: str) -> Path:
    """Path of a committed fixture tree (read-only use)."""
    path = FIXTURES / board
    assert path.is_dir(), path
    return path


def copy_fixture(board: str, tmp_path: Path) -> Path:
    """Copy a fixture tree into tmp_path so a test can change values between samples."""
    dest = tmp_path / board
    shutil.copytree(fixture_root(board), dest, symlinks=True)
    return dest


def write(root: Path, path: str, content: str | int) -> None:
    """Write ``content`` (plus newline, as sysfs does) to ``root/path``, creating parents."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"{content}\n", encoding="utf-8")


class DenyingReader(SysfsReader):
    """A SysfsReader that fails with EACCES for machine paths matching the given patterns."""

    def __init__(self, root: str | os.PathLike[str], denied: Iterable[str]) -> None:
        super().__init__(root)
        self.denied = [d.lstrip("/") for d in denied]

    def _is_denied(self, path: str | os.PathLike[str]) -> bool:
        rel = str(path).lstrip("/")
        return any(fnmatch.fnmatchcase(rel, d) for d in self.denied)

    def read_text(self, path: str | os.PathLike[str]) -> str | None:
        if self._is_denied(path):
            return None
        return super().read_text(path)

    def read_text_or_errno(self, path: str | os.PathLike[str]) -> tuple[str | None, int | None]:
        if self._is_denied(path):
            return None, errno.EACCES
        return super().read_text_or_errno(path)
