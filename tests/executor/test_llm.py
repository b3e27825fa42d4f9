"""The LLM step against the OpenAI-compatible stand-in on 127.0.0.1: wire format, accuracy, 429s, spans."""

from __future__ import annotations

import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.servers import ThreadServer, free_port, wait_until
from tracetune.demo.corpus import CATEGORIES, generate
from tracetune.demo.standins import MODELS, StandinModel, classify_by_keywords, create_llm_app, serve_standins
from tracetune.executor.effects import RetryPolicy
from tracetune.executor.llm import ChatClient, LLMError, LLMLabelError, classification_messages
from tracetune.executor.telemetry import using_tracer

MODEL = "standin-small"
LARGE = "standin-large"


def test_standin_speaks_the_openai_chat_completions_format():
    with ThreadServer(create_llm_app(latency_ms=5, rate_limit_rps=0)) as llm:
        messages = classification_messages("my parcel arrived damaged, the box was crushed", CATEGORIES)
        reply = httpx.post(f"{llm.url}/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert reply.status_code == 200
        body = reply.json()
        assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
        assert isinstance(body["created"], int)
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
        assert choice["message"]["content"] in CATEGORIES
        words = sum(len(m["content"].split()) for m in messages)
        usage = body["usage"]
        assert usage["prompt_tokens"] == math.ceil(words * 1.3)
        assert usage["completion_tokens"] >= 1
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        models = httpx.get(f"{llm.url}/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL, LARGE]

        bad = httpx.post(f"{llm.url}/v1/chat/completions", json={"model": MODEL})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error" and "messages" in bad.json()["error"]["message"]
        not_json = httpx.post(f"{llm.url}/v1/chat/completions", content=b"{", headers={"content-type": "text/plain"})
        assert not_json.status_code == 400
        unknown = httpx.post(f"{llm.url}/v1/chat/completions", json={"model": "gpt-9", "messages": messages})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        assert httpx.get(f"{llm.url}/stats").json()["bad_requests"] == 3


def test_keyword_rules_know_the_corpus():
    tickets = generate(2000, seed=21)
    right = sum(classify_by_keywords(t.text) == t.category for t in tickets)
    assert right / len(tickets) > 0.95
    assert classify_by_keywords("the parcel is lost", ["billing", "shipping"]) == "shipping"
    assert classify_by_keywords("This is not about the invoice this time: I can't log in") == "login"
    assert classify_by_keywords("my parcel never arrived. PS: the last refund took weeks") == "shipping"
    assert classify_by_keywords("nothing to see here") is None


@pytest.mark.parametrize("accuracy", [1.0, 0.8])
def test_standin_accuracy_is_near_the_configured_value(accuracy):
    tickets = generate(300, seed=5)
    with ThreadServer(create_llm_app(latency_ms=0, accuracy=accuracy, rate_limit_rps=0, seed=3)) as llm, \
            ChatClient(llm.url, MODEL) as chat, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda t: chat.classify(t.text, CATEGORIES), tickets))
    observed = sum(a.label == t.category for a, t in zip(answers, tickets, strict=True)) / len(tickets)
    # The stand-in's own rules are right `rules` of the time; it then answers another label with
    # probability 1 - accuracy (right by luck 1 time in 7 when the rules were wrong).
    rules = sum(classify_by_keywords(t.text) == t.category for t in tickets) / len(tickets)
    expected = accuracy * rules + (1 - accuracy) * (1 - rules) / (len(CATEGORIES) - 1)
    # Binomial sd at p=0.8, n=300 is 0.023: +-0.07 is three of them.
    assert abs(observed - expected) <= 0.07 and abs(observed - accuracy) <= 0.1, (observed, rules)
    assert all(a.input_tokens > 0 and a.output_tokens > 0 and a.model == MODEL for a in answers)


