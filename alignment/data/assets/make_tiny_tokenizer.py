"""Trains `tiny_tokenizer.json`: a 512-token byte-level BPE for tests and the 'tiny-random' model.

    python alignment/data/assets/make_tiny_tokenizer.py

Specials `<|endoftext|>`=0, `<|im_start|>`=1, `<|im_end|>`=2 (SmolLM2's ids), then the 256 byte
symbols, then merges learned on the SFT fixtures rendered with SmolLM2's ChatML template (so role
headers and the default system prompt tokenize compactly). Deterministic: the same fixtures give a
byte-identical file.
"""

import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
FIXTURES = [REPO / "tests/fixtures/sft_messages.jsonl", REPO / "tests/fixtures/sft_prompt_completion.jsonl"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512


def training_texts():
  import sys
  sys.path.insert(0, str(REPO))
  from alignment.data.chat import load_template, prompt_completion_to_messages, render_chat
  template = load_template(HERE / "chatml_template.jinja")
  for path in FIXTURES:
    for line in path.read_text(encoding="utf-8").splitlines():
      row = json.loads(line)
      messages = row.get("messages") or prompt_completion_to_messages(row["prompt"], row["completion"])
      text = render_chat(template, messages)
      for special in SPECIALS:  # Specials are whole tokens; learn merges on the text between.
        text = text.replace(special, "\n")
      yield text


def main(out=HERE / "tiny_tokenizer.json"):
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE,
                                special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                min_frequency=2,
                                show_progress=False)
  tokenizer.train_from_iterator(list(training_texts()), trainer=trainer)
  for i, special in enumerate(SPECIALS):
    assert tokenizer.token_to_id(special) == i, (special, tokenizer.token_to_id(special))
  assert tokenizer.get_vocab_size() <= VOCAB_SIZE, tokenizer.get_vocab_size()
  tokenizer.save(str(out), pretty=True)


if __name__ == "__main__":
  main()
