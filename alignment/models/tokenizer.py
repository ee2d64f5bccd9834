"""Tokenizers for the real models: built from GGUF metadata or loaded from a `tokenizer.json`.

A GGUF carries no `tokenizer.json`, only llama.cpp's vocabulary metadata. We rebuild the HF
`tokenizers` pipeline the model was trained with:
  * `tokenizer.ggml.model == 'gpt2'` (SmolLM2): byte-level BPE with the file's merges;
  * `tokenizer.ggml.model == 'llama'` (Gemma 3): SentencePiece-style BPE with byte fallback; the file
    lists no merges, so they are derived from the vocabulary in file order (Gemma's scores do not
    follow its merge order).
Control tokens become special added tokens and user-defined ones (Gemma's newline runs) plain added
tokens, so they are matched whole, as llama.cpp and transformers do.

`Tokenizer` wraps a `tokenizers.Tokenizer` with the special ids and the model's chat template.
"""

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


@dataclasses.dataclass
class Tokenizer:
  """A HF `tokenizers.Tokenizer` plus what a chat model needs around it (special ids, chat template).

  It quacks like `tokenizers.Tokenizer` (`encode(...).ids`, `decode`, `get_vocab_size`, ... are
  forwarded to `backend`), so code written for a plain tokenizer.json takes it as it is.
  `encode` adds BOS only when the model wants one (`add_bos`) and `add_special_tokens` is set; a
  chat-templated prompt already carries its special tokens: encode it with add_special_tokens=False.
  """
  backend: tokenizers.Tokenizer
  bos_id: Optional[int]
  eos_id: Optional[int]
  pad_id: Optional[int]
  add_bos: bool = False
  chat_template: Optional[str] = None

  def __getattr__(self, name):  # only called for names the dataclass does not define
    if name == "backend":
      raise AttributeError(name)
    return getattr(self.backend, name)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def bos_token(self) -> Optional[str]:
    return None if self.bos_id is None else self.backend.id_to_token(self.bos_id)

  @property
  def eos_token(self) -> Optional[str]:
    return None if self.eos_id is None else self.backend.id_to_token(self.eos_id)

  def encode(self, text: str, add_special_tokens: bool = True) -> tokenizers.Encoding:
    return self.backend.encode(text, add_special_tokens=add_special_tokens)

  def ids(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                          tokenize: bool = False, **kwargs):
    """Renders `messages` ([{'role', 'content'}]) with the model's own jinja2 chat template."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template (a base model?); pass raw text instead")
    text = _compile_template(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
    return self.ids(text, add_special_tokens=False) if tokenize else text

  def save(self, directory: str) -> None:
    """Writes tokenizer.json, tokenizer_config.json (special tokens, chat template) and
    special_tokens_map.json, which transformers' AutoTokenizer reads as they are."""
    os.makedirs(directory, exist_ok=True)
    self.backend.save(os.path.join(directory, "tokenizer.json"))
    tok = lambda i: None if i is None else self.backend.id_to_token(i)
    specials = {"bos_token": tok(self.bos_id), "eos_token": tok(self.eos_id), "pad_token": tok(self.pad_id)}
    specials = {k: v for k, v in specials.items() if v is not None}
    config = dict(specials, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=self.add_bos,
                  add_eos_token=False, clean_up_tokenization_spaces=False, model_max_length=1 << 30)
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
      json.dump(specials, f, indent=2, ensure_ascii=False)


@functools.lru_cache(maxsize=8)
def with_chat_template(tokenizer, template: str) -> Tokenizer:
  """`tokenizer` (a Tokenizer or a plain `tokenizers.Tokenizer`, e.g. tiny-random's tokenizer.json) with
  the chat template `template`, a turn ending at its `<|im_end|>` when it has one (else at its EOS)."""
  backend = tokenizer.backend if isinstance(tokenizer, Tokenizer) else tokenizer
  end = backend.token_to_id("<|im_end|>")
  eos = end if end is not None else getattr(tokenizer, "eos_id", None)
  return Tokenizer(backend, bos_id=getattr(tokenizer, "bos_id", None), eos_id=eos, pad_id=0, chat_template=template)


def _compile_template(source: str) -> jinja2.Template:
  # Sandboxed and with `raise_exception`, as HF renders chat templates.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env.globals["raise_exception"] = raise_exception
  env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
  return env.from_string(source)


# ----------------------------------------------------------------------------------------------
# From a tokenizer.json directory (HF checkpoints and our exports).


