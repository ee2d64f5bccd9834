"""Two JAX processes on this machine (4 fake CPU devices each) run one job as a multi-host pod would, and
give the numbers one process with 8 devices gives: SFT, RM, DPO with a live and with a cached reference,
GRPO (sampling, rewards scored host by host, the update).
A SIGTERM to one host stops both at the same step, and the checkpoint resumes on the other number of
hosts and another mesh (both ways) to the uninterrupted losses.

Tolerances: 1e-5 of each value's scale (at least 1). On the same mesh the two set-ups differ only in how
the hosts' collectives sum (measured: at most 1.5e-6 of the value); across meshes the matmuls sum in other
orders too (DPO over 40 steps: at most 6e-7 of the value). Reading a wrong batch moves a loss by ~1e-2."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from alignment import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
MESH = ("--config.mesh.data=4", "--config.mesh.fsdp=2", "--config.mesh.tensor=1")
OTHER_MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
JOBS = {
    "sft": ("configs/sft.py:tiny", ()),
    "rm": ("configs/rm.py:tiny", ()),
    "dpo_live": ("configs/dpo.py:tiny", ("--config.dpo.reference=live",)),
    "dpo_cached": ("configs/dpo.py:tiny", ("--config.dpo.reference=cached",)),
    # online RL: each host samples its rows, the host verifiers score each host's share, the rewards are gathered
    "grpo": ("configs/grpo.py:tiny", ("--config.rl.rewards=vowels,distinct_words:0.5",)),
}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(job, workdir, shared, processes, *overrides, mesh=MESH):
  """Starts the job's `processes` processes (8 devices in all); returns the Popen objects."""
  config, extra = JOBS[job]
  port = _free_port()
  args = [sys.executable, "-m", "alignment.main", f"--config={config}", f"--workdir={workdir}",
          "--config.kernel.impl=naive", *extra, *mesh, *overrides]
  if not job.startswith("grpo"):
    args += [f"--config.data.data_dir={shared / 'tfds'}", "--config.train.eval_every=2"]
  if job.startswith("dpo"):
    args.append(f"--config.dpo.ref_cache_dir={shared / f'ref_cache_{processes}'}")
  procs = []
  for pid in range(processes):
    # Not the suite's persistent compilation cache: with it a process may run an executable another job's
    # process 0 compiled, or its own, depending on timing; each process here compiles its own programs.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_COMPILATION_CACHE",
                                                                     "JAX_PERSISTENT_CACHE"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}", JAX_PLATFORMS="cpu")
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  return procs


TIMEOUT_S = 600  # a job here takes 30-150 s on 2 cores, most of it compiling


def _finish(procs, codes=(0,)):
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:  # a stuck job: where each process waits (alignment.main dumps on SIGUSR1)
    for p in procs:
      p.send_signal(signal.SIGUSR1)
    time.sleep(5)
    for p in procs:
      p.kill()
    logs = []
    for p in procs:  # what it logged last (its steps, XLA's warnings), then its threads' stacks
      err = p.communicate()[1]
      dump = min((i for i in (err.find("\nThread 0x"), err.find("\nCurrent thread 0x")) if i >= 0), default=len(err))
      logs.append(err[:dump][-4000:] + "\n[stacks]\n" + err[dump:][-4000:])
    pytest.fail(f"the job did not finish in {TIMEOUT_S} s; each process's log ends:\n" + "\n-----\n".join(logs))
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode in codes, err[-3000:]
  return outputs


def _records(workdir):
  return metrics.read_metrics(str(workdir))


# A KL to the reference is the difference of two log-prob sums over a completion (24 tokens, |log p| up to
# log 512 ~ 6.2 on the tiny model): its scale is theirs, ~150, not its own.
SCALES = {"kl/ref": 150.0, "kl/k3_token": 6.2, "policy/kl_loss": 6.2}


def _sign_of_noise(step, key):
  """Before DPO's first update (the eval at step 0, the train metrics of step 1) the policy is its
  reference, so every pair's reward margin is rounding noise and the share of pairs with a positive one
  (`rewards/accuracies`) is that noise's sign: another mesh sums in another order and may flip it (seen:
  one pair in 8). The margins themselves are still compared."""
  return step <= 1 and key.endswith("rewards/accuracies")


