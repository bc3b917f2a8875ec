"""Run the repository's scripts the way a user does, in fresh processes, and collect what they leave.

- :func:`run`: one command, ``python examples/NAME.py ARGS`` (or ``python -m MODULE ARGS``), in a process of its own.
- :func:`run_commands`: several command lines in one fresh process, each run as ``python -m MODULE ARGS`` would
  run it (``runpy.run_module`` under ``__main__``, its own ``sys.argv``, its output captured at the file-descriptor
  level, so that the processes it starts are captured too). Most of a short command is the start-up of Python and
  torch: a table of refused command lines pays it once. The scripts of ``examples/`` run as ``examples.NAME``.
- :func:`run_all`: several of the above at once.

Every process imports this checkout's ``mixshare_layers`` (``PYTHONPATH`` = the repository root, ahead of any
inherited path) and uses one intra-op thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
K = TypeVar("K")
T = TypeVar("T")

_DRIVER = textwrap.dedent(
    """
    import importlib.util, json, os, runpy, sys, tempfile, traceback
    root, commands = sys.argv[1], json.loads(sys.argv[2])
    results = []
    real_out, real_err = os.dup(1), os.dup(2)
    for module, argv in commands:
        origin = importlib.util.find_spec(module).origin
        if os.path.commonpath([os.path.realpath(origin), root]) != root:
            raise SystemExit(f"{module} is {origin}, not this repository's")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = [origin, *argv]
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code
                if isinstance(code, str):
                    print(code, file=sys.stderr)
                code = 0 if code is None else code if isinstance(code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(real_out, 1)
                os.dup2(real_err, 2)
            out.seek(0)
            err.seek(0)
            text = [f.read().decode("utf-8", errors="replace") for f in (out, err)]
        results.append([code, *text])
    print(json.dumps(results))
    """
)


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
        [sys.executable, *argv], cwd=cwd, env=script_env(**dict(env or {})), capture_output=True, timeout=timeout
    )
    out, err = (text.decode("utf-8", errors="replace") for text in (proc.stdout, proc.stderr))  # "\r" kept
    return Result(proc.returncode, out, err)


def run_commands(
    commands: Sequence[tuple[str, Sequence[object]]],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> list[Result]:
    """Each ``(module, argv)`` as ``python -m module argv`` would run it, in turn, in one fresh process.

    ``module`` must be this repository's (``examples.export_onnx``, ``mixshare_layers.analysis``, ...).
    """
    payload = json.dumps([[module, [str(a) for a in argv]] for module, argv in commands])
    proc = run("-c", _DRIVER, str(ROOT), payload, cwd=cwd, env=env, timeout=timeout)
    if proc.code != 0:
        raise RuntimeError(f"the command driver failed (exit code {proc.code}): {proc.err[-3000:]}")
    return [Result(code, out, err) for code, out, err in json.loads(proc.out.strip().splitlines()[-1])]


def run_all(calls: Mapping[K, Callable[[], T]], jobs: int | None = None) -> dict[K, T]:
    """Make every call (e.g. ``functools.partial(run, ...)``), ``jobs`` at a time; their results, by key."""
    jobs = jobs or max(2, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {key: pool.submit(call) for key, call in calls.items()}
        return {key: future.result() for key, future in futures.items()}
