"""A throwaway PostgreSQL server for tests: initdb + pg_ctl into a temp dir, loopback, free port.

initdb refuses to run as root, so as root the cluster is created and run as the ``postgres``
user (created by the Debian package) or, failing that, a dedicated ``edgelm-pgtest`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support import free_port, wait_port


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("initdb")
    return Path(exe).parent if exe else None


class Postgres:
    def __init__(self) -> None:
        bindir = pg_bin()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; "
                        "./install.sh --test installs them")
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="edgelm-pg-"))
        self.data = self.dir / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = self._service_user()
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def _service_user() -> str:
        for name in ("postgres", "edgelm-pgtest"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        subprocess.run(["useradd", "--system", "--no-create-home", "edgelm-pgtest"], check=True)
        return "edgelm-pgtest"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.dir)

    def start(self) -> Postgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "pg.log"), "-w",
                  "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k '' -c fsync=off",
                  "start")
        wait_port(self.port)
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
