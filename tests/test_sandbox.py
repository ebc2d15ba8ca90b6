"""The sandbox for untrusted code: each escape or resource attack is stopped or denied, and hidden tests are scored in
the parent (an early exit or a forged "passed" scores 0)."""

import os
import shutil
import tempfile
import threading
import time

import pytest

from k2.gym import sandbox

# Isolation needs root with namespaces allowed (CI and the device run as root). Without it the escape tests would
# attack the host itself (a fork bomb that leaves the process group), so they are skipped, as the sandbox logs.
needs_root = pytest.mark.skipif(not sandbox.isolated(), reason='no namespaces here: the sandbox has only rlimits')


def test_runs_code_and_captures_stdout():
  result = sandbox.run('print(sum(range(10)))\nimport sys; print("warn", file=sys.stderr)', timeout_s=2)
  assert (result.status, result.stdout, result.stderr, result.returncode) == ('ok', '45\n', 'warn\n', 0)


def test_infinite_loop_times_out():
  start = time.monotonic()
  result = sandbox.run('while True:\n  pass', timeout_s=1)
  assert result.status == 'timeout' and time.monotonic() - start < 3


def test_two_gib_allocation_hits_the_memory_limit():
  result = sandbox.run('x = bytearray(2 << 30)\nprint("allocated")', memory_mb=256)
  assert result.status == 'memory' and 'allocated' not in result.stdout


def test_output_is_capped():
  result = sandbox.run('print("x" * 100000)', max_output=1000)
  assert len(result.stdout) == 1000


@needs_root
def test_fork_bomb_that_leaves_the_process_group_is_killed_with_the_pid_namespace():
  marker = 'k2_fork_bomb_' + os.urandom(4).hex()
  spin = 'import os\\nwhile True:\\n  try: os.fork()\\n  except OSError: pass'
  bomb = ('import os, sys\nwhile True:\n  try:\n    if os.fork() == 0:\n      os.setsid()\n'
          f'      os.execv(sys.executable, [sys.executable, "-c", "{spin}", "{marker}"])\n'
          '  except OSError:\n    pass\n')

  def running():
    found = 0
    for pid in filter(str.isdigit, os.listdir('/proc')):
      try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
          found += marker.encode() in f.read()
      except OSError:
        continue
    return found

  results = []
  thread = threading.Thread(target=lambda: results.append(sandbox.run(bomb, timeout_s=1.5, max_processes=8)))
  thread.start()
  time.sleep(1.0)
  during = running()
  thread.join()
  assert results[0].status == 'timeout'
  assert 0 < during <= 8  # the process limit held
  assert running() == 0   # setsid'd escapees died with the namespace


@needs_root
@pytest.mark.parametrize('address', ['127.0.0.1', '1.1.1.1'])
def test_network_is_unreachable(address):
  result = sandbox.run(f'import socket\nsocket.create_connection(("{address}", 80), timeout=1)\nprint("connected")')
  assert result.status == 'denied' and 'unreachable' in result.reason and 'connected' not in result.stdout


# Root-owned places the sandbox sees; the repo too unless it lies under /tmp or /var/tmp (private, empty tmpfs inside
# the sandbox, where writing there fails as 'not found', not as 'denied').
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_VISIBLE_DIRS = ['/etc', '/usr/local'] + ([] if _REPO.startswith(('/tmp/', '/var/tmp/')) else [_REPO])


@needs_root
@pytest.mark.parametrize('directory', _VISIBLE_DIRS)
def test_write_outside_the_temp_dir_is_denied(directory):
  path = os.path.join(directory, 'k2_sandbox_test')
  result = sandbox.run(f'open({path!r}, "w").write("x")')
  assert result.status == 'denied' and not os.path.exists(path)


@needs_root
def test_reading_a_root_only_file_is_denied():
  directory = tempfile.mkdtemp(dir='/etc')  # visible inside (/tmp and /var/tmp are private there)
  try:
    os.chmod(directory, 0o755)
    secret = os.path.join(directory, 'secret')
    with open(secret, 'w') as f:
      f.write('hunter2')
    os.chmod(secret, 0o600)
    result = sandbox.run(f'print(open({secret!r}).read())')
    assert result.status == 'denied' and 'hunter2' not in result.stdout
  finally:
    shutil.rmtree(directory)


@needs_root
def test_runs_unprivileged_with_private_world_writable_dirs():
  outside = ['/dev/shm/k2_sandbox_visible', '/var/tmp/k2_sandbox_visible']
  for path in outside:
    with open(path, 'w'):
      pass
  try:
    result = sandbox.run('import os\nprint(os.getuid(), os.listdir("/dev/shm"), os.listdir("/var/tmp"), '
                         'os.listdir("/tmp"), os.getcwd())\nopen("/var/tmp/left_behind", "w")')
  finally:
    for path in outside:
      os.remove(path)
  uid, rest = result.stdout.split(' ', 1)
  assert int(uid) >= 1_000_000 and rest == "[] [] ['work'] /tmp/work\n"
  assert result.status == 'ok' and not os.path.exists('/var/tmp/left_behind')


ADD = 'def add(a, b):\n  return a + b\n'
CASES = [((1, 2), 3), ((-4, 4), 0), ((10, 5), 15)]


def test_hidden_tests_count_correct_outputs():
  assert sandbox.run_tests(ADD, 'add', CASES).passed == 3
  wrong = sandbox.run_tests('def add(a, b):\n  return a + b if a > 0 else 7\n', 'add', CASES)
  assert (wrong.passed, wrong.total, wrong.reason) == (2, 3, '1 of 3 tests failed')


@pytest.mark.parametrize('cheat', [
    'import sys\nsys.exit(0)\n',
    'import os\nos._exit(0)\n',
    'print("all tests passed")\nprint("PASS")\nimport sys\nsys.exit(0)\n',
    # Tagged lines on the results channel, even with the harness's nonce, only count if the outputs are right.
    'import os, sys, json\nnonce = sys._getframe(1).f_locals["spec"]["nonce"]\n'
    'for i in range(3):\n  os.write(3, (nonce + " " + json.dumps({"i": i, "out": "passed"}) + "\\n").encode())\n'
    'def add(a, b):\n  return 0\n',
])
def test_early_exit_and_forged_passes_score_zero(cheat):
  result = sandbox.run_tests(cheat, 'add', CASES)
  assert result.passed == 0 and result.score == 0.0


def test_a_crashing_solution_scores_zero_with_a_reason():
  result = sandbox.run_tests('def add(a, b):\n  raise RuntimeError\n', 'add', CASES)
  assert (result.passed, result.status) == (0, 'ok') and result.reason == '3 of 3 tests failed'
  result = sandbox.run_tests('x = (', 'add', CASES)
  assert (result.passed, result.status) == (0, 'error') and 'SyntaxError' in result.reason


def test_without_namespaces_the_limits_and_the_timeout_still_apply(monkeypatch):
  monkeypatch.setattr(sandbox, 'isolated', lambda: False)  # the fallback a non-root user gets
  assert sandbox.run('print(6 * 7)').stdout == '42\n'
  assert sandbox.run('while True:\n  pass', timeout_s=1).status == 'timeout'
  assert sandbox.run('x = bytearray(2 << 30)', memory_mb=256).status == 'memory'
  assert sandbox.run_tests(ADD, 'add', CASES).passed == 3