def test_rate_limit_answers_429_with_retry_after_and_the_client_recovers(tracer):
    tracer, exporter = tracer
    with ThreadServer(create_llm_app(latency_ms=0, rate_limit_rps=10)) as llm:
        messages = classification_messages("please cancel my plan", CATEGORIES)
        with httpx.Client() as raw, ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(lambda _: raw.post(f"{llm.url}/v1/chat/completions",
                                                       json={"model": MODEL, "messages": messages}), range(20)))
        limited = [r for r in replies if r.status_code == 429]
        assert limited and len(limited) + sum(r.status_code == 200 for r in replies) == 20
        assert int(limited[0].headers["Retry-After"]) >= 1 and float(limited[0].headers["retry-after-ms"]) > 0
        assert limited[0].json()["error"]["code"] == "rate_limit_exceeded"

        delays: list[float] = []
        lock = threading.Lock()

        def sleep(seconds: float) -> None:
            with lock:
                delays.append(seconds)
            threading.Event().wait(seconds)

        policy = RetryPolicy(max_attempts=12, base_delay=0.05, max_delay=1.0, sleep=sleep)
        tickets = generate(15, seed=8)
        with ChatClient(f"{llm.url}/v1", MODEL, policy=policy) as chat:
            def one(text: str) -> str:
                with tracer.start_as_current_span("classify"):
                    return chat.classify(text, CATEGORIES).label

            with ThreadPoolExecutor(15) as pool:
                labels = list(pool.map(one, [t.text for t in tickets]))
        assert len(labels) == 15 and set(labels) <= set(CATEGORIES)
        assert delays and all(0 <= d <= 1.0 for d in delays)
        assert httpx.get(f"{llm.url}/stats").json()["rate_limited"] > len(limited)
        retries = [s.attributes["tracetune.retries"] for s in exporter.get_finished_spans()]
        assert len(retries) == 15 and max(retries) > 0


def test_a_call_is_a_genai_client_span_under_the_step(tracer):
    """OTel GenAI conventions: a CLIENT span `chat {model}` per call, child of the step span; the step span
    keeps the model and provider, and the token counts the rollup and the analyzer's cost read under
    tracetune's names (gen_ai.usage.* only on the CLIENT span: see the test below)."""
    tracer, exporter = tracer
    with ThreadServer(create_llm_app(latency_ms=1, rate_limit_rps=0)) as llm, ChatClient(llm.url, MODEL) as chat:
        with tracer.start_as_current_span("classify") as step, using_tracer(tracer):
            answer = chat.classify("I was charged twice for my pro subscription", CATEGORIES)
    assert answer.label == "billing" and answer.provider == "openai_compatible"
    call, outer = exporter.get_finished_spans()
    assert (call.name, call.kind, outer.name) == (f"chat {MODEL}", SpanKind.CLIENT, "classify")
    assert call.parent.span_id == step.get_span_context().span_id
    attrs = call.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai_compatible"
    assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.response.model"] == MODEL
    assert attrs["gen_ai.usage.input_tokens"] == answer.input_tokens > 10
    assert attrs["gen_ai.usage.output_tokens"] == answer.output_tokens >= 1
    assert attrs["tracetune.retries"] == 0 and attrs["http.response.status_code"] == 200
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    assert attrs["server.address"] == "127.0.0.1"
    assert {k: outer.attributes[k] for k in ("gen_ai.request.model", "gen_ai.provider.name",
                                             "tracetune.llm.input_tokens", "tracetune.llm.output_tokens")} == {
        "gen_ai.request.model": MODEL, "gen_ai.provider.name": "openai_compatible",
        "tracetune.llm.input_tokens": answer.input_tokens, "tracetune.llm.output_tokens": answer.output_tokens}
    assert "gen_ai.operation.name" not in outer.attributes  # one operation span per call: the CLIENT one


def test_a_failed_call_says_whether_it_was_sent_and_cut_or_never_sent(tracer):
    """`error.type` of a call no server answered, on its CLIENT span and its step: the exception's class, as the
    OTel conventions ask. A call sent and cut by its timeout (`httpx.ReadTimeout`: the provider ran it, and a
    provider bills it) is told apart from one that never reached a server (`httpx.ConnectError`)."""
    tracer, exporter = tracer
    once = RetryPolicy(max_attempts=1)
    with ThreadServer(create_llm_app(latency_ms=800, latency_sigma=0, rate_limit_rps=0)) as llm, \
            ChatClient(llm.url, MODEL, timeout=0.1, policy=once) as slow, \
            ChatClient(f"http://127.0.0.1:{free_port()}", MODEL, policy=once) as nowhere, using_tracer(tracer):
        for chat in (slow, nowhere):
            with tracer.start_as_current_span("classify"), pytest.raises(LLMError):
                chat.classify("I was charged twice for my pro subscription", CATEGORIES)
    cut, cut_step, refused, refused_step = exporter.get_finished_spans()
    assert (cut.name, cut_step.name) == (f"chat {MODEL}", "classify")
    assert cut.attributes["error.type"] == cut_step.attributes["error.type"] == "httpx.ReadTimeout"
    assert refused.attributes["error.type"] == refused_step.attributes["error.type"] == "httpx.ConnectError"
    assert "gen_ai.usage.input_tokens" not in cut.attributes  # the cost model sees no tokens for either


