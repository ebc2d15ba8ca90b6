"""A sandbox for untrusted Python (RL code tasks, tool calls that run code): `run(code)` and `run_tests(code, ...)`.

    result = sandbox.run('print(sum(range(10)))', timeout_s=2, memory_mb=256)
    result.status, result.stdout          # 'ok', '45\n'
    sandbox.run_tests(solution, 'add', cases=[((1, 2), 3)]).passed

Isolation, as root (CI and the device machines run as root): this file, run as a script by the parent in a new
session, is a launcher that enters new network, mount, PID and IPC namespaces and forks the program as PID 1 there.
Before exec'ing the interpreter the child makes every mount private, mounts a fresh tmpfs on each world-writable
directory (/tmp, /var/tmp, /dev/shm, /run/lock) and a fresh /proc, hides the root-only directory holding the
interpreter behind a tmpfs that exposes only the interpreter's prefix, sets rlimits (CPU, address space, file size,
open files, processes), drops to a fresh unprivileged uid (one per run, so concurrent runs never share the process
count) with no_new_privs, and runs in /tmp/work. The network namespace has only a down loopback, so every
connection fails. On the wall timeout the parent asks the launcher to SIGKILL the program; when PID 1 of a namespace
dies the kernel kills and reaps everything left in it (even processes that left the group with setsid) before the
launcher's wait returns. The parent then SIGKILLs the launcher's whole process group, and the program also dies if
the launcher does (parent-death signal). Not root, or namespaces denied (a container): only the rlimits and the
timeout apply, and one warning line says so (`isolated()`).

Verdicts are computed in the parent: `run_tests` sends the test inputs in, the program reports its outputs on fd 3 as
lines tagged with a per-run random nonce (read from stdin and closed before the solution runs, so the solution's own
prints are never taken for results), and the parent compares them with the expected outputs, which never enter the
sandbox. A solution that exits early (sys.exit(0), os._exit) reports nothing and scores 0; one that prints "all tests
passed" or its own tagged lines gains nothing, since only the parent's comparison counts. `Result.status` of a plain
run reads the program's exit status and stderr: information for metrics, never a verdict.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time

STATUSES = ('ok', 'timeout', 'memory', 'error', 'denied')
_NAMESPACES = os.CLONE_NEWNET | os.CLONE_NEWNS | os.CLONE_NEWPID | os.CLONE_NEWIPC
_WORLD_WRITABLE = ('/tmp', '/var/tmp', '/dev/shm', '/run/lock')  # each gets a fresh tmpfs inside
_DENIED = re.compile(r'^(PermissionError|OSError: \[Errno (1|13|30|101)\]|ConnectionRefusedError)')


@dataclasses.dataclass(frozen=True)
class Result:
  status: str       # one of STATUSES
  stdout: str       # the first max_output bytes of the program's stdout (decoded, errors replaced)
  stderr: str
  returncode: int   # the program's exit code; 128 + N when signal N ended it (137 when the timeout killed it)
  wall_s: float
  reason: str       # why the status is not 'ok' ('' when it is)
  report: str = ''  # what the program wrote on fd 3 (run_tests' result channel)


@dataclasses.dataclass(frozen=True)
class TestResult:
  passed: int
  total: int
  status: str
  reason: str
  run: Result

  @property
  def score(self) -> float:
    return self.passed / self.total if self.total else 0.0


def run(code: str, timeout_s: float = 2.0, memory_mb: int = 256, stdin: str = '', max_processes: int = 16,
        max_file_bytes: int = 1 << 20, max_output: int = 1 << 16) -> Result:
  """Runs the Python source `code` (stdlib only: isolated mode, no site-packages) in the sandbox."""
  if timeout_s <= 0 or memory_mb <= 0 or max_processes <= 0:
    raise ValueError(f'timeout_s={timeout_s}, memory_mb={memory_mb}, max_processes={max_processes} must be > 0')
  with tempfile.TemporaryDirectory(prefix='k2_sandbox_') as scratch:
    paths = {name: os.path.join(scratch, name) for name in ('spec', 'stdin', 'stdout', 'stderr', 'report')}
    spec = dict(code=code, isolated=isolated(), uid=1_000_000 + secrets.randbelow(1_000_000),
                cpu_s=int(timeout_s) + 1, memory_bytes=memory_mb << 20, max_processes=max_processes,
                max_file_bytes=max_file_bytes, python=os.path.realpath(sys._base_executable),
                prefix=os.path.realpath(sys.base_prefix))
    for name, text in (('spec', json.dumps(spec)), ('stdin', stdin)):
      with open(paths[name], 'w') as f:
        f.write(text)
    with (open(paths['stdin']) as fin, open(paths['stdout'], 'w') as fout, open(paths['stderr'], 'w') as ferr,
          open(paths['report'], 'w') as freport):
      start = time.monotonic()
      launcher = [spec['python'], '-I', '-S', os.path.abspath(__file__), paths['spec'], str(freport.fileno())]
      proc = subprocess.Popen(launcher, stdin=fin, stdout=fout, stderr=ferr, start_new_session=True,
                              pass_fds=(freport.fileno(),))
      try:
        returncode, timed_out = proc.wait(timeout=timeout_s), False
      except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher kills the program and returns once its PID namespace is empty
        with contextlib.suppress(subprocess.TimeoutExpired):
          proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGKILL)  # the rest of the group (all there is without namespaces)
        returncode, timed_out = proc.wait(), True
      wall_s = time.monotonic() - start
    out = {name: _read(paths[name], max_output) for name in ('stdout', 'stderr', 'report')}
  status, reason = _classify(returncode, timed_out, out['stderr'], timeout_s)
  return Result(status=status, stdout=out['stdout'], stderr=out['stderr'], returncode=returncode, wall_s=wall_s,
                reason=reason, report=out['report'])


@functools.cache
def isolated() -> bool:
  """Whether runs here get the namespaces and the uid drop: root, with namespaces allowed (a container may deny
  them to root). Otherwise one warning line says so, once."""
  probe = f'import os; os.unshare({_NAMESPACES})'
  if os.geteuid() == 0 and subprocess.run([sys._base_executable, '-I', '-S', '-c', probe],
                                          capture_output=True).returncode == 0:
    return True
  logging.warning('k2.gym.sandbox: no root or no namespaces, so untrusted code runs WITHOUT network, mount and PID '
                  'isolation and as this user (only rlimits and the wall timeout apply)')
  return False


def _read(path: str, limit: int) -> str:
  with open(path, 'rb') as f:
    return f.read(limit).decode('utf-8', errors='replace')


def _classify(returncode: int, timed_out: bool, stderr: str, timeout_s: float) -> tuple[str, str]:
  last = stderr.strip().splitlines()[-1] if stderr.strip() else ''
  if timed_out:
    return 'timeout', f'wall time over {timeout_s:g} s'
  if returncode in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
    return 'timeout', 'killed: CPU time limit'
  if 'MemoryError' in stderr[-2000:]:
    return 'memory', 'memory limit'
  if returncode == 0:
    return 'ok', ''
  if _DENIED.match(last):
    return 'denied', last[:200]
  return 'error', last[:200] or f'exit code {returncode}'


_HARNESS = '''
import json, os, sys
def _main():
  spec = json.loads(sys.stdin.read())
  sys.stdin.close()
  report = os.fdopen(3, 'w', buffering=1)
  namespace = {'__name__': 'solution'}
  exec(compile(spec['code'], 'solution.py', 'exec'), namespace)
  function = namespace[spec['function']]
  for i, args in enumerate(spec['cases']):
    try:
      line = json.dumps({'i': i, 'out': function(*args)}, sort_keys=True)
    except Exception as e:
      line = json.dumps({'i': i, 'error': type(e).__name__})
    report.write(spec['nonce'] + ' ' + line + '\\n')
_main()
'''


def run_tests(code: str, function: str, cases: list[tuple[tuple, object]], **limits) -> TestResult:
  """Scores `code` by hidden tests: calls `function(*args)` in the sandbox for each (args, expected) of `cases`
  (JSON values) and counts, in the parent, the outputs equal to `expected` (as canonical JSON). limits: run's."""
  nonce = secrets.token_hex(16)
  stdin = json.dumps({'code': code, 'function': function, 'nonce': nonce, 'cases': [list(a) for a, _ in cases]})
  result = run(_HARNESS, stdin=stdin, **limits)
  outputs = {}
  for line in result.report.splitlines():
    tag, _, payload = line.partition(' ')
    if tag == nonce:
      try:
        item = json.loads(payload)
        outputs.setdefault(int(item['i']), item)
      except (ValueError, KeyError, TypeError):
        continue
  passed = sum('out' in outputs.get(i, {}) and
               json.dumps(outputs[i]['out'], sort_keys=True) == json.dumps(expected, sort_keys=True)
               for i, (_, expected) in enumerate(cases))
  reason = (result.reason or ('no test results: the program ended before the tests ran' if not outputs else
                              f'{len(cases) - passed} of {len(cases)} tests failed' if passed < len(cases) else ''))
  return TestResult(passed=passed, total=len(cases), status=result.status, reason=reason, run=result)


