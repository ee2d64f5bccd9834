"""A `gs://` workdir keeps its scheme: checkpoints, metrics, config, TensorBoard and eval reports all land
in the bucket, nothing at '<cwd>/gs:/...', and the run resumes from it and evaluates from it.

The bucket is a local Google Cloud Storage server (`tests/gcs_emulator.py`) behind the real clients: gcsfs
(what etils.epath uses for gs://) and TensorStore (what orbax writes arrays with)."""

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "alignment-test"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(environment pointing both clients at the emulator, the emulator's storage folder for the bucket)."""
  root = tmp_path_factory.mktemp("gcs")
  port = _free_port()
  server = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(port), BUCKET,
                             str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 60
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2)
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail("the storage emulator did not start")
      time.sleep(0.2)
  env = dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_CLOUD_PROJECT="test",
             PYTHONPATH=REPO)
  yield env, root / ".cloudstorage" / BUCKET
  server.kill()
  server.wait()


def _run(args, env, cwd):
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _scalars(event_file: bytes) -> dict:
  """{tag: {step: value}} from TensorBoard's TFRecord framing (length, crc, event proto, crc)."""
  from tensorboardX.proto import event_pb2
  out, offset = {}, 0
  while offset < len(event_file):
    (length,) = struct.unpack("<Q", event_file[offset:offset + 8])
    event = event_pb2.Event.FromString(event_file[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


@pytest.mark.slow
def test_a_gs_workdir_keeps_its_scheme_for_everything_the_run_writes(gcs, tmp_path):
  env, bucket = gcs
  workdir = f"gs://{BUCKET}/runs/sft"
  config = os.path.join(REPO, "configs", "sft.py") + ":tiny"
  common = [f"--config={config}", f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--config.kernel.impl=naive", "--config.train.ckpt_every=2", "--config.train.eval_every=2",
            "--config.evals.every=2", "--config.evals.limit=4", "--config.evals.batch_size=4",
            "--config.evals.max_new_tokens=4"]
  _run(["-m", "alignment.main", *common, "--config.train.steps=4"], env, tmp_path)

  stored = bucket / "runs" / "sft"
  assert json.loads((stored / "config.json").read_text())["algorithm"] == "sft"
  lines = [json.loads(line) for line in (stored / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
  assert sorted(os.listdir(stored / "checkpoints")) == ["2", "4"]
  assert (stored / "checkpoints" / "4" / "state" / "_METADATA").exists()
  assert sorted(os.listdir(stored / "evals")) == ["step_000002.json", "step_000004.json"]
  events = [f for f in os.listdir(stored / "tensorboard") if "tfevents" in f]
  assert len(events) == 1
  assert sorted(_scalars((stored / "tensorboard" / events[0]).read_bytes())["loss"]) == [1, 2, 3, 4]
  assert not [p for p in tmp_path.rglob("*") if "gs:" in str(p)]  # no '<cwd>/gs:/...' copy
  assert not os.path.exists(os.path.join(REPO, "gs:"))

  # Resumed from the bucket; a step logged once each; evaluated from the bucket.
  resumed = _run(["-m", "alignment.main", *common, "--config.train.steps=6"], env, tmp_path)
  assert f"Resumed from {workdir}/checkpoints at step 4" in resumed.stderr
  steps = [json.loads(line)["step"] for line in (stored / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6]
  evaluated = _run(["-m", "alignment.evaluate", f"--model={workdir}", "--limit=3", "--max_new_tokens=4"], env, tmp_path)
  assert f"{workdir} (step 6)" in evaluated.stdout
  assert json.loads((stored / "evals" / "eval_gym_test.json").read_text())["num_probes"] == 3
