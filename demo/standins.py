"""Stand-ins for services a demo cannot reach: an OpenAI-compatible LLM provider and a flaky CRM.

Both are real HTTP servers (Starlette apps) with the wire format of the service they replace, so the
executor's clients run unchanged against a real provider or CRM. Run them with `serve_standins()` or
`python -m tracetune.demo.standins`: the LLM on `llm_port` (settings default 8808), the CRM on
`llm_port + 1` unless told otherwise.

- LLM: `POST /v1/chat/completions` and `GET /v1/models` as OpenAI serves them, for two models of two
  tiers (`standin-small`: fast, less accurate; `standin-large`: slower, more accurate, a lower rate
  limit). It answers ticket-classification prompts (a `Categories: a, b, c` line and the ticket as the
  last user message) with keyword rules over the demo corpus vocabulary, wrong on purpose with
  probability `1 - accuracy`; lognormal latency; a token-bucket rate limit per model answering 429 +
  `Retry-After`; a model it does not serve is a 404, as OpenAI answers.
- CRM: `POST /v1/followups` with an `Idempotency-Key` header; flaky on purpose (503s, stalls after the
  effect happened); a repeated key returns the follow-up already created instead of a second one.

`GET /stats` on each reports counters for tests and benchmarks; `GET /health` answers readiness.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tracetune.demo import knowledge
from tracetune.demo.corpus import CATEGORIES

__all__ = ["MODELS", "StandinModel", "create_llm_app", "create_crm_app", "serve_standins", "classify_by_keywords",
           "count_tokens"]

# Cues per category, weighted: phrases and stems from the ticket vocabulary of demo/corpus.py.
# Several per template, matched as word prefixes forgiving one typo, so a typo rarely flips an answer.
_KEYWORDS: dict[str, dict[str, float]] = {
    "billing": {
        "charge": 3, "invoice": 2, "bill": 2, "billed for": 3, "payment": 2, "fee": 3, "tax": 3, "receipt": 3,
        "exempt": 3, "costs less": 3, "higher than": 3, "card on file": 3, "statement": 3, "price went up": 6,
        "vat": 4, "prorated": 5, "accounts payable": 5, "payment method": 4, "billing address": 5,
        "taken from the wrong": 5, "identical": 5, "on the basic one": 4, "but we only use": 4, "subscription": 1},
    "login": {
        "log in": 4, "login": 4, "logged out": 4, "password": 4, "two factor": 4, "2fa": 4, "sign in": 4,
        "signing in": 4, "cant sign": 4, "locked": 4, "single sign": 4, "authenticator": 4, "reset": 3, "link": 2,
        "reset link": 4, "get into": 3, "redirect": 3, "verification code": 5, "magic link": 5, "captcha": 5,
        "session expires": 5, "access denied": 5, "no access": 4, "can t access": 4, "cant access": 4,
        "it just spins": 4},
    "shipping": {
        "arrived": 3, "tracking": 4, "deliver": 3, "ship": 3, "package": 3, "parcel": 3, "courier": 3,
        "in customs": 4, "crushed": 3, "processing": 3, "not moved": 3, "ups": 3, "fedex": 3, "dhl": 3,
        "usps": 3, "royal mail": 3, "pickup point": 4, "express": 3, "neighbour": 4, "at my door": 4,
        "units": 3, "order late": 4, "where is my order": 5, "someone else": 4, "rest is missing": 4,
        "estimated": 3, "order": 1.5, "still waiting": 3},
    "refund": {
        "refund": 6, "returned the": 4, "money back": 5, "money is not back": 5, "reimburs": 6, "return label": 5,
        "the return": 4, "store credit": 5, "reverse the charge": 6, "cancelled within": 8, "never used": 3,
        "return the money": 6},
    "bug": {
        "crash": 5, "error 500": 5, "empty file": 5, "blank": 4, "stopped working": 5, "bug": 5, "wrong numbers": 5,
        "csv": 3, "graph": 3, "freez": 5, "went wrong": 5, "broken": 3, "does nothing": 5, "one day off": 5,
        "overlaps": 5, "sidebar": 4, "cuts off": 5, "duplicated": 5, "closes itself": 5, "filters": 4,
        "refresh": 3, "since update": 5, "since version": 5, "pdf export": 4, "broken formatting": 5,
        "not working": 3, "doesn t work": 3, "doesnt work": 3},
    "account": {
        "email address": 5, "change my email": 5, "merge": 5, "seats": 3, "add a user": 5, "remove a seat": 5,
        "company name": 5, "profile": 4, "ownership": 5, "delete": 5, "two accounts": 4, "admin of": 5,
        "rename": 5, "organisation": 4, "read only": 5, "phone number": 4, "left the company": 5,
        "remove her": 5, "two workspaces": 5, "download all": 5, "gdpr": 5, "username": 5, "maiden name": 5,
        "roles": 5, "time zone": 5, "account settings": 5, "colleague": 2, "account": 1},
    "feature_request": {
        "would be great": 5, "dark mode": 5, "api": 4, "export to excel": 5, "excel export": 5,
        "feature request": 5, "feature idea": 5, "schedule": 4, "integration": 5, "would love": 4, "suggestion": 5,
        "bulk edit": 5, "in the interface": 5, "keyboard shortcuts": 5, "calendar view": 5, "custom fields": 5,
        "idea": 4, "widget": 5, "webhooks": 5, "roadmap": 5, "offline mode": 5, "would be nice": 5,
        "favourite": 5, "decimal places": 5, "we wish": 5, "outside the team": 5, "any plans": 5,
        "will you ever": 5, "save us hours": 3, "possible": 3, "do this": 3},
    "cancellation": {
        "cancel": 5, "close my account": 5, "closing the account": 5, "stop all payments": 4, "too expensive": 4,
        "renew": 2, "not renew": 4, "stop renewal": 4, "another vendor": 5, "end our contract": 5,
        "end contract": 5, "membership": 4,
        "terminate": 5, "no longer need": 5, "shut it down": 5, "don t renew": 5, "dont renew": 5,
        "we are done": 5, "downgrade": 5, "budget was cut": 5, "end the": 3, "is closing": 5, "end my trial": 6,
        "unsubscribe": 5, "not to continue": 6, "i want out": 5, "end of the term": 3},
}

# The first issue a ticket raises is its point; later ones, and above all those introduced as a second
# topic ("PS:", "while I have you", "... too"), weigh less, as a reader would weigh them.
_SHIFT = (r"and another thing|another thing|one more thing|while i have (?:you|u)|second issue|separately|by the way"
          r"|btw|on a side note|unrelated|oh and|ps|plus")
_CLAUSES = re.compile(rf"(?<=[.!?])\s+|\s+(?=(?:{_SHIFT})\b)")
_SHIFTED = re.compile(rf"^(?:{_SHIFT}|also|and)\b")
_HEDGE = re.compile(r"\b(?:also|as well|too[.!]?$|still shows|earlier|one day|wish list|thinking about|might"
                    r"|may ask|considered|would help|would be nice|would be fair|soon|took weeks|was rude|dented"
                    r"|acting up|almost)\b")
_IN_PASSING = re.compile(r"sorted out (?:\S+\s+){0,4}?with (?:your|ur) colleague|not about (?:\S+\s+){0,4}?this time"
                         r"|helped me with (?:\S+\s+){0,3}?\S+[.]?\s+today|forget (?:\S+\s+){0,4}?for now"
                         r"|besides (?:\S+\s+){0,3}?\S+,|(?:\S+\s+){0,4}?is fine now")
# Words the patterns above rely on, respelled when a typo hides them ("Besdies" -> "besides").
_ANCHORS = ("besides", "forget", "sorted", "colleague", "helped", "month", "today", "about", "this", "time", "fine",
            "however", "also", "plus", "another", "thing", "more", "while", "have", "second", "issue", "separately",
            "side", "note", "unrelated", "well", "still", "shows", "earlier", "wish", "thinking", "considered",
            "would", "nice", "fair", "soon", "weeks", "rude", "dented", "acting", "almost", "with", "your")
_ANCHOR_WORD = re.compile(r"[a-z]{4,}")
_WORD = re.compile(r"[a-z0-9]+")
_CATEGORIES_LINE = re.compile(r"^\s*(?:allowed\s+)?(?:categories|labels)\s*:\s*(.+?)\s*$", re.I | re.M)
_TICKET_PREFIX = re.compile(r"^\s*ticket\s*:\s*", re.I)
# A retrieval-augmented prompt: numbered context passages, then the question.
_CONTEXT = re.compile(r"^\s*context\s*:", re.I | re.M)
_QUESTION = re.compile(r"^\s*question\s*:\s*(.+?)\s*$", re.I | re.M)
_PASSAGE = re.compile(r"^\s*\[\d+\]\s*(.+?)\s*$", re.M)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _context_sentences(prompt: str) -> list[str]:
    return [s for p in _PASSAGE.findall(prompt) for s in _SENTENCE.split(p) if s]


def read_context(prompt: str, careful: bool = False) -> str:
    """The stand-in's reading of a retrieval-augmented prompt: the context sentence that shares the most
    words with the question. A careful reader (the large tier) weighs words by how rare they are in the
    context, so the model number a question names decides between sibling products; a careless one
    counts every shared word alike. "" when the context has no sentence."""
    question = _QUESTION.search(prompt)
    sentences = _context_sentences(prompt)
    if not question or not sentences:
        return ""
    named = knowledge.products_in(question.group(1))
    if len(named) == 2:
        return _compare(question.group(1), named, sentences, careful)
    weights = None
    if careful:
        seen = [set(knowledge.words(s)) for s in sentences]
        weights = {w: 1.0 + 4.0 / sum(w in s for s in seen) for s in seen for w in s}
    best = knowledge.best_sentence(question.group(1), sentences, weights)
    return sentences[best] if best >= 0 else ""


def _compare(question: str, named: list[str], sentences: list[str], careful: bool) -> str:
    """Which of two products has more of what the question asks about. A careful reader finds each
    product's sentence on the topic and compares their figures; a careless one names the product of
    the first sentence that matches the question best (the top passage's)."""
    if not careful:
        first = knowledge.products_in(sentences[max(0, knowledge.best_sentence(question, sentences))])
        return f"The {first[0] if first else named[0]} has more."
    figures = {}
    for product in named:
        own = [s for s in sentences if product.lower() in s.lower()]
        best = knowledge.best_sentence(question, own)
        if best >= 0:
            figures[product] = int(knowledge.answer_of(own[best]).split()[0])
    if not figures:
        return f"The {named[0]} has more."
    winner = max(figures, key=figures.get) if len(figures) == 2 else next(iter(figures))
    return f"The {winner} has more."


def _misread(prompt: str, answer: str, rng: random.Random) -> str:
    """Another context sentence stating a fact: the model's mistake."""
    question = _QUESTION.search(prompt)
    named = knowledge.products_in(question.group(1)) if question else []
    if len(named) == 2:
        return f"The {named[1] if named[0] in answer else named[0]} has more."
    others = [s for s in _context_sentences(prompt) if s != answer and knowledge.answer_of(s)]
    return rng.choice(others) if others else answer


def classify_by_keywords(text: str, labels: list[str] | None = None) -> str | None:
    """The stand-in's own reading: the allowed label whose cues score highest, None if nothing matches.

    Cues come from the demo corpus's vocabulary; the first issue a ticket raises outweighs later ones.
    """
    labels = labels or list(CATEGORIES)
    lowered = _IN_PASSING.sub(" | ", _ANCHOR_WORD.sub(lambda m: _spelled(m.group()), " ".join(text.lower().split())))
    scores = dict.fromkeys(labels, 0.0)
    seen_point = False
    for clause in _CLAUSES.split(lowered):
        found = _clause_scores(clause, labels)
        total = sum(found.values())
        if not total:
            continue
        weight = 0.3 if _SHIFTED.match(clause) else 0.5 if _HEDGE.search(clause) else 0.7 if seen_point else 1.0
        weight *= min(1.0, total / 4)  # a clause votes by what it says most, a clause with weak cues softly
        seen_point = seen_point or total >= 4
        for label, score in found.items():
            scores[label] += weight * score / total
    best = max(labels, key=lambda label: scores[label])
    return best if scores[best] > 0 else None


@functools.lru_cache(maxsize=1 << 16)
def _spelled(word: str) -> str:
    return next((anchor for anchor in _ANCHORS if _one_typo(anchor, word)), word)


def _clause_scores(clause: str, labels: list[str]) -> dict[str, float]:
    hits = [_stems_of(word) for word in _WORD.findall(clause)]
    present = frozenset().union(*hits)
    scores = {}
    for label in labels:
        cues = _CUES.get(label.lower())
        if cues is None:  # a label outside the corpus: its name in the text is the only cue
            scores[label] = 3.0 if label.lower().replace("_", " ") in clause else 0.0
        else:
            scores[label] = sum(weight for cue, weight in cues if _contains(hits, present, cue))
    return scores


_CUES = {label: [(tuple(_WORD.findall(cue)), weight) for cue, weight in cues.items()]
         for label, cues in _KEYWORDS.items()}
_STEMS = sorted({stem for cues in _CUES.values() for cue, _ in cues for stem in cue})


def _contains(hits: list[frozenset[str]], present: frozenset[str], cue: tuple[str, ...]) -> bool:
    """Whether the cue's words start consecutive words of the text (`hits`: the stems each word matches)."""
    n = len(cue)
    if not present.issuperset(cue):
        return False
    if n == 1:
        return True
    return any(all(cue[j] in hits[i + j] for j in range(n)) for i in range(len(hits) - n + 1))


@functools.lru_cache(maxsize=1 << 16)
def _stems_of(word: str) -> frozenset[str]:
    return frozenset(stem for stem in _STEMS if _matches(word, stem))


def _matches(word: str, stem: str) -> bool:
    """A word matches a stem it starts with, forgiving one typo in stems of 4+ letters (4: whole words)."""
    if word.startswith(stem):
        return True
    size = len(stem)
    if size == 4:
        return _one_typo(stem, word)
    return size >= 5 and any(_one_typo(stem, word[:k]) for k in (size - 1, size, size + 1) if k <= len(word))


def _one_typo(a: str, b: str) -> bool:
    """One adjacent swap, dropped or doubled letter apart (the corpus's typos; substitutions do not count)."""
    if len(a) < len(b):
        a, b = b, a
    if len(a) - len(b) > 1 or a == b:
        return a == b
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(b))
    if len(a) > len(b):
        return a[i + 1:] == b[i:]
    return a[i + 1:i + 2] == b[i:i + 1] and a[i:i + 1] == b[i + 1:i + 2] and a[i + 2:] == b[i + 2:]


