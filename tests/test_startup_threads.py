"""dsmoe._startup.spin_openmp_threads_for_decoding: OMP_WAIT_POLICY=active for `dsmoe generate` only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsmoe import _startup


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "dsmoe", "generate", "--model", "m"], "active"),
    (["python", "-m", "dsmoe", "serve", "--model", "m"], None),  # a server's idle threads must not spin
    (["python", "script.py", "generate"], None),  # a library user's program is left alone
    (["python3", "/usr/bin/dsmoe", "serve", "--served-model-name", "generate"], None),  # the subcommand only, not any word
    (["python3", "/usr/bin/dsmoe", "generate", "--model", "m"], "active"),
])
def test_policy_set_for_generate_only(monkeypatch, argv, expected):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(sys, "orig_argv", argv)
    _startup.spin_openmp_threads_for_decoding()
    assert os.environ.get("OMP_WAIT_POLICY") == expected


def test_user_setting_wins(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "dsmoe", "generate"])
    _startup.spin_openmp_threads_for_decoding()
    assert os.environ["OMP_WAIT_POLICY"] == "passive"


def test_set_by_import_dsmoe_before_torch_loads(monkeypatch):
    """`import dsmoe` (what `python -m dsmoe generate` runs first) sets it before importing torch: the check runs
    in a fresh interpreter whose argv looks like the command's, with a torch import hook recording the policy."""
    code = ("import sys, os; sys.orig_argv = ['python', '-m', 'dsmoe', 'generate']\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch': print('at torch import:', os.environ.get('OMP_WAIT_POLICY'))\n"
            "        return None\n"
            "sys.meta_path.insert(0, Hook())\n"
            "import dsmoe\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[0] == "at torch import: active"
