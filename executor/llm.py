"""The remote LLM step: an OpenAI-compatible chat client that classifies text into given labels.

Any `/v1/chat/completions` endpoint works (OpenAI, vLLM, Ollama, the stand-in in demo/standins.py).
Each call is a CLIENT span `chat {model}` with the OTel GenAI semantic conventions' attributes (what
GenAI-aware tools read), a child of the step span. The step span also gets the model and provider of its
call and its token counts under tracetune's own names (`tracetune.llm.input_tokens` / `output_tokens`,
summed over the step's calls), which the per-minute rollup and the analyzer's cost read from step spans:
`gen_ai.usage.*` is on the CLIENT span alone, so a tool summing it over every span counts each call once.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry import trace

from tracetune.executor import conventions as attr
from tracetune.executor.effects import RetriesExhausted, RetryPolicy, describe_response, send_with_retries
from tracetune.executor.telemetry import current_tracer

__all__ = ["ChatClient", "LabelModel", "LLMAnswer", "LLMError", "LLMLabelError", "classification_messages"]

# gen_ai.provider.name well-known values, by API host; anything else reports "openai_compatible".
_PROVIDERS = {
    "api.openai.com": "openai", "api.groq.com": "groq", "api.mistral.ai": "mistral_ai",
    "api.deepseek.com": "deepseek", "api.x.ai": "x_ai", "api.perplexity.ai": "perplexity",
    "generativelanguage.googleapis.com": "gcp.gemini",
}


class LLMError(Exception):
    """The LLM call failed: refused, unreachable after retries, or an answer we cannot use."""


class LLMLabelError(LLMError):
    """The model answered something that is not one of the allowed labels."""

    def __init__(self, message: str, answer: str, labels: list[str]):
        super().__init__(message)
        self.answer = answer
        self.labels = labels


@dataclass(frozen=True)
class LLMAnswer:
    label: str
    input_tokens: int
    output_tokens: int
    model: str  # the model that answered (gen_ai.response.model)
    provider: str


def classification_messages(text: str, labels: list[str]) -> list[dict[str, str]]:
    """The prompt: a system message listing `Categories: a, b, c`, the ticket as the user message."""
    return [
        {"role": "system", "content": "You classify customer support tickets. Reply with exactly one category "
                                      "from the list below, written as listed, and nothing else.\n"
                                      f"Categories: {', '.join(labels)}"},
        {"role": "user", "content": f"Ticket: {text}"},
    ]


def _match_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer names: exact (ignoring case, quotes, a `Category:` prefix), else the only one named."""
    cleaned = answer.strip().strip("`'\"*.!").strip()
    cleaned = re.sub(r"^(category|label)\s*:\s*", "", cleaned, flags=re.I).strip("`'\"*.! ").lower()
    by_name = {label.lower(): label for label in labels}
    if cleaned in by_name:
        return by_name[cleaned]
    named = [label for label in labels if re.search(rf"(?<![\w-]){re.escape(label.lower())}(?![\w-])", cleaned)]
    return named[0] if len(named) == 1 else None


def _add_count(span: trace.Span, name: str, count: int) -> None:
    """`name` on `span` plus `count`: a step that calls twice keeps both calls' tokens, not the last one's."""
    before = (getattr(span, "attributes", None) or {}).get(name, 0)  # the SDK's spans can be read back
    span.set_attribute(name, int(before) + count)