def count_tokens(text: str) -> int:
    """Rough token count (1.3 per word), the usual rule of thumb for English text."""
    words = len(text.split())
    return math.ceil(words * 1.3) if words else 0


def _openai_error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                  headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _TokenBucket:
    """Requests per second with a one-second burst; `take()` returns 0 or the seconds until a token."""

    def __init__(self, rate: float):
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}]
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _validate_chat(body: Any) -> str | None:
    """What is wrong with a chat-completions body, in OpenAI's words, or None."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant",
                                                                        "tool"):
            return f"messages[{i}] must be an object with a role of system, developer, user, assistant or tool"
        if not isinstance(message.get("content"), str | list | None):
            return f"messages[{i}].content must be a string or an array of content parts"
    if body.get("stream"):
        return "stream=true is not supported by the stand-in provider"
    return None


@dataclass(frozen=True)
class StandinModel:
    """One model the LLM stand-in serves: lognormal latency (median `latency_ms`, `latency_sigma`), the
    share of answers it gets right (`accuracy`), and requests per second past which it answers 429
    (`rate_limit_rps`, 0: no limit)."""

    latency_ms: float = 300.0
    accuracy: float = 0.95
    rate_limit_rps: float = 20.0
    latency_sigma: float = 0.5
    careful: bool = False  # reading context: weigh the rare words (model numbers) a careless reader skims

    def validate(self, name: str) -> StandinModel:
        """This model, or a ValueError naming it (as served under `name`) and the bad field."""
        if not 0 <= self.accuracy <= 1:
            raise ValueError(f"stand-in model {name!r}: accuracy must be within [0, 1], got {self.accuracy}")
        if self.latency_ms < 0 or self.latency_sigma < 0:
            raise ValueError(f"stand-in model {name!r}: latency_ms and latency_sigma must be >= 0")
        if self.rate_limit_rps < 0:
            raise ValueError(f"stand-in model {name!r}: rate_limit_rps must be >= 0 (0: no limit)")
        return self


# Two tiers, as hosted providers sell them: a small model that is fast and cheap but wrong more often,
# and a large one that is right more often, slower, and rate-limited harder. Their token prices are
# those of two real models of the same tiers (analyzer/prices.toml).
MODELS: dict[str, StandinModel] = {
    "standin-small": StandinModel(latency_ms=300, accuracy=0.90, rate_limit_rps=20),
    "standin-large": StandinModel(latency_ms=700, accuracy=0.98, rate_limit_rps=5, careful=True),
}


class _LLMState:
    """What the LLM stand-in holds between requests: its models, a rate-limit bucket per model (providers
    limit each model separately), one seeded RNG, and counters for `/stats`."""

    def __init__(self, models: dict[str, StandinModel], seed: int):
        self.models = models
        self.buckets = {name: _TokenBucket(model.rate_limit_rps) for name, model in models.items()}
        self.rng = random.Random(seed)
        self.stats: dict[str, Any] = {"requests": 0, "completions": 0, "rate_limited": 0, "bad_requests": 0,
                                      "models": {name: {"completions": 0, "rate_limited": 0} for name in models}}


async def _completions(request: Request) -> JSONResponse:
    state: _LLMState = request.app.state.llm
    stats = state.stats
    stats["requests"] += 1
    try:
        body = await request.json()
    except ValueError:
        body = None
    problem = _validate_chat(body) if body is not None else "the request body is not valid JSON"
    if problem:
        stats["bad_requests"] += 1
        return _openai_error(400, problem, "invalid_request_error")
    name = body["model"]
    model = state.models.get(name)
    if model is None:
        stats["bad_requests"] += 1
        return _openai_error(404, f"The model `{name}` does not exist or you do not have access to it.",
                             "invalid_request_error", "model_not_found", "model")
    wait = state.buckets[name].take()
    if wait:
        stats["rate_limited"] += 1
        stats["models"][name]["rate_limited"] += 1
        headers = {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(math.ceil(wait * 1000)),
                   "x-ratelimit-limit-requests": str(math.ceil(model.rate_limit_rps * 60)),
                   "x-ratelimit-remaining-requests": "0"}
        return _openai_error(429, f"Rate limit reached for {name}: limit {model.rate_limit_rps:g} requests per "
                             f"second. Please try again in {wait * 1000:.0f}ms.", "requests",
                             "rate_limit_exceeded", headers=headers)

    texts = [_message_text(m) for m in body["messages"]]
    user = [_message_text(m) for m in body["messages"] if m["role"] == "user"]
    rng = state.rng
    question = _QUESTION.search(user[-1]) if user else None
    if question and _CONTEXT.search(user[-1]):
        answer = read_context(user[-1], careful=model.careful)
        if rng.random() >= model.accuracy:
            answer = _misread(user[-1], answer, rng)
        return await _answer(state, name, model, texts, answer)
    match = next((m for t in texts if (m := _CATEGORIES_LINE.search(t))), None)
    labels = [x.strip() for x in match.group(1).split(",") if x.strip()] if match else list(CATEGORIES)
    ticket = _TICKET_PREFIX.sub("", user[-1] if user else texts[-1])
    answer = classify_by_keywords(ticket, labels) or rng.choice(labels)
    if len(labels) > 1 and rng.random() >= model.accuracy:
        answer = rng.choice([label for label in labels if label != answer])
    return await _answer(state, name, model, texts, answer)


async def _answer(state: _LLMState, name: str, model: StandinModel, texts: list[str], answer: str) -> JSONResponse:
    """The completion, after the model's latency, with token usage counted over the whole prompt."""
    rng, stats = state.rng, state.stats
    if model.latency_ms:
        await asyncio.sleep(model.latency_ms * math.exp(rng.gauss(0, model.latency_sigma)) / 1000)
    stats["completions"] += 1
    stats["models"][name]["completions"] += 1
    prompt_tokens = count_tokens(" ".join(texts))
    completion_tokens = max(1, count_tokens(answer))
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


