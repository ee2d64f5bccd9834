"""Every test process sees 8 fake CPU devices, so sharding is real in every test that wants a mesh.

Compiled programs are cached on disk for the session (and the subprocesses it starts), so the many
runs of the same tiny configs compile once.
"""

import os
import subprocess
import sys
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "alignment-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
  """A trained tiny safety classifier's workdir: `configs/classifier.py:tiny` on one CPU device (what is
  learned does not depend on the mesh). It flags prompts by their subject words (poison, malware)."""
  workdir = tmp_path_factory.mktemp("classifier") / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "alignment.main", "--config=configs/classifier.py:tiny",
                         f"--workdir={workdir}", f"--config.data.data_dir={workdir.parent / 'tfds'}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir
