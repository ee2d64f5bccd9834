"""The OpenAI API over the engine: /v1/models, /v1/chat/completions, /v1/completions and /health.

    app = make_app(engine, model_name="smollm2-135m-instruct", guard=None, timeout_s=120)

Requests are validated against the fields OpenAI documents; a field this server does not know, a
missing one, a bad value or a prompt over the context is answered with OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) and a 4xx status, and the server goes on serving.
A full queue answers 429; a request still waiting after `timeout_s` answers 503.

Sampling: temperature 0 is greedy; otherwise each choice draws with its own temperature, top-p and seed
(`seed` makes a request's draws repeatable). `logprobs` are the model's own log-probabilities (at
temperature 1, as the trainer computes them) of the returned tokens, scored by teacher forcing.
`stream` sends the answer as server-sent events, one chunk per token, once its batch has finished.
With a Guard, a prompt its input check flags and a response its output check flags are replaced by the
Guard's refusal, with `finish_reason: "content_filter"`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from alignment.models import sampler
from alignment.serve.engine import Engine, QueueFull, RowSettings

MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ChatMessage(_Strict):
  role: Literal["system", "user", "assistant"]
  content: Union[str, list[TextPart]]
  name: Optional[str] = None


class StreamOptions(_Strict):
  include_usage: bool = False


class _Sampling(_Strict):
  model: str
  n: int = Field(1, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  stop: Union[str, list[str], None] = None
  seed: Optional[int] = None
  stream: bool = False
  stream_options: Optional[StreamOptions] = None
  frequency_penalty: float = 0.0
  presence_penalty: float = 0.0
  user: Optional[str] = None


class ChatRequest(_Sampling):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: Optional[int] = Field(None, ge=1)
  max_completion_tokens: Optional[int] = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Sampling):
  prompt: Union[str, list[str], list[int], list[list[int]]]
  max_tokens: int = Field(16, ge=0)
  logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
  echo: bool = False
  best_of: Optional[int] = Field(None, ge=1)


class TokenizeRequest(_Strict):
  prompt: Optional[str] = None
  messages: Optional[list[ChatMessage]] = None
  add_special_tokens: bool = True
  add_generation_prompt: bool = True
  model: Optional[str] = None


class DetokenizeRequest(_Strict):
  tokens: list[int]
  model: Optional[str] = None


class ApiError(Exception):

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

  def response(self) -> JSONResponse:
    return JSONResponse(status_code=self.status, content={"error": {
        "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


def _validation_error(exc: RequestValidationError) -> ApiError:
  first = exc.errors()[0]
  loc = [str(x) for x in first.get("loc", ()) if x != "body"]
  param = ".".join(loc) or None
  kind = first.get("type", "")
  if kind == "json_invalid":
    return ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})")
  if kind == "extra_forbidden":
    return ApiError(400, f"unknown field '{param}'", param, "unknown_field")
  if kind == "missing":
    return ApiError(400, f"missing required field '{param}'", param, "missing_field")
  return ApiError(400, f"'{param}': {first.get('msg')}", param, "invalid_value")


def _stops(stop) -> list[str]:
  stops = [stop] if isinstance(stop, str) else list(stop or [])
  if len(stops) > 4 or any(not s for s in stops):
    raise ApiError(400, "'stop': up to 4 non-empty strings", "stop")
  return stops


def _check_unsupported(req: _Sampling):
  for name in ("frequency_penalty", "presence_penalty"):
    if getattr(req, name) != 0:
      raise ApiError(400, f"'{name}' is not supported by this server (only 0)", name, "unsupported_value")


class _Choice:
  """One generated choice: token ids, their text, why it ended and the end-of-turn token that ended it
  (which the text leaves out and the completions' logprobs list, as vLLM's do)."""

  def __init__(self, tokenizer, ids, finish_reason, stops, stop_token=None):
    self.ids, self.finish_reason, self.stop_token = list(ids), finish_reason, stop_token
    self.text = tokenizer.decode(self.ids)
    cut = min((i for i in (self.text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:  # cut at the first stop string; keep the tokens the kept text needs
      self.text, self.finish_reason, self.stop_token = self.text[:cut], "stop", None
      while self.ids and len(tokenizer.decode(self.ids[:-1])) >= cut:
        self.ids.pop()


def _token_text(tokenizer, token_id: int) -> str:
  return tokenizer.decode([int(token_id)], skip_special_tokens=False)


def make_app(engine: Engine, *, model_name: str, guard=None, timeout_s: float = 120.0) -> FastAPI:
  app = FastAPI(title="alignment OpenAI-compatible server")
  tokenizer = engine.policy.tokenizer
  created = int(time.time())

  @app.exception_handler(RequestValidationError)
  async def _on_invalid(request, exc):
    return _validation_error(exc).response()

  @app.exception_handler(ApiError)
  async def _on_api_error(request, exc):
    return exc.response()

  def check_model(name: str):
    if name != model_name:
      raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_name}'", "model",
                     "model_not_found")

  def settings(req: _Sampling) -> RowSettings:
    return RowSettings(greedy=req.temperature == 0.0, temperature=req.temperature or 1.0, top_p=req.top_p,
                       seed=req.seed)

  async def run(prompt_ids, n, max_tokens, row_settings):
    try:
      future = engine.submit(prompt_ids, n=n, max_tokens=max_tokens, settings=row_settings)
    except QueueFull as e:
      raise ApiError(429, str(e), None, "queue_full", "rate_limit_error") from None
    except ValueError as e:  # the engine names what it refused first: n=..., max_tokens=..., or the prompt
      param = str(e).split("=", 1)[0] if str(e).startswith(("n=", "max_tokens=")) else "max_tokens"
      raise ApiError(400, str(e), param, "invalid_value") from None
    try:
      return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
    except asyncio.TimeoutError:
      future.cancel()
      raise ApiError(503, f"the request waited longer than {timeout_s:g}s; retry later", None, "timeout",
                     "server_error") from None

  def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

  @app.get("/health")
  async def health():
    """Up; with what the engine has run (requests, rows, decode chunks, the most rows decoded side by side)."""
    return {"status": "ok", "engine": dict(engine.stats)}

  @app.get("/")
  @app.get("/v1")
  async def root():
    return {"status": "ok", "models": [model_name]}

  # -- the tokenizer (vLLM's endpoints, which lm-evaluation-harness uses instead of a local tokenizer) ----

  def token_name(token_id):
    return None if token_id is None else _token_text(tokenizer, token_id)

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    return {"eos_token": token_name(getattr(tokenizer, "eos_id", None)),
            "bos_token": token_name(getattr(tokenizer, "bos_id", None)),
            "pad_token": token_name(getattr(tokenizer, "pad_id", None)),
            "chat_template": getattr(tokenizer, "chat_template", None), "model_max_length": engine.limits.context}

  @app.post("/tokenize")
  async def tokenize(req: TokenizeRequest):
    if (req.prompt is None) == (req.messages is None):
      raise ApiError(400, "give one of 'prompt' and 'messages'", "prompt")
    if req.messages is not None:
      ids = sampler.encode_chat(tokenizer, [_plain(req.messages)])[0]
    else:
      ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.limits.context}

  @app.post("/detokenize")
  async def detokenize(req: DetokenizeRequest):
    if any(not 0 <= i < engine.policy.cfg.vocab_size for i in req.tokens):
      raise ApiError(400, f"a token id is outside the vocabulary [0, {engine.policy.cfg.vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(req.tokens)}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "alignment"}]}

  # -- chat ---------------------------------------------------------------------------------------

  def chat_logprobs(prompt_ids, choice: _Choice, top: int) -> dict:
    if not choice.ids:
      return {"content": []}
    lps, top_ids, top_lps = engine.score(list(prompt_ids) + choice.ids, len(prompt_ids), top)
    content = []
    for token, lp, ids, alts in zip(choice.ids, lps, top_ids, top_lps):
      text = _token_text(tokenizer, token)
      content.append({"token": text, "logprob": float(lp), "bytes": list(text.encode("utf-8")),
                      "top_logprobs": [{"token": _token_text(tokenizer, i), "logprob": float(a),
                                        "bytes": list(_token_text(tokenizer, i).encode("utf-8"))}
                                       for i, a in zip(ids, alts)]})
    return {"content": content}

  @app.post("/v1/chat/completions")
  async def chat(req: ChatRequest):
    check_model(req.model)
    _check_unsupported(req)
    stops = _stops(req.stop)
    if req.top_logprobs and not req.logprobs:
      raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    messages = _plain(req.messages)
    if messages[-1]["role"] == "assistant":
      raise ApiError(400, "the last message must not be the assistant's (the answer follows it)", "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or min(engine.limits.max_tokens,
                                                                     engine.limits.context - 1)
    prompt_ids = sampler.encode_chat(tokenizer, [messages])[0]
    if len(prompt_ids) >= engine.limits.context:
      raise ApiError(400, f"the messages are {len(prompt_ids)} tokens; the context is {engine.limits.context}",
                     "messages", "context_length_exceeded")
    if req.max_tokens is None and req.max_completion_tokens is None:
      max_tokens = min(max_tokens, engine.limits.context - len(prompt_ids))
    blocked = False
    if guard is not None:
      blocked = bool((await run_in_threadpool(guard.check_prompts, [messages]))[0] >= guard.threshold)
    if blocked:
      choices = [_Choice(tokenizer, tokenizer.encode(guard.refusal, add_special_tokens=False).ids, "content_filter", [])
                 for _ in range(req.n)]
    else:
      completions = await run(prompt_ids, req.n, max_tokens, settings(req))
      choices = [_Choice(tokenizer, c.tokens, c.finish_reason, stops, c.stop_token) for c in completions]
      if guard is not None:
        flagged = await run_in_threadpool(guard.flag_responses, [messages] * len(choices), [c.text for c in choices])
        for i, flag in enumerate(flagged):
          if flag:
            choices[i] = _Choice(tokenizer, tokenizer.encode(guard.refusal, add_special_tokens=False).ids,
                                 "content_filter", [])
    logprobs = ([await run_in_threadpool(chat_logprobs, prompt_ids, c, req.top_logprobs or 0) for c in choices]
                if req.logprobs else [None] * len(choices))
    rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    used = usage(len(prompt_ids), sum(len(c.ids) for c in choices))
    if not req.stream:
      return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
              "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                           "logprobs": lp, "finish_reason": c.finish_reason}
                          for i, (c, lp) in enumerate(zip(choices, logprobs))],
              "usage": used}

    def events():
      def chunk(index, delta, finish=None, lp=None):
        return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
      for i, (c, lp) in enumerate(zip(choices, logprobs)):
        yield chunk(i, {"role": "assistant", "content": ""})
        for k, piece in enumerate(_pieces(tokenizer, c)):
          yield chunk(i, {"content": piece}, lp=None if lp is None else {"content": lp["content"][k:k + 1]})
        yield chunk(i, {}, c.finish_reason)
      if req.stream_options and req.stream_options.include_usage:
        yield {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name, "choices": [],
               "usage": used}

    return _sse(events())

  # -- completions --------------------------------------------------------------------------------

  def completion_logprobs(prompt_ids, choice: _Choice, top: int, echo: bool) -> dict:
    scored = list(prompt_ids) + choice.ids + ([] if choice.stop_token is None else [choice.stop_token])
    first = 1 if echo else len(prompt_ids)  # echo: every prompt token after the first is scored too
    if len(scored) > first:
      lps, top_ids, top_lps = engine.score(scored, first, top)
    else:
      lps, top_ids, top_lps = [], [], []
    tokens, token_lps, tops = [], [], []
    if echo:  # the first prompt token has nothing before it
      tokens.append(_token_text(tokenizer, prompt_ids[0]))
      token_lps.append(None)
      tops.append(None)
    for token, lp, alt_ids, alt_lps in zip(scored[first:], lps, top_ids, top_lps):
      tokens.append(_token_text(tokenizer, token))
      token_lps.append(float(lp))
      tops.append({_token_text(tokenizer, i): float(a) for i, a in zip(alt_ids, alt_lps)} if top else None)
    offsets, at = [], 0
    for t in tokens:
      offsets.append(at)
      at += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest):
    check_model(req.model)
    _check_unsupported(req)
    stops = _stops(req.stop)
    if req.best_of not in (None, req.n):
      raise ApiError(400, "'best_of' other than n is not supported", "best_of", "unsupported_value")
    if req.max_tokens == 0 and not req.echo:
      raise ApiError(400, "max_tokens=0 needs echo=true (it scores the prompt)", "max_tokens")
    if req.max_tokens > engine.limits.max_tokens:
      raise ApiError(400, f"max_tokens={req.max_tokens}: at most {engine.limits.max_tokens}", "max_tokens",
                     "invalid_value")
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
      prompt = [prompt]
    if not prompt:
      raise ApiError(400, "'prompt' is empty", "prompt")
    prompt_ids = []
    for p in prompt:
      ids = tokenizer.encode(p).ids if isinstance(p, str) else list(p)
      if not ids:
        raise ApiError(400, "a prompt has no tokens", "prompt")
      if any(not 0 <= i < engine.policy.cfg.vocab_size for i in ids):
        raise ApiError(400, f"a prompt token id is outside the vocabulary [0, {engine.policy.cfg.vocab_size})", "prompt")
      if len(ids) + req.max_tokens > engine.limits.context:
        raise ApiError(400, f"a prompt of {len(ids)} tokens plus max_tokens={req.max_tokens} exceeds the context "
                       f"of {engine.limits.context}", "prompt", "context_length_exceeded")
      prompt_ids.append(ids)
    if req.max_tokens == 0:
      per_prompt = [[_Choice(tokenizer, [], "length", []) for _ in range(req.n)] for _ in prompt_ids]
    else:
      results = await asyncio.gather(*(run(ids, req.n, req.max_tokens, settings(req)) for ids in prompt_ids))
      per_prompt = [[_Choice(tokenizer, c.tokens, c.finish_reason, stops, c.stop_token) for c in r] for r in results]
    rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    choices = []
    for p, (ids, cs) in enumerate(zip(prompt_ids, per_prompt)):
      for k, c in enumerate(cs):
        text = (tokenizer.decode(ids) if req.echo else "") + c.text
        lp = (await run_in_threadpool(completion_logprobs, ids, c, req.logprobs, req.echo)
              if req.logprobs is not None else None)
        choices.append({"index": p * req.n + k, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    used = usage(sum(len(i) for i in prompt_ids), sum(len(c.ids) for cs in per_prompt for c in cs))
    if not req.stream:
      return {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices,
              "usage": used}

    def events():
      for choice, cs in zip(choices, [c for cs in per_prompt for c in cs]):
        def chunk(text, finish=None):
          return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                  "choices": [{"index": choice["index"], "text": text, "logprobs": None, "finish_reason": finish}]}
        if req.echo:
          yield chunk(choice["text"][:len(choice["text"]) - len(cs.text)])
        for piece in _pieces(tokenizer, cs):
          yield chunk(piece)
        yield chunk("", cs.finish_reason)

    return _sse(events())

  return app


def _plain(messages: list[ChatMessage]) -> list[dict]:
  return [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
          for m in messages]


def _pieces(tokenizer, choice: _Choice) -> list[str]:
  """The choice's text in one piece per token (a token that ends inside a multi-byte character waits for
  the next), joining to exactly the text."""
  pieces, shown = [], ""
  for k in range(1, len(choice.ids) + 1):
    text = tokenizer.decode(choice.ids[:k])
    if k < len(choice.ids) and text.endswith("\ufffd"):
      continue
    text = text[:len(choice.text)]
    if len(text) > len(shown):
      pieces.append(text[len(shown):])
      shown = text
  if shown != choice.text:
    pieces.append(choice.text[len(shown):])
  return pieces


def _sse(chunks) -> StreamingResponse:
  def body():
    for c in chunks:
      yield f"data: {json.dumps(c)}\n\n"
    yield "data: [DONE]\n\n"
  return StreamingResponse(body(), media_type="text/event-stream")
