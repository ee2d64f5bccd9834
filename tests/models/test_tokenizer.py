"""Tokenizers built from GGUF metadata give transformers' ids (same GGUF) on varied text."""

import random

import pytest

from alignment.models import tokenizer as tokenizer_lib
from tests.models import real_weights

FIXED = [
    "", " ", "  ", "\n", "\n\n\n", "\t\tindented", "hello world", "Hello, World!", "  leading spaces",
    "trailing spaces   ", "multiple   inner    spaces", "line1\nline2\r\nline3", "12345", "3.14159",
    "1,000,000 and 2024-05-17", "0x1F 0b1010 1e-5", "phone: +1 (555) 010-9999",
    "naïve café déjà vu", "Straße über Ärger", "日本語のテキストです。", "中文分词测试", "한국어 문장",
    "Здравствуйте, мир!", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "ελληνικά γράμματα",
    "emoji 😀🎉👍🏽 and 🇫🇷 flags", "zero\u200bwidth", "combining e\u0301 accents", "tab\there",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "SELECT * FROM users WHERE id = 42;", "<div class=\"a\">text</div>", "{\"key\": [1, 2, 3]}",
    "x = [i for i in range(10) if i % 2 == 0]", "https://example.com/path?q=1&r=2#frag",
    "user@example.com", "C:\\Windows\\System32", "$HOME/.bashrc && echo $PATH", "a" * 300,
    "The quick brown fox jumps over the lazy dog. " * 5, "ALL CAPS SENTENCE", "MiXeD cAsE",
    "don't won't it's we're they'll I'd", "end of text<|endoftext|>after", "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>user\nhello<end_of_turn>", "<bos>literal bos", "<unk><pad>", "--- *** ___ ===",
    "¿Qué? ¡Sí! «quotes» „German“ ‘single’", "1/2 ¾ ⅓ ∑∫√∞≠≤", "\u00a0non-breaking\u00a0space",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Write code:\n```python\nprint('hi')\n```"},
     {"role": "assistant", "content": "Done:  print('hi')\n\nAnything else?"},
     {"role": "user", "content": "Translate 'chat' to français, s'il vous plaît. 😀"}],
]


def varied_strings(n_random=150, seed=0):
  rng = random.Random(seed)
  alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t.,;:!?'\"()[]{}<>+-*/=_#@$%^&|~`"
              "éüßçñøåæœ日本語中文한국어Жжфыв😀🎉∑√→")
  words = ["the", "model", "token", " ", "  ", "\n", "123", "4567", "def", "return", "日本", "😀", "ing", "'s",
           "http://", "x_1", "__init__", "\t", "café", "—", "...", "!!!", "0.5", "<|im_end|>", "<eos>"]
  out = list(FIXED)
  for i in range(n_random):
    if i % 2:
      out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
    else:
      out.append("".join(rng.choice(words) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(1, 25))))
  return out


def _rendered(tok, ref_tok):
  """Chat-templated conversations (with and without a generation prompt), rendered by transformers."""
  if ref_tok.chat_template is None:  # a base model: a template-like text instead
    return ["<start_of_turn>user\n" + m[-1]["content"] + "<end_of_turn>\n<start_of_turn>model\n"
            for m in CONVERSATIONS]
  return [ref_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)
          for m in CONVERSATIONS for g in (False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_ids_match_transformers(name):
  _, tok = real_weights.ours(name)
  ref = real_weights.reference_tokenizer(name)
  texts = varied_strings() + _rendered(tok, ref)
  assert len(texts) >= 200
  mismatches = []
  for text in texts:
    ours, theirs = tok.ids(text), ref(text)["input_ids"]
    if ours != theirs:
      mismatches.append((text, ours, theirs))
  assert not mismatches, mismatches[:3]
  for text in _rendered(tok, ref):  # templated text carries its own special tokens
    assert tok.ids(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
  # Decoding: ids -> text as transformers decodes them.
  for text in texts[:120]:
    ids = ref(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.slow
def test_chat_template_renders_like_transformers():
  _, tok = real_weights.ours("smollm2-135m-instruct")
  ref = real_weights.reference_tokenizer("smollm2-135m-instruct")
  for messages in CONVERSATIONS:
    for gen in (False, True):
      assert tok.apply_chat_template(messages, add_generation_prompt=gen) == ref.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=gen)
  assert tok.eos_id == 2 and tok.bos_id == 1 and tok.eos_token == "<|im_end|>"


def test_save_and_reload_round_trip(tmp_path):
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "Ġ": 5}
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.add_special_tokens(["<s>", "</s>"])
  tok = tokenizer_lib.Tokenizer(backend, bos_id=0, eos_id=1, pad_id=1, add_bos=False,
                                chat_template="{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
  tok.save(str(tmp_path))
  again = tokenizer_lib.from_pretrained(str(tmp_path))
  assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (0, 1, 1, False)
  assert again.ids("abab") == tok.ids("abab") == [4, 4]
  assert again.apply_chat_template([{"role": "user", "content": "ab"}]) == "ab</s>"
  assert again.get_vocab_size() == 6  # forwarded to the tokenizers.Tokenizer
