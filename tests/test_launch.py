"""The launch scripts: shellcheck, and what `--dry-run` prints.

A dry run prints each command as a shell line; read back with `shlex` (a shell's own word splitting),
each line must give exactly the argument list the real run executes, overrides with spaces and quotes
included, and a command sent to the TPU workers must split the same way once more on the worker."""

import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/local.sh", "launch/gpu_slurm.sh", "launch/tpu_pod.sh"]
TRICKY = "--config.rl.prompts=it's a \"file\" $HOME.jsonl"  # survives two shells, not expanded


def _dry(script, *args, **env):
  proc = subprocess.run([os.path.join(REPO, script), "--dry-run", *args], capture_output=True, text=True, cwd="/",
                        env={"PATH": os.environ["PATH"], **env}, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (`make test` installs "
                    "it with apt-get where apt-get is available)")
def test_the_launch_scripts_pass_shellcheck():
  proc = subprocess.run(["shellcheck", "-x", "--source-path=SCRIPTDIR", *SCRIPTS, "launch/common.sh"], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout


def test_local_dry_run_prints_the_run():
  assert _dry("launch/local.sh", "configs/sft.py:tiny", "/tmp/w", TRICKY) == [
      [".venv/bin/python", "-m", "alignment.main", "--config=configs/sft.py:tiny", "--workdir=/tmp/w", TRICKY]]


def test_slurm_dry_run_submits_itself_then_starts_one_process_per_node():
  (submit,) = _dry("launch/gpu_slurm.sh", "configs/sft.py:smollm2", "/shared/sft", TRICKY, NODES="4",
                   GPUS_PER_NODE="8", PARTITION="gpu", TIME="02:00:00")
  assert submit == ["sbatch", "--job-name=alignment", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                    "--exclusive", f"--chdir={REPO}", f"--output={REPO}/slurm-%j.out", "--partition=gpu",
                    "--time=02:00:00", f"{REPO}/launch/gpu_slurm.sh", "configs/sft.py:smollm2", "/shared/sft", TRICKY]
  (start,) = _dry("launch/gpu_slurm.sh", "configs/sft.py:smollm2", "/shared/sft", TRICKY, SLURM_JOB_ID="17")
  assert start == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "env", "ALIGNMENT_DISTRIBUTED=1",
                   f"{REPO}/.venv/bin/python", "-m", "alignment.main", "--config=configs/sft.py:smollm2",
                   "--workdir=/shared/sft", TRICKY]


def _remote(line):
  """The command an ssh line sends to every worker, split as the worker's shell splits it."""
  (command,) = [a for a in line if a.startswith("--command=")]
  return shlex.split(command[len("--command="):])


def test_tpu_pod_dry_run_creates_copies_installs_runs_and_tears_down():
  where = ["--zone=us-east5-a", "--project=p1"]
  lines = _dry("launch/tpu_pod.sh", "configs/dpo.py:smollm2", "gs://b/runs/dpo", TRICKY, TPU="pod1",
               ZONE="us-east5-a", PROJECT="p1", ACCELERATOR="v5p-32", SPOT="1", TEARDOWN="1")
  describe, create, tar, scp, install, train, delete = lines
  assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"] and describe[5] == "pod1"
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", *where, "--accelerator-type=v5p-32",
                    "--version=v2-alpha-tpuv5", "--spot"]
  assert tar[:3] == ["tar", "-czf", "/tmp/alignment-pod1.tar.gz"] and tar[-3:] == ["-C", REPO, "."]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/alignment-pod1.tar.gz", "pod1:alignment.tar.gz",
                 "--worker=all", *where]
  assert install[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--worker=all"]
  assert "make -C alignment install-tpu" in " ".join(_remote(install))
  assert _remote(train)[:2] == ["cd", "alignment"]
  assert _remote(train)[3:10] == ["ALIGNMENT_DISTRIBUTED=1", ".venv/bin/python", "-m", "alignment.main",
                                  "--config=configs/dpo.py:smollm2", "--workdir=gs://b/runs/dpo", TRICKY]
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1", *where, "--quiet"]


def test_tpu_pod_through_a_queued_resource_waits_for_it_and_deletes_it():
  lines = _dry("launch/tpu_pod.sh", "configs/grpo.py:smollm2", "gs://b/g", TPU="q1", ZONE="z", QUEUED="1")
  assert lines[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "q1", "--node-id=q1", "--zone=z",
                      "--accelerator-type=v5p-8", "--runtime-version=v2-alpha-tpuv5"]
  assert lines[2] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "q1", "--zone=z",
                      "--format=value(state.state)"]
  assert not any("delete" in line for line in lines)  # no TEARDOWN
  assert _dry("launch/tpu_pod.sh", "delete", TPU="q1", ZONE="z", QUEUED="1") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "q1", "--zone=z", "--force", "--quiet"]]


@pytest.mark.parametrize("script,env,message", [
    ("launch/local.sh", {}, "usage: launch/local.sh"),
    ("launch/gpu_slurm.sh", {}, "usage: NODES=2"),
    ("launch/tpu_pod.sh", {}, "set TPU"),
    ("launch/tpu_pod.sh", {"TPU": "a", "ZONE": "z"}, "usage: TPU=..."),
])
def test_missing_arguments_are_refused_with_the_usage(script, env, message):
  proc = subprocess.run([os.path.join(REPO, script), "--dry-run", "configs/sft.py:tiny"], capture_output=True,
                        text=True, env={"PATH": os.environ["PATH"], **env}, timeout=60)
  assert proc.returncode != 0 and proc.stdout == "" and message in proc.stderr
