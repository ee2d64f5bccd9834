"""Two JAX processes on this machine (4 fake CPU devices each) run one SFT job as a multi-host pod would."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from alignment import metrics
from alignment.data import chat, pipeline, sft as sft_data
from alignment.parallel import host_batch_to_global, make_mesh
from alignment.train import state as state_lib
from alignment.train.sft import make_loss_fn
from configs import sft as sft_config
from configs.common import SHARDING_RULES
from tests.train.helpers import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multihost
@pytest.mark.slow
def test_two_processes_train_one_job_on_a_global_batch_of_both_hosts_shards(tmp_path):
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "alignment.main", "--config=configs/sft.py:tiny", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", f"--config.train.steps={STEPS}", "--config.train.eval_every=0",
         "--config.kernel.impl=naive", "--config.mesh.data=4", "--config.mesh.fsdp=2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  logged = metrics.read_metrics(str(workdir))
  assert sorted(logged) == list(range(1, STEPS + 1))
  assert os.listdir(workdir / "checkpoints") == [str(STEPS)]

  # Reference in this process: the step-1 loss over host 0's first batch followed by host 1's.
  config = sft_config.get_config("tiny")
  sources = sft_data.prepare_sft(config.data.train_path, data_dir=data_dir, eval_fraction=config.data.eval_fraction)
  host_batches = [next(pipeline.make_sft_iterator(
      sources["train"], tokenizer=chat.load_tokenizer(), template=chat.load_template(),
      seq_len=config.data.seq_len, batch_size=config.train.batch_size // 2, seed=config.data.seed,
      process_index=i, process_count=2)) for i in range(2)]
  assert not np.array_equal(host_batches[0]["inputs"], host_batches[1]["inputs"])
  global_batch = {k: np.concatenate([b[k] for b in host_batches]) for k in host_batches[0]}
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  setup = tiny_model()
  params = setup.load_params(state_lib.param_shardings(setup.spec, mesh, SHARDING_RULES))
  loss_sum, (count, _) = jax.jit(make_loss_fn(setup.spec.graphdef, "naive"))(
      params, None, host_batch_to_global(global_batch, mesh), jax.random.PRNGKey(0))
  assert logged[1]["loss"] == pytest.approx(float(loss_sum / count), abs=1e-5)
  assert logged[1]["num_tokens"] == float(count)
