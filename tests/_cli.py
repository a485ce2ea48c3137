"""Running the command-line tools in a subprocess, and the checks every bad-input case makes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def tool_env(env=None) -> dict:
    """The environment for a tool: this checkout first on PYTHONPATH (an installed fsmis elsewhere
    must not be picked up), then the tests folder (the tiny methods), then what was there."""
    env = dict(os.environ if env is None else env)
    parts = [str(ROOT), str(TESTS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(args, env=None, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=tool_env(env), **kw)


def _default_sigint():
    # a shell without job control starts background commands with SIGINT ignored, and children
    # inherit that: the tool under test must see Ctrl-C as a user would
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(args, env=None, **kw):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=tool_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kw)


def clean_error(proc, *names, code=2):
    """Exit status ``code``, no traceback, and every one of ``names`` in the message."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    for n in names:
        assert str(n) in proc.stderr, (n, proc.stderr[-1500:])


def snapshot(folder) -> dict:
    """Every file and folder under ``folder`` (hidden ones included): path -> (size, mtime)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}
