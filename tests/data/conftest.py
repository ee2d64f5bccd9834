import json
import pathlib

import pytest

from alignment.data import chat

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
MESSAGES_JSONL = FIXTURES / "sft_messages.jsonl"
PROMPT_COMPLETION_JSONL = FIXTURES / "sft_prompt_completion.jsonl"


def read_rows(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def tokenizer():
  return chat.load_tokenizer()


@pytest.fixture(scope="session")
def template():
  return chat.load_template()


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
  """The messages fixture prepared as TFDS array_record, with a 10% held-out eval split."""
  from alignment.data import sft
  return sft.prepare_sft(MESSAGES_JSONL, data_dir=tmp_path_factory.mktemp("tfds"), eval_fraction=0.1)


PREF_GENERIC_JSONL = FIXTURES / "pref_generic.jsonl"
PREF_HH_JSONL = FIXTURES / "pref_hh.jsonl"
PREF_ULTRAFEEDBACK_JSONL = FIXTURES / "pref_ultrafeedback.jsonl"


@pytest.fixture(scope="session")
def pref_sources(tmp_path_factory):
  """The generic preference fixture prepared as TFDS array_record, 20% of its prompts held out."""
  from alignment.data import preference
  return preference.prepare_preferences(PREF_GENERIC_JSONL,
                                        data_dir=tmp_path_factory.mktemp("pref_tfds"),
                                        eval_fraction=0.2)