def from_pretrained(directory: str) -> Tokenizer:
  """Loads `tokenizer.json` (+ tokenizer_config.json for special tokens and chat template)."""
  backend = tokenizers.Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
  config = {}
  path = os.path.join(directory, "tokenizer_config.json")
  if os.path.exists(path):
    with open(path) as f:
      config = json.load(f)
  template = config.get("chat_template")
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if template is None and os.path.exists(jinja_path):
    with open(jinja_path) as f:
      template = f.read()
  if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
    template = {t["name"]: t["template"] for t in template}.get("default")

  def token_id(name):
    tok = config.get(name)
    if isinstance(tok, dict):
      tok = tok.get("content")
    return None if tok is None else backend.token_to_id(tok)

  # The BOS the post-processor adds decides add_bos; tokenizer_config's flag is advisory.
  bos_id = token_id("bos_token")
  probe = backend.encode("a", add_special_tokens=True).ids
  add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
  return Tokenizer(backend, bos_id=bos_id, eos_id=token_id("eos_token"), pad_id=token_id("pad_token"),
                   add_bos=add_bos, chat_template=template)


# ----------------------------------------------------------------------------------------------
# From GGUF metadata.


def from_gguf_metadata(meta: dict) -> Tokenizer:
  """`meta`: the GGUF key/value metadata as plain Python values (see `gguf.read_metadata`)."""
  kind = meta.get("tokenizer.ggml.model")
  tokens = list(meta["tokenizer.ggml.tokens"])
  token_types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  if kind == "gpt2":
    backend, tokens = _byte_level_bpe(tokens, meta["tokenizer.ggml.merges"])
  elif kind == "llama":
    backend, tokens = _sentencepiece_bpe(tokens, meta.get("tokenizer.ggml.unknown_token_id"))
  else:
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' or 'llama'")

  byte_alphabet = set(_bytes_to_unicode().values())
  control = [AddedToken(t, normalized=False, special=True)
             for t, k in zip(tokens, token_types)
             # In a byte-level vocabulary a "control" token outside the byte alphabet is mislabelled.
             if k == CONTROL and (kind != "gpt2" or set(t) <= byte_alphabet)]
  backend.add_special_tokens(control)
  vocab = backend.get_vocab(with_added_tokens=False)
  user = [AddedToken(t, normalized=False, special=False)
          for t, k in zip(tokens, token_types) if k == USER_DEFINED and t in vocab]
  backend.add_tokens(user)

  def special(key):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return None if i is None else int(i)

  bos_id = special("bos")
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos_id is not None
  if add_bos:
    bos = tokens[bos_id]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
  return Tokenizer(backend, bos_id=bos_id, eos_id=special("eos"), pad_id=special("padding"),
                   add_bos=add_bos, chat_template=meta.get("tokenizer.chat_template"))


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict:
  """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
      range(ord("\xae"), ord("\xff") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _byte_level_bpe(tokens, merges):
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in merges]
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                            end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
  # GPT-2's split regex, as transformers builds this tokenizer from a GGUF. llama.cpp's 'smollm'
  # pre-tokenizer also isolates every digit (\p{N}) first; the two differ only around numerals
  # such as ' 4567' or '¾'. We follow transformers, the reference our tests compare against.
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
  return backend, tokens


def _sentencepiece_bpe(tokens, unk_id):
  # Gemma files store tokens made only of spaces with real spaces; SentencePiece spells them '▁'.
  tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
  vocab = {t: i for i, t in enumerate(tokens)}
  backend = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=_merges_from_vocab(tokens, vocab), fuse_unk=True, byte_fallback=True,
      unk_token=None if unk_id is None else tokens[int(unk_id)], dropout=None))
  backend.normalizer = normalizers.Replace(" ", "\u2581")
  backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
  backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                       decoders.Fuse()])
  return backend, tokens


def _merges_from_vocab(tokens, vocab):
  """Every (left, right) split of a token whose halves are both tokens, ranked by the merged token's
  position in the file (earlier = merged first), ties by longer left then longer right piece, as
  transformers' `generate_merges` ranks them for Gemma files."""
  positions = {t: i for i, t in enumerate(tokens)}  # first-seen order, last index, like the reference
  ranked = []
  for token, rank in positions.items():
    local = [(token[:i], token[i:]) for i in range(1, len(token))
             if token[:i] in vocab and token[i:] in vocab]
    local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    ranked.extend((-rank, len(l), len(r), l, r) for l, r in local)
  ranked.sort(key=lambda x: x[:3], reverse=True)  # stable, so equal keys keep their order
  return [(l, r) for _, _, _, l, r in ranked]
