"""Chat templates and assistant-only tokenization.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}` dicts. It is
rendered with the model's own Jinja chat template exactly the way `transformers` renders one
(`apply_chat_template`), tokenized with HF `tokenizers`, and given a loss mask that is 1 only on what
the model must learn to generate: each assistant turn's content and the end-of-turn token that
closes it (`<|im_end|>` for ChatML). System, user and template tokens (role headers, the newline after
`<|im_end|>`, an injected default system prompt) carry no loss.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

ASSETS = pathlib.Path(__file__).parent / "assets"
CHATML_TEMPLATE_PATH = ASSETS / "chatml_template.jinja"  # SmolLM2-135M-Instruct's own template.
TINY_TOKENIZER_PATH = ASSETS / "tiny_tokenizer.json"  # 512-token byte-level BPE for tests.

ROLES = ("system", "user", "assistant")


def load_tokenizer(path: str | pathlib.Path = TINY_TOKENIZER_PATH) -> tokenizers.Tokenizer:
  """Loads a HF `tokenizer.json`."""
  return tokenizers.Tokenizer.from_file(str(path))


def load_template(path: str | pathlib.Path = CHATML_TEMPLATE_PATH) -> str:
  """Returns the text of a Jinja chat template file (default: SmolLM2's ChatML template)."""
  return pathlib.Path(path).read_text(encoding="utf-8")


def prompt_completion_to_messages(prompt: str, completion: str) -> list[dict[str, str]]:
  """A `{"prompt", "completion"}` row is a one-turn conversation: [user: prompt, assistant: completion]."""
  return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


# ----------------------------------------------------------------------------------------------
# Rendering, as transformers does it (transformers/utils/chat_template_utils.py).


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers overrides jinja's tojson, which would HTML-escape its output.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
  return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
  """Compiles a chat template in transformers' sandboxed environment (cached per template text)."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True,
                                      lstrip_blocks=True,
                                      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(template)


def render_chat(template: str,
                messages: Sequence[Mapping[str, str]],
                *,
                add_generation_prompt: bool = False,
                bos_token: str = "",
                eos_token: str = "",
                **template_kwargs) -> str:
  """Renders `messages` with a Jinja chat template, as `tokenizer.apply_chat_template(tokenize=False)`.

    `bos_token`/`eos_token` are the strings transformers passes from the tokenizer's special tokens
    (the ChatML template uses neither; Gemma's starts with `{{ bos_token }}`).
    """
  return compile_template(template).render(messages=[dict(m) for m in messages],
                                           add_generation_prompt=add_generation_prompt,
                                           bos_token=bos_token,
                                           eos_token=eos_token,
                                           **template_kwargs)


# ----------------------------------------------------------------------------------------------
# Assistant-only tokenization.


def _special_tokens(tokenizer: tokenizers.Tokenizer) -> tuple[str, ...]:
  tokens = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
  return tuple(sorted(tokens, key=len, reverse=True))  # Longest first, for prefix matching.


def assistant_spans(messages: Sequence[Mapping[str, str]],
                    template: str,
                    *,
                    special_tokens: Sequence[str] = (),
                    bos_token: str = "",
                    eos_token: str = "",
                    **template_kwargs) -> tuple[str, list[tuple[int, int]]]:
  """Renders the conversation and finds, in characters, what each assistant turn must generate.

    Returns `(text, spans)`: `text` is the full render (no generation prompt) and `spans` holds one
    `(start, end)` per assistant turn covering its content plus the special token that directly
    follows it in the render (the end-of-turn token, `<|im_end|>` for ChatML).

    The spans are found by rendering the conversation prefix by prefix: for assistant turn i, the
    render of `messages[:i]` with a generation prompt must be a prefix of the render of
    `messages[:i+1]`, which must be a prefix of the full render; the content is then located right
    after the generation prompt. A template for which this does not hold (one that rewrites earlier
    turns depending on later ones) raises a ValueError.
    """
  kw = dict(bos_token=bos_token, eos_token=eos_token, **template_kwargs)
  text = render_chat(template, messages, **kw)
  spans = []
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    before = render_chat(template, messages[:i], add_generation_prompt=True, **kw)
    upto = render_chat(template, messages[:i + 1], **kw)
    if not upto.startswith(before) or not text.startswith(upto):
      raise ValueError(
          f"chat template is not prefix-stable at message {i} (assistant): the render of the "
          f"first {i} messages plus the generation prompt is not a prefix of the render of the "
          f"first {i + 1}, or that is not a prefix of the full render; assistant tokens cannot "
          f"be located. Prefix: {before[-80:]!r}, turn render: {upto[max(0, len(before) - 80):][:160]!r}")
    content = message["content"]
    start = upto.find(content, len(before))
    if start < 0:
      raise ValueError(f"assistant content of message {i} does not appear verbatim in its render after the "
                       f"generation prompt (does the template rewrite it?): {content[:80]!r}")
    end = start + len(content)
    rest = upto[end:]
    for tok in special_tokens:
      if rest.startswith(tok):
        end += len(tok)
        break
    spans.append((start, end))
  return text, spans


def tokenize_conversation(messages: Sequence[Mapping[str, str]],
                          tokenizer: tokenizers.Tokenizer,
                          template: str,
                          *,
                          strict: bool = False,
                          last_turn_only: bool = False,
                          bos_token: str = "",
                          eos_token: str = "",
                          **template_kwargs) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes a conversation with an assistant-only loss mask.

    Returns `(ids, loss_mask)`, both int32 [L]: `ids` is exactly `tokenizer.encode(render).ids` of
    the full render (no special tokens added beyond what the template writes); `loss_mask[t] = 1` iff
    token t belongs to an assistant turn's content or is the end-of-turn token right after it.

    The render is cut at the assistant span boundaries, each piece tokenized on its own, and the
    concatenation checked against the tokenization of the full render; when they agree (the usual
    case) the pieces give the mask exactly. They disagree when a token crosses a boundary (e.g.
    assistant content starting with a newline merges with the header's newline): then `strict=True`
    raises a ValueError naming the place, and `strict=False` marks every token of the full
    tokenization whose characters overlap an assistant span (the crossing token gets loss 1).

    `last_turn_only=True` masks only the final assistant turn (a preference pair's completion:
    earlier assistant turns belong to its prompt).
    """
  text, spans = assistant_spans(messages,
                                template,
                                special_tokens=_special_tokens(tokenizer),
                                bos_token=bos_token,
                                eos_token=eos_token,
                                **template_kwargs)
  if last_turn_only:
    spans = spans[-1:]
  encoding = tokenizer.encode(text, add_special_tokens=False)
  full = encoding.ids
  ids, mask = [], []
  cursor = 0
  pieces = []
  for start, end in spans:
    pieces += [(text[cursor:start], 0), (text[start:end], 1)]
    cursor = end
  pieces.append((text[cursor:], 0))
  for piece, loss in pieces:
    if piece:
      piece_ids = tokenizer.encode(piece, add_special_tokens=False).ids
      ids += piece_ids
      mask += [loss] * len(piece_ids)
  if ids != full:
    if strict:
      k = next((k for k, (a, b) in enumerate(zip(ids, full)) if a != b), min(len(ids), len(full)))
      raise ValueError(f"tokenizing the conversation piece by piece differs from tokenizing its full render "
                       f"at token {k}: a token crosses an assistant turn boundary (e.g. content starting "
                       f"with whitespace that merges with the header); near "
                       f"{tokenizer.decode(full[max(0, k - 5):k + 5], skip_special_tokens=False)!r}")
    ids = full
    mask = [
        int(any(s < tok_end and tok_start < e for s, e in spans)) for tok_start, tok_end in encoding.offsets
    ]
  return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
