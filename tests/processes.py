"""Commands a test starts in a session of their own (`serve run`, `ray start --block`), and
stopped the way a user stops them: a signal to the command, a bounded wait, and then every
process still alive in that session (Ray's raylet, GCS, workers...) ended by its pid. Nothing
outside the session is ever signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Runs the command with SIGINT at its default, as a terminal would: a test run started in the
# background of a non-interactive shell (`make test &`) has SIGINT ignored, every child inherits
# that, and Ctrl-C would then do nothing. A disposition set here survives the exec.
_WITH_DEFAULT_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execvp(sys.argv[1], sys.argv[1:])")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def session_pids(session: int) -> list[int]:
    """The live processes of this session (zombies excluded: they are gone, just not reaped)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[3]) == session and fields[0] != "Z":
                pids.append(int(entry))
    return pids


class Session:
    """A command started in a new session, its output in `log`; a context manager that always
    stops it and everything it started (stop() first to check how it ends)."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]):
        self.command, self.log = command, log
        self._log = open(log, "wb")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen([sys.executable, "-c", _WITH_DEFAULT_SIGINT, *command],
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        self.killed: list[int] = []  # pids that had to be killed after the command ended

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(signal.SIGTERM)

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def exited(self) -> bool:
        return self.process.poll() is not None

    def stop(self, first: signal.Signals, timeout_s: float = 60,
             leftovers_s: float = 20) -> int | None:
        """Send `first` to the command and wait up to timeout_s for it to exit (SIGKILL after
        that); then give what it started leftovers_s to end, and kill the rest by pid. The
        command's exit status (None: it had to be killed)."""
        code = self.process.poll()
        if code is None:
            self.process.send_signal(first)
            try:
                code = self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        session = self.process.pid  # a new session's id is its leader's pid
        deadline = time.monotonic() + leftovers_s
        while session_pids(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in session_pids(session):
                try:
                    os.kill(pid, sig)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while session_pids(session) and time.monotonic() < deadline:
                time.sleep(0.2)
        self._log.close()
        return code
