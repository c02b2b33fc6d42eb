"""Run untrusted Python (model-written HumanEval solutions) in a separate process, never in ours.

Layers, each enough for the usual accident and together for the usual attack: a fresh interpreter in
isolated mode (-I) in an empty temporary directory with a minimal environment; resource limits (address
space, CPU seconds, file size, no core dumps); a wall-clock timeout that kills the whole process group;
no network (a new network namespace via `unshare -n` where the system allows it); and an audit hook,
installed before the program runs, that ends the process at once (exit 77) on any attempt to start a
process, open a socket, load native code, send a signal, or write, delete or rename outside its directory.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

BLOCKED_EXIT = 77
# The guard runs first in the child; the program is then executed in its own namespace.
GUARD = r'''
import os, resource, sys
sys.dont_write_bytecode = True
MEM, CPU = int(sys.argv[2]) << 20, int(sys.argv[3])
for lim, value in ((resource.RLIMIT_AS, MEM), (resource.RLIMIT_CPU, CPU), (resource.RLIMIT_FSIZE, 16 << 20),
                   (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (value, value))
HOME = os.path.realpath(os.getcwd())
DENY = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "_posixsubprocess.fork_exec", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
        "ctypes.call_function", "shutil.rmtree", "os.remove", "os.rmdir", "os.rename", "os.chmod", "os.chown",
        "os.link", "os.symlink", "os.truncate", "os.chdir", "os.setuid", "os.setgid", "sys.remote_exec"}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _stop(event):
    os.write(2, ("coe-sandbox: blocked " + event + "\n").encode())
    os._exit(77)

def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == HOME or p.startswith(HOME + os.sep)

def _hook(event, args):
    if event in DENY:
        _stop(event)
    if event == "open" and len(args) >= 3 and not isinstance(args[0], int):
        mode, flags = args[1] or "", args[2] or 0
        if (any(c in mode for c in "wax+") or flags & WRITE) and not _inside(args[0]):
            _stop("open for writing outside the sandbox")

sys.addaudithook(_hook)
with open(sys.argv[1], encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
del f
exec(code, {"__name__": "__main__"})
'''


@dataclass(frozen=True)
class Result:
    status: str  # "passed" | "failed" | "timeout" | "blocked"
    detail: str  # the end of stderr, or why it stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare -n` if this system lets us make a network namespace (root, or unprivileged user
    namespaces), else nothing: the audit hook still refuses sockets."""
    for prefix in (("unshare", "-n"), ("unshare", "-rn")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ()


def run_python(code: str, timeout: float = 10.0, memory_mb: int = 1024) -> Result:
    """Run `code` as a program; passed = exit status 0 within the timeout."""
    workdir = tempfile.mkdtemp(prefix="coe-sandbox-")
    try:
        with open(os.path.join(workdir, "guard.py"), "w", encoding="utf-8") as f:
            f.write(GUARD)
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        # Limits are set by the guard in the child rather than by preexec_fn, which can deadlock a parent
        # that runs threads (torch does).
        cmd = [*_netns_prefix(), sys.executable, "-I", "-B", "guard.py", "program.py", str(memory_mb),
               str(int(timeout) + 1)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: nothing it started survives
            proc.communicate()
            return Result("timeout", f"killed after {timeout:g} s")
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        if proc.returncode == BLOCKED_EXIT:
            return Result("blocked", tail[0])
        return Result("passed" if proc.returncode == 0 else "failed", tail[0][:300])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