# ---- The launcher: this file run as a script by `run`, in the new session (stdlib only, single-threaded). ----

def _mount(source, target, fstype, flags, data=None):
  args = [x.encode() if isinstance(x, str) else x for x in (source, target, fstype, data)]
  if _libc().mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]) != 0:
    raise OSError(ctypes.get_errno(), f'mount {target}')


def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _isolate(spec: dict) -> str:
  """In the new namespaces, as root: private mounts, fresh world-writable directories and /proc, the interpreter
  reachable, and the program's directory (returned) owned by its uid."""
  ms_nosuid, ms_nodev, ms_bind, ms_move, ms_rec, ms_private = 2, 4, 4096, 8192, 16384, 1 << 18
  _mount(None, '/', None, ms_rec | ms_private)
  for target in _WORLD_WRITABLE:
    if os.path.isdir(target):
      _mount('tmpfs', target, 'tmpfs', ms_nosuid | ms_nodev, 'size=16m,mode=1777')
  _mount('proc', '/proc', 'proc', ms_nosuid | ms_nodev)
  prefix, ancestors = spec['prefix'], []
  path = os.path.dirname(prefix)
  while path != '/':
    ancestors.append(path)
    path = os.path.dirname(path)
  closed = [a for a in ancestors if not os.stat(a).st_mode & 0o001]  # not traversable by other users
  if closed:  # e.g. pyenv under /root (0700): a tmpfs on the outermost one, with only the prefix bound back in
    hidden = closed[-1]
    os.mkdir('/tmp/.python')
    _mount(prefix, '/tmp/.python', None, ms_bind | ms_rec)
    _mount('tmpfs', hidden, 'tmpfs', ms_nosuid | ms_nodev, 'size=1m,mode=755')
    os.makedirs(prefix)
    _mount('/tmp/.python', prefix, None, ms_move)
    os.rmdir('/tmp/.python')
  os.mkdir('/tmp/work', 0o700)
  os.chown('/tmp/work', spec['uid'], spec['uid'])
  return '/tmp/work'


