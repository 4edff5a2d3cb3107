"""A real PostgreSQL server for the tests, on loopback, in a temp directory.

The server is the one the `pgserver` wheel ships (PostgreSQL's own binaries, a test dependency:
pip installs it, no system package and no root needed). Only its binaries are used: its Python
side would create a system user when run as root and listens on a Unix socket, where these tests
want a TCP server on 127.0.0.1 as a remote store is reached. PostgreSQL refuses to run as root, so
as root the binaries are copied into the temp directory and run as `nobody`.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 60


def binaries() -> Path | None:
    """The directory of the pgserver wheel's PostgreSQL install (bin/, lib/, share/), if installed.
    The libraries its binaries link are beside it, in `pgserver.libs` (where auditwheel put them)."""
    spec = importlib.util.find_spec("pgserver")  # found without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    install = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    return install if (install / "bin" / "postgres").is_file() else None


class PostgresServer:
    """initdb + postgres on 127.0.0.1:`port`, trusting local connections (a test server)."""

    def __init__(self, port: int):
        import psycopg

        install = binaries()
        if install is None:
            raise RuntimeError("pgserver is not installed: make install puts it in .venv (the test extra)")
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="framecast-pg-"))
        as_user = None
        if os.geteuid() == 0:  # PostgreSQL will not run as root: as nobody, from a copy it can read
            nobody = pwd.getpwnam("nobody")
            libs = install.parent.parent / "pgserver.libs"
            shutil.copytree(libs, self.directory / "site" / libs.name, symlinks=True)
            install = Path(shutil.copytree(install, self.directory / "site" / "pgserver" / "pginstall", symlinks=True))
            for path in [self.directory, *self.directory.rglob("*")]:
                os.lchown(path, nobody.pw_uid, nobody.pw_gid)
            as_user = nobody
        self.data = self.directory / "data"
        env = {**os.environ, "LC_ALL": "C", "LD_LIBRARY_PATH": str(install / "lib")}

        def drop_privileges() -> None:
            if as_user is not None:
                os.setgid(as_user.pw_gid)
                os.setuid(as_user.pw_uid)

        subprocess.run([str(install / "bin" / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, env=env,
                       preexec_fn=drop_privileges)  # fmt: skip
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }  # a test server
        command = [str(install / "bin" / "postgres"), "-D", str(self.data)]
        command += [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        self.log = open(self.directory / "postgres.log", "w")  # noqa: SIM115 (open while the server runs)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=drop_privileges)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.url("postgres")).close()
                break
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    said = (self.directory / "postgres.log").read_text()
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start: {said}") from None
                time.sleep(0.2)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)
