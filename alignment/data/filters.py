"""Data filters applied when a dataset is prepared (`config.data.filters`): quality heuristics, exact
dedup and near-duplicate removal with MinHash LSH.

    options = filters.options_from_config(config.data.filters)      # or filters.DEFAULTS with apply=...
    splits, removed = filters.filter_splits({"train": rows, "eval": rows}, options, text=..., dedup_text=...)
    # removed == {"quality/repetition": {"train": 3, "eval": 0}, "exact_dedup": {...}, "near_dedup": {...}}

The filters run in the order `apply` names them, over the splits in order (train first), and keep the
first row of each set of duplicates: an eval row that repeats a train row is removed from eval, so the
held-out loss is not measured on training text.

Quality heuristics: too few or too many words, or too many characters that are not text (any length);
and, for texts long enough for a ratio to mean something, the rules used to clean MassiveText (Rae et
al. 2021, "Gopher"): too many symbol words ('#', '...', '…'), too few words with a letter or digit, too many
duplicated lines, one word bigram covering too much of the text.
Near duplicates are rows whose word-shingle sets have a Jaccard similarity of at least `near_threshold`:
MinHash LSH (datasketch) proposes candidates among the rows kept so far, banded so that a pair at the
threshold is missed with probability at most 1e-4, and the exact Jaccard of the two shingle sets decides.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence

from alignment.choices import check_config

QUALITY_REASONS = ("length", "symbols", "non_text", "repetition")


@dataclasses.dataclass(frozen=True)
class Options:
  apply: tuple[str, ...] = ()
  min_words: int = 1
  max_words: int = 20000
  max_non_text_char_fraction: float = 0.25  # characters neither letters, digits, spaces nor punctuation
  ratio_min_words: int = 50              # the word-ratio rules below apply to texts at least this long
  max_symbol_ratio: float = 0.1          # '#', '...' and '…' per word
  min_text_word_fraction: float = 0.8    # words with at least one letter or digit
  max_duplicate_line_fraction: float = 0.3
  max_top_bigram_fraction: float = 0.2   # characters in the most frequent word bigram, of all word characters
  near_threshold: float = 0.8            # Jaccard of word shingles
  shingle_words: int = 3
  num_perm: int = 128


DEFAULTS = Options()


def options_from_config(filters) -> Options:
  """`config.data.filters` (a ConfigDict or dict whose `apply` is a comma list) -> Options; an unknown
  filter or key is refused naming it."""
  values = dict(filters)
  known = {f.name for f in dataclasses.fields(Options)}
  for key in values:
    if key not in known:
      raise ValueError(f"config.data.filters.{key}: unknown key; keys: {', '.join(sorted(known))}")
  check_config({"data": {"filters": values}})  # the filter names, as the run checks them at start
  names = tuple(n.strip() for n in str(values.pop("apply", "")).split(",") if n.strip())
  options = Options(apply=names, **values)
  if not 0 < options.near_threshold <= 1:
    raise ValueError(f"config.data.filters.near_threshold={options.near_threshold}: expected a value in (0, 1]")
  return options


def settings(options: Options) -> tuple[str, ...]:
  """The options as strings, for a prepared dataset's fingerprint (none when nothing is applied)."""
  if not options.apply:
    return ()
  return tuple(f"filters.{k}={v}" for k, v in sorted(dataclasses.asdict(options).items()))


_WORD = re.compile(r"\S+")
_PUNCTUATION = set(".,;:!?'\"()[]-/%$&*+=<>@_`~’“”‘—–")


def quality_reason(text: str, options: Options = DEFAULTS) -> str | None:
  """Why `text` fails the quality heuristics ('length' | 'symbols' | 'non_text' | 'repetition'), or None.

  The word-ratio rules need a text long enough for a ratio to mean something (`ratio_min_words`): a short
  chat turn ('Reverse the word stone. The word stone reversed is enots.') repeats a bigram and is fine."""
  words = _WORD.findall(text)
  if not options.min_words <= len(words) <= options.max_words:
    return "length"
  odd = sum(not (c.isalnum() or c.isspace() or c in _PUNCTUATION) for c in text)
  if odd / len(text) > options.max_non_text_char_fraction:
    return "non_text"
  if len(words) < options.ratio_min_words:
    return None
  symbols = sum(w.count("#") + w.count("...") + w.count("…") for w in words)
  if symbols / len(words) > options.max_symbol_ratio:
    return "symbols"
  if sum(any(c.isalnum() for c in w) for w in words) / len(words) < options.min_text_word_fraction:
    return "non_text"
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if (len(lines) - len(set(lines))) / len(lines) > options.max_duplicate_line_fraction:
    return "repetition"
  lowered = [w.lower() for w in words]
  (first, second), count = collections.Counter(zip(lowered, lowered[1:])).most_common(1)[0]
  if count > 1 and count * (len(first) + len(second)) / sum(map(len, words)) > options.max_top_bigram_fraction:
    return "repetition"
  return None


