"""Vocabulary parallelism on 8 fake CPU devices (a subprocess: the device count is fixed at import)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_check(impls):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(HERE)),
                                       env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.join(HERE, "vocab_parallel_check.py"), impls],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impls", ["xla", "pallas_tpu", "pallas_gpu"])
def test_vocab_parallel_equals_single_device(impls):
  errors = run_check(impls)
  assert len(errors) == (6 if impls == "xla" else 3)
  bad = {k: v for k, v in errors.items() if not v <= 2e-6}
  assert not bad, bad
