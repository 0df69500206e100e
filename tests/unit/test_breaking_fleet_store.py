"""Hostile `--db` values for the fleet readers (`report --db`, `fleet --db`) and the store.

Found by pointing the readers at what operators mistype: a path that does not exist (it was
created, empty, and the report said "no devices"), a file that is not SQLite and a directory
(a Python traceback), a URL of another database (taken for a relative file name).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.errors import ConfigError
from agent.fleet.store import FleetStore


@pytest.mark.parametrize("command", [["fleet"], ["report", "--out", "OUT"]])
def test_readers_do_not_create_a_database_where_the_path_has_a_typo(
    tmp_path: Path, command: list[str]
) -> None:
    missing = tmp_path / "typo" / "fleet.db"
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    res = CliRunner().invoke(main, [*args, "--db", f"sqlite:///{missing}"])
    assert res.exit_code == 78, res.output
    assert "no database at" in res.output and str(missing) in res.output
    assert not missing.parent.exists()


@pytest.mark.parametrize("command", [["fleet"], ["report", "--out", "OUT"]])
@pytest.mark.parametrize("kind", ["garbage", "directory"])
def test_readers_name_a_file_that_is_not_a_database_instead_of_a_traceback(
    tmp_path: Path, command: list[str], kind: str
) -> None:
    target = tmp_path / "fleet.db"
    if kind == "garbage":
        target.write_bytes(os.urandom(8192))
    else:
        target.mkdir()
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    res = CliRunner().invoke(main, [*args, "--db", str(target)])
    assert res.exit_code == 78, (res.output, res.exception)
    assert "not a usable SQLite database" in res.output
    assert str(target) in res.output


def test_a_url_of_another_database_is_refused_not_taken_for_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unsupported database URL"):
        FleetStore("mysql://user:secret@db/fleet")
    assert list(tmp_path.iterdir()) == []  # no "mysql:" directory
    res = CliRunner().invoke(main, ["fleet", "--db", "mysql://user:secret@db/fleet"])
    assert res.exit_code == 78
    assert "secret" not in res.output


def test_the_collector_still_creates_its_database(tmp_path: Path) -> None:
    path = tmp_path / "new" / "fleet.db"
    store = FleetStore(f"sqlite:///{path}")  # a writer: create is the default
    assert store.version() >= 1
    store.close()
    assert path.exists()
    reader = FleetStore(f"sqlite:///{path}", create=False)
    assert reader.version() >= 1
    reader.close()
