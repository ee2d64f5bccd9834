"""HF safetensors checkpoints in (tiny random ones written by transformers) and export out."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from alignment import models
from alignment.models import hf
from tests.models import real_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def _exact_matmuls():
  import jax
  with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
    yield


def _tiny(kind, tied):
  torch.manual_seed({"llama": 0, "qwen2": 1, "gemma3": 2}[kind])
  if kind == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, rope_theta=5000.0,
                                                                    tie_word_embeddings=tied))
  elif kind == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=tied))
  else:
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **COMMON, sliding_window=4, query_pre_attn_scalar=10, tie_word_embeddings=tied))
  with torch.no_grad():  # random everything, norms and biases included, so no layout slip hides
    for p in model.parameters():
      p.normal_(0.0, 0.15)
  return model.float().eval()


def _ref_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


IDS = [5, 17, 3, 88, 42, 42, 9, 60, 1, 33, 71, 2, 14, 96, 50, 7]  # past the window of 4


@pytest.mark.parametrize("kind,tied,sharded", [("llama", True, False), ("llama", False, True),
                                               ("qwen2", False, False), ("qwen2", True, True),
                                               ("gemma3", True, False), ("gemma3", False, True)])
def test_load_tiny_checkpoint_matches_transformers(tmp_path, kind, tied, sharded):
  ref = _tiny(kind, tied)
  ref.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == sharded
  model, tok = models.load(str(tmp_path))
  assert tok is None
  ours = np.asarray(models.logits(model, jnp.asarray([IDS])))[0]
  np.testing.assert_allclose(ours, _ref_logits(ref, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, kind):
  ref = _tiny(kind, tied=kind != "qwen2")
  ref.save_pretrained(tmp_path / "in")
  model, _ = models.load(str(tmp_path / "in"))
  hf.export(model, None, str(tmp_path / "out"))
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
  ours = np.asarray(models.logits(model, jnp.asarray([IDS])))[0]
  np.testing.assert_allclose(_ref_logits(again, IDS), ours, atol=1e-4, rtol=0)
  # and back in: the exported directory is an input like any other
  model2, _ = models.load(str(tmp_path / "out"))
  np.testing.assert_allclose(np.asarray(models.logits(model2, jnp.asarray([IDS])))[0], ours, atol=1e-6)


def test_load_bfloat16_checkpoint(tmp_path):
  ref = _tiny("llama", tied=True).to(torch.bfloat16)
  ref.save_pretrained(tmp_path)
  model, _ = models.load(str(tmp_path))  # float32 params holding the bf16 values exactly
  ours = np.asarray(models.logits(model, jnp.asarray([IDS])))[0]
  np.testing.assert_allclose(ours, _ref_logits(ref.float(), IDS), atol=1e-4, rtol=0)


def test_config_mapping_errors_name_the_field():
  with pytest.raises(ValueError, match="model_type='mistral'"):
    hf.model_config({"model_type": "mistral", "num_attention_heads": 4, "vocab_size": 8, "hidden_size": 8,
                     "num_hidden_layers": 1, "intermediate_size": 8})
  with pytest.raises(ValueError, match="RoPE scaling"):
    hf.model_config(dict(COMMON, model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 1.0}))


@pytest.mark.slow
def test_smollm2_export_round_trip_in_transformers(tmp_path):
  model, tok = real_weights.ours("smollm2-135m-instruct")
  hf.export(model, tok, str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["model_type"] == "llama"
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  text = ref_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
  ids = ref_tok(text, add_special_tokens=False)["input_ids"]
  assert ids == tok.ids(text, add_special_tokens=False)
  assert text == tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True)
  ours = np.asarray(models.logits(model, jnp.asarray([ids])))[0]
  theirs = _ref_logits(again, ids)
  assert np.abs(ours - theirs).max() < 2e-4
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


RULES = (("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv", None), ("mlp", "tensor"),
         ("layers", None))


def test_load_into_sharded_arrays(tmp_path):
  import jax
  from jax.sharding import AxisType
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py asks for 8 fake CPU devices)")
  ref = _tiny("llama", tied=False)
  ref.save_pretrained(tmp_path)
  mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  model, _ = hf.load_dir(str(tmp_path), mesh=mesh, rules=RULES)
  q = model.layers.attn.q[...]
  assert q.sharding.mesh.shape == mesh.shape and len(q.sharding.device_set) == 4
  assert not q.sharding.is_fully_replicated
  ours = np.asarray(models.logits(model, jnp.asarray([IDS])))[0]
  np.testing.assert_allclose(ours, _ref_logits(ref, IDS), atol=1e-4, rtol=0)
