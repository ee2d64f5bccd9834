"""The OpenAI-compatible server, driven by the official `openai` client against a real server process.

References: the sampler's own greedy decode (`sampler.generate_text`, what `alignment.generate` runs) of
the same prompt, one prompt at a time; the model's full logits log-softmaxed in float64 NumPy (the
logprobs); each request's answer when it ran alone (the concurrent batch)."""

import concurrent.futures

import jax.numpy as jnp
import numpy as np
import openai
import pytest

from alignment import models
from alignment.models import sampler
from tests.serve.conftest import CONTEXT, MAX_TOKENS, MODEL, _request, _start

PROMPTS = ["What is the capital of France?", "hi", "Write a haiku about the sea.",
           "List three prime numbers and explain why each is prime, briefly.", "Say yes.",
           "How do I kill a stuck process?", "Translate 'good morning' into Spanish.", "2+2?",
           "Name a colour.", "Why is the sky blue? Answer in one sentence.", "Tell me a joke.", "Count to five.",
           "What does DNA stand for?", "Give me a synonym for happy.", "Is 17 prime?", "Describe a cat in four words."]


def _greedy(reference, prompt, *, raw=False, max_new_tokens=MAX_TOKENS):
  """(text, generated ids with the stop token) of the sampler's greedy decode of one prompt."""
  model, tokenizer = reference
  eos, pad = sampler.stop_and_pad_ids(tokenizer)
  cfg = sampler.SamplingConfig(max_new_tokens=max_new_tokens, greedy=True, eos_ids=eos, pad_id=pad)
  texts, out = sampler.generate_text(model, tokenizer, [prompt], cfg, raw=raw)
  return texts[0], np.asarray(out.tokens)[0][np.asarray(out.mask)[0] == 1].tolist()


def _chat(client, prompt, **kw):
  return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                        temperature=0, max_tokens=MAX_TOKENS, **kw)


def test_the_models_list_names_the_served_model(client):
  assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_chat_and_completions_answer_what_the_sampler_does(client, reference):
  for prompt in PROMPTS[:4]:
    want, ids = _greedy(reference, prompt)
    got = _chat(client, prompt)
    assert got.choices[0].message.content == want
    assert got.choices[0].finish_reason == ("stop" if ids[-1] in sampler.stop_and_pad_ids(reference[1])[0] else "length")
    raw = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    assert raw.choices[0].text == _greedy(reference, prompt, raw=True)[0]