class ChatClient:
    """`classify(text, labels)` over `POST {base_url}/chat/completions`, retrying 429/5xx per `policy`.

    `base_url` is the API root as OpenAI clients take it (`http://127.0.0.1:8808/v1`; a bare host gets
    `/v1`). `provider` (gen_ai.provider.name) is inferred from well-known hosts.
    """

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout: float = 10,
                 policy: RetryPolicy | None = None, provider: str | None = None, temperature: float | None = 0.0,
                 max_tokens: int | None = None, client: httpx.Client | None = None,
                 tracer: trace.Tracer | None = None):
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"ChatClient.base_url must be an http(s) URL like http://127.0.0.1:8808/v1, "
                             f"got {base_url!r}")
        if not model:
            raise ValueError("ChatClient.model must name the model to call")
        root = base_url.rstrip("/")
        self.base_url = root + "/v1" if url.path in ("", "/") else root
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.policy = policy or RetryPolicy(max_attempts=5, base_delay=0.2, max_delay=10.0)
        self.provider = provider or _PROVIDERS.get(url.host, "openai_compatible")
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._server = (url.host, url.port or (443 if url.scheme == "https" else 80))
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._own_client = client is None
        self._client = client or httpx.Client(limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self._tracer = tracer

    def complete(self, messages: list[dict[str, Any]], timeout: float | None = None, **params: Any) -> dict[str, Any]:
        """One chat completion (the response JSON), with retries, as a CLIENT span `chat {model}` (GenAI
        conventions) under the current span, which gets the call's model and provider, and its token counts
        added to `tracetune.llm.input_tokens` / `output_tokens`.

        `timeout` (s) bounds the whole call, retries included; each attempt also stops at `self.timeout`."""
        step = trace.get_current_span()
        tracer = self._tracer or current_tracer()
        with tracer.start_as_current_span(f"chat {self.model}", kind=trace.SpanKind.CLIENT,
                                          record_exception=False, set_status_on_exception=False) as span:
            try:
                data = self._complete(span, step, messages, timeout, params)
            except LLMError as exc:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:300]))
                raise
        usage = data.get("usage") or {}
        step.set_attribute("gen_ai.provider.name", self.provider)
        step.set_attribute("gen_ai.request.model", self.model)
        _add_count(step, attr.LLM_INPUT_TOKENS, int(usage.get("prompt_tokens", 0)))
        _add_count(step, attr.LLM_OUTPUT_TOKENS, int(usage.get("completion_tokens", 0)))
        return data

    def _complete(self, span: trace.Span, step: trace.Span, messages: list[dict[str, Any]], timeout: float | None,
                  params: dict[str, Any]) -> dict[str, Any]:
        def both(name: str, value: Any) -> None:  # retries and failures: the step's story too
            span.set_attribute(name, value)
            step.set_attribute(name, value)

        span.set_attribute("gen_ai.operation.name", "chat")
        span.set_attribute("gen_ai.provider.name", self.provider)
        span.set_attribute("gen_ai.request.model", self.model)
        span.set_attribute("server.address", self._server[0])
        span.set_attribute("server.port", self._server[1])
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
            span.set_attribute("gen_ai.request.temperature", self.temperature)
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
            span.set_attribute("gen_ai.request.max_tokens", self.max_tokens)
        body.update(params)

        deadline = time.monotonic() + timeout if timeout is not None else None

        def send() -> httpx.Response:
            left = self.timeout if deadline is None else max(0.001, min(self.timeout, deadline - time.monotonic()))
            return self._client.post(self.url, json=body, headers=self._headers, timeout=left)

        try:
            response, attempts = send_with_retries(send, self.policy, deadline)
        except RetriesExhausted as exc:
            both("tracetune.retries", exc.attempts - 1)
            both("error.type", exc.error_type)  # a status, or the exception ("httpx.ReadTimeout": billed, likely)
            raise LLMError(f"{self.model} at {self.url} failed after {exc.attempts} attempts: {exc.error}") from None
        both("tracetune.retries", attempts - 1)
        span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code >= 400:
            both("error.type", str(response.status_code))
            raise LLMError(f"{self.model} at {self.url} refused the request ({describe_response(response)}); "
                           f"check the model name, API key and request")
        try:
            data = response.json()
            usage = data.get("usage") or {}
            span.set_attribute("gen_ai.response.model", data.get("model") or self.model)
            if data.get("id"):
                span.set_attribute("gen_ai.response.id", data["id"])
            reasons = [c.get("finish_reason") or "" for c in data.get("choices", [])]
            span.set_attribute("gen_ai.response.finish_reasons", reasons)
            span.set_attribute("gen_ai.usage.input_tokens", int(usage.get("prompt_tokens", 0)))
            span.set_attribute("gen_ai.usage.output_tokens", int(usage.get("completion_tokens", 0)))
        except (ValueError, AttributeError, TypeError) as exc:
            both("error.type", "invalid_response")
            raise LLMError(f"{self.model} at {self.url} answered a body that is not a chat completion: "
                           f"{response.text[:200]!r}") from exc
        return data

    def classify(self, text: str, labels: list[str], timeout: float | None = None) -> LLMAnswer:
        """The one label (of `labels`) the model picks for `text`; LLMLabelError if it names another."""
        if not labels:
            raise ValueError("classify needs at least one label")
        data = self.complete(classification_messages(text, labels), timeout=timeout)
        try:
            answer = data["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            trace.get_current_span().set_attribute("error.type", "invalid_response")
            raise LLMError(f"{self.model} at {self.url} answered without choices[0].message") from None
        label = _match_label(answer, labels)
        if label is None:
            trace.get_current_span().set_attribute("error.type", "invalid_label")
            raise LLMLabelError(f"{data.get('model') or self.model} answered {answer[:80]!r}, which is not one of "
                                f"the labels {labels}", answer, labels)
        usage = data.get("usage") or {}
        return LLMAnswer(label=label, input_tokens=int(usage.get("prompt_tokens", 0)),
                         output_tokens=int(usage.get("completion_tokens", 0)),
                         model=data.get("model") or self.model, provider=self.provider)

    def classifier(self, labels: list[str]) -> LabelModel:
        """`classify` as a cascade's remote model: text -> label, with the step's timeout."""
        return LabelModel(self, list(labels))

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class LabelModel:
    """A chat model as a classifier over fixed labels: `model(text, timeout=...)` is the label it picks."""

    client: ChatClient
    labels: list[str]

    def __call__(self, text: str, timeout: float | None = None) -> str:
        return self.client.classify(text, self.labels, timeout=timeout).label

    def close(self) -> None:
        self.client.close()
