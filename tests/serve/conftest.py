"""One tiny-random server process for the serving tests (session-scoped), and a reference model."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest
from flax import nnx

from alignment.data import chat
from alignment.models import Transformer
from alignment.models.tokenizer import with_chat_template
from alignment.train.model import load_policy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = "tiny-random"
CONTEXT, MAX_TOKENS = 4096, 24  # a DAN prompt is about 3,100 tiny-tokenizer tokens


def _request(url: str, body=None, timeout: float = 300) -> tuple[int, dict]:
  """(status, JSON body) of a GET (no body) or a POST of `body` (a dict, or raw bytes)."""
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(*flags):
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "alignment.serve", f"--model={MODEL}", "--chat_template=chatml",
                           f"--port={port}", f"--context={CONTEXT}", f"--max_tokens={MAX_TOKENS}", *flags],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited: {proc.stdout.read()[-2000:]}")
    try:
      if _request(f"http://127.0.0.1:{port}/health", timeout=1)[0] == 200:
        return proc, f"http://127.0.0.1:{port}"
    except OSError:
      time.sleep(0.5)
  proc.kill()
  raise RuntimeError("the server did not come up in 600 s")


@pytest.fixture(scope="session")
def server():
  proc, url = _start("--warmup_widths=64,128")
  yield url
  proc.terminate()
  proc.wait(timeout=30)


@pytest.fixture(scope="session")
def client(server):
  return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def reference():
  policy = load_policy(MODEL)
  tokenizer = with_chat_template(policy.tokenizer, chat.load_template())
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(policy.cfg, rngs=nnx.Rngs(0)))), policy.params)
  return model, tokenizer