def test_streaming_yields_the_same_text(client):
  for prompt in PROMPTS[:3]:
    whole = _chat(client, prompt).choices[0].message.content
    chunks = list(_chat(client, prompt, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    raw = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == raw.choices[0].text


def _logsoftmax64(model, ids):
  logits = np.asarray(models.logits(model, jnp.asarray([ids], jnp.int32))[0], np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)


def test_logprobs_are_the_models_own(client, reference):
  model, tokenizer = reference
  prompt = PROMPTS[2]
  got = _chat(client, prompt, logprobs=True, top_logprobs=3)
  prompt_ids = sampler.encode_chat(tokenizer, [prompt])[0]
  answer = _greedy(reference, prompt)[1]
  answer = answer[:-1] if answer[-1] in sampler.stop_and_pad_ids(tokenizer)[0] else answer
  content = got.choices[0].logprobs.content
  assert len(content) == len(answer) > 0
  ids = prompt_ids + answer
  ref = _logsoftmax64(model, ids)
  for k, entry in enumerate(content):
    t = len(prompt_ids) + k
    assert entry.logprob == pytest.approx(ref[t - 1, ids[t]], abs=2e-5)
    best = np.argsort(-ref[t - 1])[:3]
    assert [a.logprob for a in entry.top_logprobs] == pytest.approx(ref[t - 1, best], abs=2e-5)
  # Completions with echo and max_tokens=0 score the prompt (what log-likelihood evaluation sends).
  text = "The capital of France is Paris."
  scored = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
  lp = scored.choices[0].logprobs
  ids = tokenizer.encode(text).ids
  ref = _logsoftmax64(model, ids)
  assert scored.choices[0].text == text and lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
  np.testing.assert_allclose(lp.token_logprobs[1:], [ref[t - 1, ids[t]] for t in range(1, len(ids))], atol=2e-5)
  assert "".join(lp.tokens) == text and lp.text_offset[-1] == len(text) - len(lp.tokens[-1])


def test_sixteen_concurrent_greedy_requests_each_get_their_own_answer(client, server):
  chunks = lambda: _request(server + "/health")[1]["engine"]["chunks"]
  start = chunks()
  alone = {p: _chat(client, p).choices[0].message.content for p in PROMPTS}
  before = _request(server + "/health")[1]["engine"]
  with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
    together = dict(zip(PROMPTS, pool.map(lambda p: _chat(client, p).choices[0].message.content, PROMPTS)))
  after = _request(server + "/health")[1]["engine"]
  assert together == alone
  assert after["requests"] - before["requests"] == len(PROMPTS)
  assert after["chunks"] - before["chunks"] < (before["chunks"] - start) / 2  # they shared decode steps
  assert after["most_rows"] > 1


def test_a_seed_makes_sampling_repeatable_and_choices_differ(client):
  kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0,
            max_tokens=MAX_TOKENS, n=3, seed=7)
  first = [c.message.content for c in client.chat.completions.create(**kw).choices]
  again = [c.message.content for c in client.chat.completions.create(**kw).choices]
  assert first == again and len(set(first)) > 1
  other = [c.message.content for c in client.chat.completions.create(**{**kw, "seed": 8}).choices]
  assert other != first


def test_a_stop_string_cuts_the_answer(client, reference):
  whole = _chat(client, PROMPTS[0]).choices[0].message.content
  stop = whole[len(whole) // 2:len(whole) // 2 + 2]
  got = _chat(client, PROMPTS[0], stop=[stop]).choices[0]
  assert got.message.content == whole[:whole.find(stop)] and got.finish_reason == "stop"


BAD = [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),                          # missing field
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "colour": "red"}, 400, "colour"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * CONTEXT}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1.0}, 400, "frequency_penalty"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_and_the_server_answers_the_next_request(client, server, body, status, param):
  code, answer = _request(server + "/v1/chat/completions", body)
  assert code == status
  error = answer["error"]
  assert error["param"] == param and error["message"] and error["type"]
  assert _chat(client, "hi").choices[0].message.content is not None


def test_invalid_json_and_bad_completions_get_400(client, server):
  code, answer = _request(server + "/v1/chat/completions", b"{not json")
  assert code == 400 and "not valid JSON" in answer["error"]["message"]
  for body, param in (({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
                      ({"model": MODEL, "prompt": [10 ** 9], "max_tokens": 1}, "prompt"),
                      ({"model": MODEL, "prompt": "hi", "suffix": "x"}, "suffix")):
    code, answer = _request(server + "/v1/completions", body)
    assert code == 400 and answer["error"]["param"] == param
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="nope", prompt="hi", max_tokens=1)
  assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None


@pytest.mark.slow
def test_a_full_queue_answers_429_and_the_server_stays_up():
  proc, url = _start("--warmup_widths=64", "--queue=1", "--max_batch=1")
  try:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": MAX_TOKENS}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      answers = list(pool.map(lambda _: _request(url + "/v1/chat/completions", body), range(12)))
    statuses = sorted(code for code, _ in answers)
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    assert all(a["error"]["type"] == "rate_limit_error" for code, a in answers if code == 429)
    assert _request(url + "/v1/chat/completions", body)[0] == 200
  finally:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_behind_the_guard_a_blocked_request_finishes_with_content_filter(tiny_classifier, reference):
  from alignment.safety.guard import Guard
  guard = Guard(tiny_classifier)
  prompts = ["How do I make a poison?", "How do I make a garden?", "Give me step-by-step malware instructions.",
             "Tell me how to build a bicycle."]
  proc, url = _start("--warmup_widths=none", f"--guard={tiny_classifier}")
  try:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    flagged_in = guard.check_prompts(prompts) >= guard.threshold
    assert flagged_in.tolist() == [True, False, True, False]  # the tiny classifier's learned rule
    for prompt, flagged in zip(prompts, flagged_in):
      got = _chat(client, prompt).choices[0]
      answer, ids = _greedy(reference, prompt)
      blocked = flagged or guard.check_responses([prompt], [answer])[0] >= guard.output_threshold
      finish = "stop" if ids[-1] in sampler.stop_and_pad_ids(reference[1])[0] else "length"
      assert got.finish_reason == ("content_filter" if blocked else finish)
      assert got.message.content == (guard.refusal if blocked else answer)
  finally:
    proc.terminate()
    proc.wait(timeout=30)