async def _models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "tracetune-standin"}
        for name in request.app.state.llm.models]})


async def _llm_stats(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.llm.stats)


def create_llm_app(models: Mapping[str, StandinModel] | None = None, *, seed: int = 0,
                   latency_ms: float | None = None, latency_sigma: float | None = None,
                   accuracy: float | None = None, rate_limit_rps: float | None = None) -> Starlette:
    """An OpenAI-compatible chat provider that classifies support tickets, serving `models` by name
    (default `MODELS`: standin-small and standin-large); any other model name is a 404.

    With probability `accuracy` a model answers the stand-in's own reading of the ticket
    (`classify_by_keywords`, right about 98% of the time on the demo corpus, whose shortest tickets are
    ambiguous on purpose), otherwise another allowed label; so measured accuracy is a little under
    `accuracy`. Latency is lognormal with median `latency_ms`; past `rate_limit_rps` a model answers 429
    with Retry-After (each model has its own limit). `latency_ms`, `latency_sigma`, `accuracy` and
    `rate_limit_rps`, when given, replace that value for every model (tests: fast and always right).
    """
    chosen = dict(MODELS if models is None else models)
    if not chosen:
        raise ValueError("the LLM stand-in needs at least one model")
    overrides = {key: float(value) for key, value in (("latency_ms", latency_ms), ("latency_sigma", latency_sigma),
                                                      ("accuracy", accuracy), ("rate_limit_rps", rate_limit_rps))
                 if value is not None}
    served = {name: dataclasses.replace(model, **overrides).validate(name) for name, model in chosen.items()}
    app = Starlette(routes=[
        Route("/v1/chat/completions", _completions, methods=["POST"]),
        Route("/v1/models", _models, methods=["GET"]),
        Route("/stats", _llm_stats, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
    ])
    app.state.llm = _LLMState(served, seed)
    return app


async def _health(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _crm_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


class _Key:
    """What the CRM remembers per idempotency key."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.attempts = 0
        self.fingerprint: str | None = None
        self.followup: dict[str, Any] | None = None


def create_crm_app(fail_first: int = 0, failure_rate: float = 0.0, latency_ms: float = 20, seed: int = 0,
                   retry_after: int = 1, stall_first: int = 0, stall_ms: float = 1000) -> Starlette:
    """A CRM "create follow-up" endpoint that is flaky on purpose and idempotent by `Idempotency-Key`.

    Per key, the first `fail_first` attempts (and, after them, a random `failure_rate` share) answer 503
    without creating anything; every second such failure carries `Retry-After: retry_after` (0: never).
    The next `stall_first` attempts create the follow-up and then hold the answer for `stall_ms`: a client
    timeout after the effect happened, the case idempotency keys exist for. A key already used returns
    the same follow-up (200, `Idempotent-Replayed: true`); the same key with a different body is a 422.
    """
    if not 0 <= failure_rate <= 1:
        raise ValueError(f"failure_rate must be within [0, 1], got {failure_rate}")
    rng = random.Random(seed)
    keys: dict[str, _Key] = {}
    followups: list[dict[str, Any]] = []
    stats = {"requests": 0, "failed": 0, "created": 0, "replayed": 0, "in_flight": 0, "max_in_flight": 0}

    async def create(request: Request) -> JSONResponse:
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            return await _create(request)
        finally:
            stats["in_flight"] -= 1

    async def _create(request: Request) -> JSONResponse:
        key = request.headers.get("idempotency-key", "").strip()
        if not key:
            return _crm_error(400, "the Idempotency-Key header is required: send a unique key per follow-up")
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _crm_error(400, "the request body must be a JSON object")
        if latency_ms:
            await asyncio.sleep(latency_ms * math.exp(rng.gauss(0, 0.25)) / 1000)
        fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        state = keys.setdefault(key, _Key())
        async with state.lock:  # one request per key at a time: a concurrent duplicate waits, then replays
            state.attempts += 1
            if state.followup is not None:
                if state.fingerprint != fingerprint:
                    return _crm_error(422, f"Idempotency-Key {key!r} was already used with a different body")
                stats["replayed"] += 1
                return JSONResponse(state.followup, headers={"Idempotent-Replayed": "true"})
            if state.attempts <= fail_first or (failure_rate and rng.random() < failure_rate):
                stats["failed"] += 1
                headers = {"Retry-After": str(retry_after)} if retry_after and state.attempts % 2 == 0 else None
                return _crm_error(503, "the CRM is temporarily unavailable, retry later", headers)
            state.fingerprint = fingerprint
            state.followup = {"id": f"fu_{uuid.uuid4().hex[:16]}", "object": "followup", "idempotency_key": key,
                              "created": int(time.time()), "data": body}
            followups.append(state.followup)
            stats["created"] += 1
            stalled = state.attempts <= fail_first + stall_first
        if stalled:
            await asyncio.sleep(stall_ms / 1000)
        return JSONResponse(state.followup, status_code=201)

    async def listing(request: Request) -> JSONResponse:
        key = request.query_params.get("idempotency_key")
        data = [f for f in followups if key is None or f["idempotency_key"] == key]
        return JSONResponse({"object": "list", "data": data})

    async def show_stats(_: Request) -> JSONResponse:
        return JSONResponse(stats)

    return Starlette(routes=[
        Route("/v1/followups", create, methods=["POST"]),
        Route("/v1/followups", listing, methods=["GET"]),
        Route("/stats", show_stats, methods=["GET"]),
        Route("/health", _health, methods=["GET"]),
    ])


def serve_standins(host: str = "127.0.0.1", llm_port: int = 8808, crm_port: int | None = None,
                   stop: threading.Event | None = None, llm_options: dict[str, Any] | None = None,
                   crm_options: dict[str, Any] | None = None, ready: Callable[[], None] | None = None) -> None:
    """Serve both stand-ins until `stop` is set (or SIGINT/SIGTERM in the main thread).

    The CRM listens on `crm_port`, by default `llm_port + 1`. `*_options` go to `create_*_app`;
    `ready` is called once both are listening.
    """
    import uvicorn

    stop = stop or threading.Event()
    crm_port = llm_port + 1 if crm_port is None else crm_port
    servers = [uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                             timeout_graceful_shutdown=5))
               for app, port in ((create_llm_app(**(llm_options or {})), llm_port),
                                 (create_crm_app(**(crm_options or {})), crm_port))]
    threads = [threading.Thread(target=s.run, name=f"standin-{i}", daemon=True) for i, s in enumerate(servers)]
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    for thread in threads:
        thread.start()
    while not stop.is_set() and not all(s.started for s in servers):
        if not all(t.is_alive() for t in threads):  # a port in use ends uvicorn's thread early
            stop.set()
            break
        stop.wait(0.05)
    else:
        if ready and not stop.is_set():
            ready()
    while not stop.wait(0.5):
        if not all(t.is_alive() for t in threads):
            break
    for server in servers:
        server.should_exit = True
    for thread in threads:
        thread.join(10)
    if not all(s.started for s in servers):
        raise SystemExit(f"stand-ins could not listen on {host}:{llm_port} and {host}:{crm_port} (port in use?)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tracetune.demo.standins", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--llm-port", type=int, default=8808)
    parser.add_argument("--crm-port", type=int, default=None, help="default: llm port + 1")
    tiers = ", ".join(f"{name} {m.latency_ms:g} ms, accuracy {m.accuracy:g}, {m.rate_limit_rps:g} req/s"
                      for name, m in MODELS.items())
    parser.add_argument("--llm-latency-ms", type=float, default=None,
                        help=f"median latency of every model (default: each its own; {tiers})")
    parser.add_argument("--llm-accuracy", type=float, default=None, help="accuracy of every model")
    parser.add_argument("--llm-rate-limit", type=float, default=None, help="requests/s per model, 0 for none")
    parser.add_argument("--crm-failure-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    print(f"stand-ins: LLM ({', '.join(MODELS)}) on http://{args.host}:{args.llm_port}/v1, CRM on "
          f"http://{args.host}:{args.crm_port or args.llm_port + 1}/v1/followups", flush=True)
    serve_standins(args.host, args.llm_port, args.crm_port,
                   llm_options={"latency_ms": args.llm_latency_ms, "accuracy": args.llm_accuracy,
                                "rate_limit_rps": args.llm_rate_limit},
                   crm_options={"failure_rate": args.crm_failure_rate})


if __name__ == "__main__":
    main()
