"""Competing CPU load for the bench's `load` setting: N busy processes that always stop.

A user's machine is rarely idle (DataLoader workers, a second experiment, a shared node), and a
kernel that splits its work into many small parallel regions can lose from its threads when the
OS deschedules one of them. The bench therefore times each configuration a second time while
`load` processes spin on integer arithmetic.

The processes must never outlive the bench. Four layers see to it:
- `CompetingLoad` is a context manager: leaving its block for any reason (a failed worker, a
  timeout, an exception, KeyboardInterrupt) kills and reaps every process it started;
- each process runs in a session of its own and is killed as a process group;
- while a load runs, SIGTERM and SIGHUP stop it before the signal's own action, and an atexit hook
  stops whatever an unexpected exit left running;
- each busy process watches its parent and exits once the parent is gone, which covers a bench
  killed with SIGKILL, where no handler of the bench runs.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

# Spins on arithmetic in pure Python (one core, no memory traffic to speak of) and checks about
# every hundred thousand steps that the process that started it is still its parent. The byte it
# writes first says it is running, so the loaded timing never starts before the load.
BUSY_LOOP = """
import os, sys
parent = int(sys.argv[1])
sys.stdout.write("r")
sys.stdout.flush()
x = 0
while os.getppid() == parent:
    for i in range(100_000):
        x = (x * 31 + i) % 1_000_003
"""
READY_TIMEOUT_S = 60.0  # an interpreter's start, on a machine that may itself be loaded
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

_running: set[CompetingLoad] = set()  # the atexit and signal safety nets stop these


class CompetingLoadError(RuntimeError):
    """The competing processes could not be started (none is left running)."""


class CompetingLoad:
    """`processes` CPU-bound processes, running between `start()` (or `with`) and `stop()`."""

    def __init__(self, processes: int):
        if processes < 1:
            raise ValueError(f"a competing load needs at least one process, not {processes}")
        self.processes = processes
        self.pids: list[int] = []  # every process this load started
        self._children: list[subprocess.Popen] = []
        self._previous_handlers: dict[int, Any] = {}

    def __enter__(self) -> CompetingLoad:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Start every process and return once each is spinning."""
        _running.add(self)
        self._install_signal_handlers()
        try:
            for _ in range(self.processes):
                child = subprocess.Popen(
                    [sys.executable, "-c", BUSY_LOOP, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    start_new_session=True,  # its own process group: killpg reaches all of it
                )
                self._children.append(child)
                self.pids.append(child.pid)
            for child in self._children:
                self._wait_until_ready(child)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill and reap every process started; safe to call again and from a signal handler."""
        children, self._children = self._children, []
        for child in children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    child.kill()  # the group is gone or not ours: the process itself still is
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        _running.discard(self)
        self._restore_signal_handlers()

    def alive(self) -> list[int]:
        """The pids of this load's processes that still run."""
        return [child.pid for child in self._children if child.poll() is None]

    @staticmethod
    def _wait_until_ready(child: subprocess.Popen) -> None:
        readable, _, _ = select.select([child.stdout], [], [], READY_TIMEOUT_S)
        if not readable or child.stdout.read(1) != b"r":
            raise CompetingLoadError(
                f"a competing process (pid {child.pid}) did not start within "
                f"{READY_TIMEOUT_S:g} s (exit code {child.poll()}); run with load=0 to time "
                "without competing processes"
            )

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the other nets still hold
        for number in STOP_SIGNALS:
            self._previous_handlers[number] = signal.signal(number, _stop_then(number, self))

    def _restore_signal_handlers(self) -> None:
        handlers, self._previous_handlers = self._previous_handlers, {}
        for number, handler in handlers.items():
            signal.signal(number, handler)


def _stop_then(number: int, load: CompetingLoad) -> Callable[[int, Any], None]:
    """A handler that stops the load and then lets the signal do what it did before."""

    def handler(signum: int, frame: Any) -> None:
        previous = load._previous_handlers.get(number, signal.SIG_DFL)
        stop_all()  # restores every handler, so re-raising below reaches the previous one
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    return handler


def stop_all() -> None:
    """Stop every competing load of this process (the safety net's single action)."""
    for load in list(_running):
        load.stop()


atexit.register(stop_all)