def test_summing_genai_usage_over_every_span_counts_each_call_once(tracer):
    """What Langfuse, Phoenix or a user's SQL do: sum gen_ai.usage.* over all spans of a trace. A step that
    calls twice has both calls counted once that way, and its own tracetune.llm.* counts are the two calls'
    sum (not the last call's)."""
    tracer, exporter = tracer
    with ThreadServer(create_llm_app(latency_ms=1, rate_limit_rps=0)) as llm, ChatClient(llm.url, MODEL) as chat:
        with tracer.start_as_current_span("draft") as step, using_tracer(tracer):
            answers = [chat.classify(text, CATEGORIES) for text in ("I was charged twice for my pro subscription",
                                                                    "the parcel never arrived and tracking is stuck")]
    spans = exporter.get_finished_spans()
    assert len(spans) == 3 and all(s.context.trace_id == step.get_span_context().trace_id for s in spans)
    for side in ("input", "output"):
        calls = sum(getattr(a, f"{side}_tokens") for a in answers)
        assert sum(s.attributes.get(f"gen_ai.usage.{side}_tokens", 0) for s in spans) == calls > 0, side
        assert next(s for s in spans if s.name == "draft").attributes[f"tracetune.llm.{side}_tokens"] == calls, side


def scripted_provider(replies: list[tuple[int, str]]) -> tuple[Starlette, list[int]]:
    """A provider answering `replies` in order (status, content), then repeating the last one."""
    seen: list[int] = []

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        status, content = replies[min(len(seen), len(replies) - 1)]
        seen.append(status)
        if status != 200:
            return JSONResponse({"error": {"message": content, "type": "server_error"}}, status_code=status)
        return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])]), seen


def test_answers_are_mapped_to_labels_or_rejected_clearly():
    fast = RetryPolicy(base_delay=0.01, max_delay=0.05)
    app, seen = scripted_provider([(503, "overloaded"), (200, "Category: Billing.")])
    with ThreadServer(app) as provider, ChatClient(provider.url, "any-model", policy=fast) as chat:
        answer = chat.classify("why is my invoice higher", ["billing", "refund"])
        assert answer.label == "billing" and seen == [503, 200]
        assert (answer.input_tokens, answer.output_tokens, answer.model) == (40, 3, "any-model")

    app, _ = scripted_provider([(200, "I think this is about pizza")])
    with ThreadServer(app) as provider, ChatClient(provider.url, "any-model", policy=fast) as chat:
        with pytest.raises(LLMLabelError, match=r"answered 'I think this is about pizza', which is not one of"):
            chat.classify("hello", ["billing", "refund"])

    app, seen = scripted_provider([(401, "Incorrect API key provided")])
    with ThreadServer(app) as provider, ChatClient(provider.url, "any-model", api_key="bad", policy=fast) as chat:
        with pytest.raises(LLMError, match="refused the request .HTTP 401 Unauthorized: Incorrect API key"):
            chat.classify("hello", ["billing"])
        assert seen == [401]  # not retried

    app, seen = scripted_provider([(500, "boom")])
    with ThreadServer(app) as provider, \
            ChatClient(provider.url, "any-model", policy=RetryPolicy(max_attempts=3, base_delay=0.01)) as chat:
        with pytest.raises(LLMError, match="failed after 3 attempts: HTTP 500 Internal Server Error: boom"):
            chat.classify("hello", ["billing"])
        assert seen == [500, 500, 500]


