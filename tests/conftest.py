import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')


def run_script(script, *args, cwd=None, check=True, timeout=600):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(proc, *fragments):
    """A bad input ends with exit 1 and one line on stderr that names the problem, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope='session')
def synthetic_dir(tmp_path_factory):
    """A small synthetic dataset, prepared once for the session."""
    path = tmp_path_factory.mktemp('synthetic')
    run_script('prep.py', '--dataset=synthetic', f'--data_dir={path}', '--synthetic_sizes=600,100,100',
               '--synthetic_dim=256')
    return path