def _assert_same_run(got, want):
  """Every metric of every step (timings aside) within 1e-5 of its scale."""
  assert sorted(got) == sorted(want)
  timing = lambda k: k in ("step", "time") or k.startswith("time/") or k == "rollout/tokens_per_s"
  for step in want:
    keys = [k for k in want[step] if not timing(k)]
    assert sorted(keys) == sorted(k for k in got[step] if not timing(k))
    for key in keys:
      if _sign_of_noise(step, key):
        continue
      assert abs(got[step][key] - want[step][key]) <= 1e-5 * max(1.0, abs(want[step][key]), SCALES.get(key, 0)), \
          (step, key, got[step][key], want[step][key])


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
  """(job, *overrides) -> the records of that one-process run, run once when first asked for."""
  shared = tmp_path_factory.mktemp("one_host")
  cache = {}

  def get(job, *overrides, mesh=MESH):
    key = (job, *overrides, *mesh)
    if key not in cache:
      workdir = shared / f"run{len(cache)}"
      _finish(_start(job, workdir, shared, 1, *overrides, mesh=mesh))
      cache[key] = _records(workdir)
    return cache[key]
  get.shared = shared
  return get


@pytest.mark.multihost
@pytest.mark.slow
@pytest.mark.parametrize("job", sorted(JOBS))
def test_two_hosts_give_the_numbers_of_one_host(tmp_path, one_host, job):
  workdir = tmp_path / "run"
  _finish(_start(job, workdir, one_host.shared, 2, f"--config.train.steps={STEPS}"))
  got, want = _records(workdir), one_host(job, f"--config.train.steps={STEPS}")
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(STEPS)]
  if job != "grpo":
    assert any(k.startswith("eval/") for k in want[STEPS])  # the eval passes are compared too
  _assert_same_run(got, want)
  assert max(abs(got[s]["loss"] - want[s]["loss"]) for s in want if "loss" in want[s]) <= 1e-5
  if job == "dpo_cached":  # every host computed the whole reference table, the same one process computes
    files = {n: sorted(os.listdir(one_host.shared / f"ref_cache_{n}")) for n in (1, 2)}
    assert files[1] == files[2] and len(files[1]) == 2
    for name in files[1]:  # sums of ~100 float32 log-probs each, the collectives summing in another order
      np.testing.assert_allclose(np.load(one_host.shared / "ref_cache_2" / name),
                                 np.load(one_host.shared / "ref_cache_1" / name),
                                 rtol=16 * np.finfo(np.float32).eps, atol=0)


def _stop_after(procs, workdir, step, target=0):
  """SIGTERM to process `target` once `workdir`'s metrics show `step`."""
  deadline = time.time() + 600
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if (workdir / "metrics.jsonl").exists() and max(_records(workdir), default=0) >= step:
      procs[target].send_signal(signal.SIGTERM)
      return
    time.sleep(0.05)
  pytest.fail("the run ended before it could be stopped")


@pytest.mark.multihost
@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_stopped_job_resumes_on_another_number_of_hosts_and_mesh(tmp_path, one_host, first, then):
  run_args = ("--config.train.steps=40", "--config.train.eval_every=0")  # room to stop the run midway
  meshes = {2: MESH, 1: OTHER_MESH}
  workdir = tmp_path / "run"
  procs = _start("dpo_live", workdir, one_host.shared, first, *run_args, mesh=meshes[first])
  _stop_after(procs, workdir, 3, target=first - 1)  # with two hosts, the one that does not write the metrics
  outputs = _finish(procs, codes=(143,))
  logged = _records(workdir)
  stopped = max(logged)
  assert 3 <= stopped < 40
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [stopped]  # every host saved that step
  assert all(f"saved a checkpoint at step {stopped}" in err for _, err in outputs)

  _finish(_start("dpo_live", workdir, one_host.shared, then, *run_args, mesh=meshes[then]))
  _assert_same_run(_records(workdir), one_host("dpo_live", *run_args, mesh=OTHER_MESH))