def normalise(text: str) -> str:
  """Case-folded words without punctuation, single-spaced: what both dedups compare."""
  return " ".join(re.findall(r"\w+", text.casefold()))


def shingles(text: str, n: int) -> frozenset[str]:
  """The set of n-word shingles of the normalised text (the whole text when it has fewer words)."""
  words = normalise(text).split()
  if len(words) <= n:
    return frozenset([" ".join(words)])
  return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
  return len(a & b) / len(a | b) if a or b else 1.0


def minhash(shingle_set, num_perm: int):
  """The datasketch MinHash of a shingle set (seed fixed: the same text always hashes the same)."""
  from datasketch import MinHash
  m = MinHash(num_perm=num_perm, seed=1)
  m.update_batch([s.encode() for s in sorted(shingle_set)])
  return m


def exact_duplicate_groups(texts: Sequence[str]) -> list[int]:
  """For each text, the index of the first text with the same normalised words (its own when none)."""
  first = {}
  return [first.setdefault(normalise(t), i) for i, t in enumerate(texts)]


MAX_LSH_MISS = 1e-4


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows per band) for the LSH: the most rows per band (fewest false candidates) for which a
  pair at exactly `threshold` is missed with probability at most MAX_LSH_MISS, (1 - J^r)^b. Candidates
  are then checked by exact Jaccard, so false candidates cost time, never a wrong removal."""
  for rows in range(num_perm, 0, -1):
    bands = num_perm // rows
    if (1 - threshold**rows)**bands <= MAX_LSH_MISS:
      return bands, rows
  raise ValueError(f"num_perm={num_perm} is too few for near_threshold={threshold}")


def near_duplicate_groups(texts: Sequence[str], threshold: float, *, shingle_words: int = 3,
                          num_perm: int = 128) -> list[int]:
  """For each text, the index of the first earlier group leader whose shingle set has a Jaccard of at
  least `threshold` with its own (its own index when none: it leads a new group)."""
  from datasketch import MinHashLSH
  lsh = MinHashLSH(num_perm=num_perm, params=lsh_bands(threshold, num_perm))
  leaders, groups = {}, []
  for i, text in enumerate(texts):
    s = shingles(text, shingle_words)
    m = minhash(s, num_perm)
    matches = [j for j in lsh.query(m) if jaccard(s, leaders[j]) >= threshold]
    if matches:
      groups.append(min(matches))
    else:
      lsh.insert(i, m)
      leaders[i] = s
      groups.append(i)
  return groups


def filter_splits(splits: Mapping[str, Sequence], options: Options, *, text: Callable[[object], str],
                  dedup_text: Callable[[object], str] | None = None) -> tuple[dict, dict]:
  """({split: kept rows}, {filter: {split: rows removed}}) after the filters `options.apply` names.

  `text(row)` is what the quality heuristics read; `dedup_text(row)` (default: `text`) what the dedups
  compare. Rows keep their order; dedup state carries across the splits in the order given."""
  out = {name: list(rows) for name, rows in splits.items()}
  removed = {}
  dedup_text = dedup_text or text
  for name in options.apply:
    if name == "quality":
      for reason in QUALITY_REASONS:
        removed[f"quality/{reason}"] = {s: 0 for s in out}
      for split, rows in out.items():
        reasons = [quality_reason(text(r), options) for r in rows]
        for reason in reasons:
          if reason:
            removed[f"quality/{reason}"][split] += 1
        out[split] = [r for r, why in zip(rows, reasons) if why is None]
      continue
    names = list(out)
    texts = [dedup_text(r) for split in names for r in out[split]]
    groups = (exact_duplicate_groups(texts) if name == "exact_dedup" else
              near_duplicate_groups(texts, options.near_threshold, shingle_words=options.shingle_words,
                                    num_perm=options.num_perm))
    removed[name], start = {}, 0
    for split in names:
      rows = out[split]
      keep = [groups[start + i] == start + i for i in range(len(rows))]
      removed[name][split] = len(rows) - sum(keep)
      out[split] = [r for r, k in zip(rows, keep) if k]
      start += len(rows)
  return out, removed


def log_counts(what: str, removed: Mapping[str, Mapping[str, int]]) -> None:
  """Logs one line of what each filter removed (`what`: the data's name)."""
  if removed:
    parts = [f"{name} {sum(c.values())} ({', '.join(f'{s} {n}' for s, n in c.items())})"
             for name, c in removed.items()]
    logging.info("%s: the filters removed %s", what, "; ".join(parts))
