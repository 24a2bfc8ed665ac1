"""Programs under test: where the installed native programs are, and a server process started
on a port the system picks (--port 0: no race with another process for a port chosen here),
its port read from its log, ready once it answers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest


def program(name: str) -> str:
    """A native program of the install: $PYKVSMOOTH_BIN_DIR, else pykvsmooth/bin, else PATH;
    a missing program fails the test (a broken install)."""
    bin_dir = os.environ.get("PYKVSMOOTH_BIN_DIR")
    if bin_dir:
        path = Path(bin_dir) / name
        if not path.is_file():
            pytest.fail(f"{name} not found in PYKVSMOOTH_BIN_DIR={bin_dir}")
        return str(path)
    from pykvsmooth._libs import PACKAGE_BIN_DIR

    if (PACKAGE_BIN_DIR / name).is_file():
        return str(PACKAGE_BIN_DIR / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found in {PACKAGE_BIN_DIR} nor on PATH: run `make install`")
    return found


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log
        self.port = 0
        self.url = ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def start_listening(cmd: List[str], log: Path, env: Dict[str, str], listening: "re.Pattern[str]",
                    answers: Callable[[str], bool], timeout_s: float, cwd: Optional[Path] = None) -> ServerProcess:
    """Run cmd (which asks for port 0) with its output in log; `listening` finds the bound port
    in the log (group 1), `answers(url)` says the server is ready."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    s = ServerProcess(proc, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{Path(cmd[0]).name} exited with {proc.returncode}:\n{s.log_text()[-4000:]}")
        if not s.port:
            found = listening.search(s.log_text())
            if found:
                s.port = int(found.group(1))
                s.url = f"http://127.0.0.1:{s.port}"
        if s.port and answers(s.url):
            return s
        time.sleep(0.2)
    s.stop()
    pytest.fail(f"{Path(cmd[0]).name} did not answer in {timeout_s} s:\n{s.log_text()[-4000:]}")
