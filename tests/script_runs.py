"""Run the repository's scripts the way a user does: ``python examples/NAME.py ARGS`` in a fresh process.

The child imports this checkout's ``mixshare_layers`` (``PYTHONPATH`` = the repository root, ahead of any inherited
path) and uses one intra-op thread. Most of a short run is the start-up of Python and torch, so :func:`run_all`
starts several commands at once and waits for them all: a test module that needs many short runs makes them in one
fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
K = TypeVar("K")


@dataclass(frozen=True)
class Result:
    """What a finished command left: its exit code, standard output and standard error."""

    code: int
    out: str
    err: str

    def err_lines(self) -> list[str]:
        """The non-empty lines of standard error."""
        return [line for line in self.err.splitlines() if line.strip()]


def script_env(**extra: str) -> dict[str, str]:
    """This process's environment, with the repository first on ``PYTHONPATH``, one thread, and ``extra``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def run(
    *args: object,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> Result:
    """``python ARGS`` with :func:`script_env` (plus ``env``): ``run("examples/x.py", "--smoke")``, ``run("-m", ...)``.

    A first argument ending in ``.py`` is a script, relative to the repository root unless absolute.
    """
    argv = [str(a) for a in args]
    if argv and argv[0].endswith(".py"):
        argv[0] = str(ROOT / argv[0])
    proc = subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env=script_env(**dict(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_all(calls: Mapping[K, Callable[[], Result]], jobs: int | None = None) -> dict[K, Result]:
    """Make every call (e.g. ``functools.partial(run, ...)``), ``jobs`` at a time; their results, by key."""
    jobs = jobs or max(2, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {key: pool.submit(call) for key, call in calls.items()}
        return {key: future.result() for key, future in futures.items()}