def _launch(spec_path: str, report_fd: int) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  if report_fd != 3:
    os.dup2(report_fd, 3)
    os.close(report_fd)
  if spec['isolated']:
    os.unshare(_NAMESPACES)
  pid = os.fork()
  if pid:
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    # Returns once the program (PID 1 of its namespace) has exited and the kernel has killed and reaped the rest.
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(code if code >= 0 else 128 - code)
  if spec['isolated']:
    workdir = _isolate(spec)
  else:
    workdir = os.path.join(os.path.dirname(spec_path), 'work')
    os.mkdir(workdir, 0o700)
  with open(os.path.join(workdir, 'main.py'), 'w') as f:
    f.write(spec['code'])
  for limit, value in ((resource.RLIMIT_CPU, spec['cpu_s']), (resource.RLIMIT_AS, spec['memory_bytes']),
                       (resource.RLIMIT_FSIZE, spec['max_file_bytes']), (resource.RLIMIT_NOFILE, 64),
                       (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
  if spec['isolated']:
    resource.setrlimit(resource.RLIMIT_NPROC, (spec['max_processes'], spec['max_processes']))
    os.setgroups([])
    os.setgid(spec['uid'])
    os.setuid(spec['uid'])
    _libc().prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binaries
    _libc().prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG (after setuid, which clears it)
  os.chdir(workdir)
  os.execve(spec['python'], [spec['python'], '-I', '-S', 'main.py'], {'PATH': '/usr/bin:/bin', 'HOME': workdir})


if __name__ == '__main__':
  _launch(sys.argv[1], int(sys.argv[2]))
