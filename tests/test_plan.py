"""alignment.plan against what XLA compiles: the train step the loop builds, lowered on this machine's 8 CPU
devices, and its `memory_analysis()` (bytes a device) and `cost_analysis()` (FLOPs a device).

Params and optimizer state are the step's arguments (less the batch) and must match to the byte. Gradients
and activations are its temporaries; the planner models them (alignment/plan.py) and must come within 20%
of them, and its total within 20% of arguments + temporaries. FLOPs are compared on unrolled layers:
`cost_analysis` counts a scanned loop's body once."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from alignment import plan
from alignment.parallel import batch_sharding, make_mesh, replicated
from alignment.train import sft
from alignment.train import state as state_lib
from alignment.train.model import _module
from alignment.train.optim import model_optimizer
from alignment.train.step import make_train_step
from configs import sft as sft_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def _config(preset, **overrides):
  config = sft_config.get_config(preset)
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def _compiled(config):
  """The SFT train step as alignment.train.loop builds it, compiled for abstract inputs; and the batch's
  bytes a device."""
  mesh = make_mesh(config.mesh)
  cfg = plan.model_config(config.model.name, config.model)
  spec = state_lib.model_spec(_module(cfg, False))
  parts = {"policy": state_lib.Part(spec, None, model_optimizer(config))}
  shardings = state_lib.state_shardings(parts, mesh, tuple(tuple(r) for r in config.sharding.rules))
  shape = (config.train.batch_size, config.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, 2)) for k in FEATURES}
  with jax.set_mesh(mesh):
    step = jax.jit(make_train_step(sft.make_loss_fn(spec.graphdef, config.kernel.impl), state_lib.trained(parts),
                                   config.optim.grad_accum_steps, "num_tokens"),
                   in_shardings=(shardings, {k: batch_sharding(mesh, 2) for k in FEATURES}),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
    compiled = step.lower(state_lib.abstract_state(parts, shardings), batch).compile()
  batch_bytes = len(FEATURES) * 4 * shape[0] * shape[1] // (mesh.shape["data"] * mesh.shape["fsdp"])
  return compiled, batch_bytes


def _assert_memory_matches(config):
  compiled, batch_bytes = _compiled(config)
  measured = compiled.memory_analysis()
  p = plan.plan(config)
  assert p["devices"] == 8
  assert p["params_bytes"] + p["optimizer_bytes"] == measured.argument_size_in_bytes - batch_bytes
  temporaries = p["gradients_bytes"] + p["activations_bytes"]
  assert abs(temporaries / measured.temp_size_in_bytes - 1) <= 0.2, (temporaries, measured.temp_size_in_bytes)
  total = measured.argument_size_in_bytes + measured.temp_size_in_bytes
  assert abs(p["total_bytes"] / total - 1) <= 0.2, (p["total_bytes"], total)


@pytest.mark.parametrize("overrides", [
    {},  # the tiny preset: 8 rows of 128 tokens over data=8, remat all_dots
    dict(mesh__data=2, mesh__fsdp=4, train__batch_size=16, data__seq_len=256, model__remat="none"),
    dict(mesh__data=4, mesh__tensor=2, model__remat="full"),
    dict(mesh__data=1, mesh__fsdp=8, data__seq_len=512, model__remat="dots"),
    dict(train__batch_size=32, optim__grad_accum_steps=4),
], ids=["preset", "fsdp-none", "tensor-full", "fsdp8-dots-512", "accumulate"])
def test_tiny_memory_within_20_percent_of_the_compiled_step(overrides):
  _assert_memory_matches(_config("tiny", **overrides))


@pytest.mark.slow
def test_smollm2_preset_memory_within_20_percent_of_the_compiled_step():
  _assert_memory_matches(_config("smollm2"))  # 8 rows of 512 tokens, float32, over data=8


def test_flops_within_20_percent_of_the_compiled_step():
  config = _config("tiny", model__scan_layers=False, data__seq_len=256)
  compiled, _ = _compiled(config)
  got = plan.plan(config)["flops_per_device"]
  assert abs(got / compiled.cost_analysis()["flops"] - 1) <= 0.2


@pytest.mark.parametrize("size, params", [("1B", 1_235_814_400), ("8B", 8_030_261_248)])
def test_named_sizes_have_their_published_parameter_counts(size, params):
  config = _config("tiny", mesh__data=1)
  p = plan.plan(config, model=size, devices=1)
  assert p["params_bytes"] == 4 * params  # float32
  assert 0 < p["optimizer_bytes"] - 2 * 4 * params < 64  # Adam's two moments; counters and the rng key


def test_the_command_plans_8b_on_a_pod_and_refuses_bad_input():
  base = [sys.executable, "-m", "alignment.plan", "--config=configs/sft.py:smollm2"]
  run = lambda *args: subprocess.run(base + list(args), cwd=REPO, capture_output=True, text=True, timeout=300)
  pod = ("--model=8B", "--devices=64", "--config.train.batch_size=64", "--config.model.dtype=bfloat16",
         "--config.model.param_dtype=bfloat16", "--config.model.remat=full", "--chip=v5e")
  fsdp = ("--config.mesh.data=8", "--config.mesh.fsdp=8")
  out = run(*pod, *fsdp, "--json")
  assert out.returncode == 0, out.stderr[-2000:]
  p = json.loads(out.stdout)
  assert p["mesh"] == {"data": 8, "fsdp": 8, "tensor": 1} and p["micro_rows_per_device"] == 1
  assert p["params_bytes"] == pytest.approx(2 * 8_030_261_248 / 8, rel=0.01)  # bf16, cut over fsdp=8
  assert p["fits"] is True and p["total_bytes"] < p["chip_memory_bytes"]
  text = run(*pod, *fsdp)
  assert text.returncode == 0 and "on v5e (16 GiB): fits" in text.stdout
  # Unsharded, each device holds 8B bf16 params (15 GiB), their gradients and two Adam moments: no v5e holds that.
  no_fsdp = json.loads(run(*pod, "--config.mesh.data=64", "--json").stdout)
  assert no_fsdp["fits"] is False and no_fsdp["params_bytes"] == 2 * 8_030_261_248

  bad = run("--chip=v9")
  assert bad.returncode == 2 and bad.stderr == "error: --chip='v9'; expected one of v5e, v5p, H100\n"


@pytest.mark.parametrize("kwargs, overrides, message", [
    (dict(model="70B"), {}, "--model='70B': not a named size (1B, 8B)"),
    ({}, dict(train__batch_size=12), "config.train.batch_size=12 must be divisible by data x fsdp (8)"),
    (dict(devices=6), dict(mesh__data=4), "config.mesh {'data': 4, 'fsdp': 1, 'tensor': 1} needs 4 devices; the plan has 6"),
    ({}, dict(train__algorithm="kto"), "config.algorithm='kto': the planner knows sft, rm, dpo, grpo, ppo"),
])
def test_bad_input_is_named(kwargs, overrides, message):
  config = _config("tiny", **{k: v for k, v in overrides.items() if not k.startswith("train__algorithm")})
  if "train__algorithm" in overrides:
    config.algorithm = overrides["train__algorithm"]
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    plan.plan(config, **kwargs)


def test_each_algorithm_counts_the_models_its_step_holds():
  from configs import dpo as dpo_config
  from configs import ppo as ppo_config
  sft = plan.plan(_config("tiny"))
  dpo = plan.plan(dpo_config.get_config("tiny"))
  ppo = plan.plan(ppo_config.get_config("tiny"))
  assert sft["parts"] == ["policy"] and dpo["parts"] == ["policy", "ref"] and ppo["parts"] == ["policy", "ref", "value"]
  assert dpo["params_bytes"] == 2 * sft["params_bytes"] and dpo["optimizer_bytes"] == sft["optimizer_bytes"]
  assert ppo["gradients_bytes"] > 1.9 * sft["gradients_bytes"]  # the value model trains too


def test_a_workdir_plans_the_model_its_run_trained(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"algorithm": "sft", "model": {"name": "smollm2-135m"}}))
  config = _config("tiny")
  assert plan.plan(config, model=str(workdir))["params_bytes"] == plan.plan(config, model="smollm2-135m")["params_bytes"]