def test_serve_standins_runs_both_until_stopped():
    llm_port, crm_port = free_port(), free_port()
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_standins, kwargs={
        "llm_port": llm_port, "crm_port": crm_port, "stop": stop, "ready": ready.set,
        "llm_options": {"latency_ms": 0}}, daemon=True)
    thread.start()
    try:
        wait_until(ready.is_set, 20, 0.05, "stand-ins ready")
        assert httpx.get(f"http://127.0.0.1:{llm_port}/v1/models").status_code == 200
        followup = httpx.post(f"http://127.0.0.1:{crm_port}/v1/followups", json={"a": 1},
                              headers={"Idempotency-Key": "k1"})
        assert followup.status_code == 201
    finally:
        stop.set()
        thread.join(15)
    assert not thread.is_alive()


def test_the_standin_serves_a_small_and_a_large_tier_and_no_other_model():
    small, large = MODELS[MODEL], MODELS[LARGE]
    # The tiers as providers sell them: the large one right more often, slower, limited harder.
    assert large.accuracy > small.accuracy and large.latency_ms > small.latency_ms
    assert 0 < large.rate_limit_rps < small.rate_limit_rps
    with ThreadServer(create_llm_app(latency_ms=0)) as llm:
        for model in (MODEL, LARGE):
            with ChatClient(llm.url, model) as chat:
                answer = chat.classify("I was charged twice for my pro subscription", CATEGORIES)
            assert answer.model == model and answer.input_tokens > 10
        messages = classification_messages("please cancel my plan", CATEGORIES)
        unknown = httpx.post(f"{llm.url}/v1/chat/completions", json={"model": "standin-llm-1", "messages": messages})
        assert unknown.status_code == 404 and "`standin-llm-1` does not exist" in unknown.json()["error"]["message"]
        stats = httpx.get(f"{llm.url}/stats").json()
    assert stats["completions"] == 2 and stats["bad_requests"] == 1
    assert stats["models"] == {model: {"completions": 1, "rate_limited": 0} for model in (MODEL, LARGE)}


def test_each_model_has_its_own_rate_limit():
    models = {"a": StandinModel(latency_ms=0, rate_limit_rps=2), "b": StandinModel(latency_ms=0, rate_limit_rps=2)}
    messages = classification_messages("please cancel my plan", CATEGORIES)
    with ThreadServer(create_llm_app(models)) as llm, httpx.Client() as raw:
        def send(model: str) -> int:
            return raw.post(f"{llm.url}/v1/chat/completions", json={"model": model, "messages": messages}).status_code

        statuses = [send("a") for _ in range(6)]  # a burst of two, then 429s until the bucket refills
        assert statuses[:2] == [200, 200] and 429 in statuses
        assert send("b") == 200  # a's limit is a's alone
        stats = httpx.get(f"{llm.url}/stats").json()
    assert stats["models"]["a"]["rate_limited"] == statuses.count(429) and stats["models"]["b"]["rate_limited"] == 0


def test_the_large_tier_is_measurably_more_accurate():
    tickets = generate(400, seed=13)
    measured = {}
    with ThreadServer(create_llm_app(latency_ms=0, rate_limit_rps=0, seed=5)) as llm:
        for model in (MODEL, LARGE):
            with ChatClient(llm.url, model) as chat, ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda t, chat=chat: chat.classify(t.text, CATEGORIES), tickets))
            measured[model] = sum(a.label == t.category for a, t in zip(answers, tickets, strict=True)) / len(tickets)
    # As in the test above: right when the rules are and the model keeps their answer, or by luck.
    rules = sum(classify_by_keywords(t.text) == t.category for t in tickets) / len(tickets)
    for model, share in measured.items():
        accuracy = MODELS[model].accuracy
        expected = accuracy * rules + (1 - accuracy) * (1 - rules) / (len(CATEGORIES) - 1)
        assert abs(share - expected) <= 0.05, (measured, rules)  # binomial sd at p=0.9, n=400: 0.015
    assert measured[LARGE] - measured[MODEL] > 0.03, measured


@pytest.mark.parametrize("options, message", [
    ({"models": {}}, "needs at least one model"),
    ({"accuracy": 1.5}, "stand-in model 'standin-small': accuracy must be within [0, 1], got 1.5"),
    ({"models": {"m": StandinModel(latency_ms=-1)}}, "stand-in model 'm': latency_ms and latency_sigma must be >= 0"),
    ({"rate_limit_rps": -2}, "rate_limit_rps must be >= 0"),
])
def test_standin_options_that_make_no_sense_are_refused(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        create_llm_app(**options)
