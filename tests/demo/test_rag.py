"""The retrieval-augmented demo: its knowledge base, the stand-in's reading of RAG prompts, and the
pipeline on real ONNX sessions against a real stand-in LLM server."""

from __future__ import annotations

import random
import threading

import httpx
import numpy as np
import pytest

from tests.conftest import free_port
from tracetune.demo import knowledge, rag
from tracetune.demo.load import LoadPlan, QuestionSource, rate_at, source_for
from tracetune.demo.standins import read_context, serve_standins
from tracetune.executor import ChatClient
from tracetune.tuner.config import PipelineConfig


def test_every_question_is_answered_by_its_passage_and_comparisons_by_the_larger_figure():
    values = knowledge.facts()
    by_id = {p.id: p for p in knowledge.passages()}
    assert len(by_id) == len(knowledge.PRODUCTS) * len(knowledge.TOPICS)
    kinds = []
    for q in knowledge.questions(400, seed=3):
        kinds.append(q.kind)
        product, topic = q.passage_id.split("/")
        if q.kind == "fact":
            assert knowledge.answer_of(by_id[q.passage_id].sentences[0]) == q.answer == values[product, topic]
        else:
            a, b = knowledge.products_in(q.text)
            figures = {p: int(values[p, topic].split()[0]) for p in (a, b)}
            assert q.answer == max(figures, key=figures.get) and figures[a] != figures[b]
    assert 0.15 < kinds.count("compare") / len(kinds) < 0.35


def _prompt(question: str, passage_ids: list[str]) -> str:
    by_id = {p.id: p for p in knowledge.passages()}
    context = "\n".join(f"[{n}] {by_id[pid].text}" for n, pid in enumerate(passage_ids, 1))
    return f"Context:\n{context}\n\nQuestion: {question}"


def test_the_careful_reader_compares_both_products_and_the_careless_one_names_the_top_passage():
    values = knowledge.facts()
    a, b = "Falcon 200", "Falcon 500"
    bigger = max((a, b), key=lambda p: int(values[p, "battery"].split()[0]))
    smaller = b if bigger == a else a
    question = f"Which has the higher battery life, the {a} or the {b}?"
    prompt = _prompt(question, [f"{smaller}/battery", f"{bigger}/battery", "Heron 100/battery"])
    assert knowledge.answer_in(read_context(prompt, careful=True)) == bigger
    assert knowledge.answer_in(read_context(prompt, careful=False)) == smaller  # the first passage's product
    fact = _prompt("How long is the warranty on the Osprey 300?", ["Osprey 300/warranty", "Osprey 200/warranty"])
    assert knowledge.answer_in(read_context(fact)) == values["Osprey 300", "warranty"]
    assert read_context("Context:\n\nQuestion: anything?") == ""


def test_questions_are_drawn_for_rag_and_the_daily_curve_has_bursts():
    source_type, field = source_for(rag.NAME)
    assert (source_type, field) == (QuestionSource, "answer")
    plan = LoadPlan(rate=4.0, duration=600, pattern="daily_bursts", period_seconds=300, duplicate_ratio=0.2)
    plan.validate()
    source = QuestionSource(plan, random.Random(1))
    drawn = [source.draw(t) for t in range(300)]
    assert sum(dup for _, dup, _ in drawn) > 30 and all(t.category for t, _, s in drawn if s != "invalid")
    rates = [rate_at(plan, t) for t in np.arange(0, 300, 1.0)]
    assert max(rates) == pytest.approx(3 * 4.0 * (1 + 0.6 * np.sin(2 * np.pi * 0.35)), rel=0.02)  # burst past the peak
    assert min(rates) == pytest.approx(4.0 * 0.4, rel=0.02)  # the night


@pytest.fixture(scope="module")
def parts(models_dir):
    from tracetune.demo.models import Encoder

    fp32, int8 = Encoder(models_dir, "fp32"), Encoder(models_dir, "int8")
    index = rag.KnowledgeIndex(models_dir, fp32)
    return index, fp32, {"rerank-small": rag.SmallReranker(index, int8), "rerank-large": rag.LargeReranker(index, fp32)}


def test_the_large_reranker_is_surer_where_the_extractive_answer_is_right(parts):
    """What the cascade relies on: confidence separates right extractive answers from wrong ones, and the
    large reranker's confidence separates them better than the small one's."""
    index, fp32, rerankers = parts
    qs = knowledge.questions(120, seed=9)
    vectors = fp32.encode([q.text for q in qs])
    items = [{"question": q.text, "candidates": index.search(v), "vector": v} for q, v in zip(qs, vectors, strict=True)]
    gaps = {}
    for route, rerank in rerankers.items():
        out = rerank(items)
        right = np.array([answer["answer"] == q.answer for q, (answer, _) in zip(qs, out, strict=True)])
        confidence = np.array([c for _, c in out])
        found = [q.passage_id in answer["passages"] for q, (answer, _) in zip(qs, out, strict=True) if q.kind == "fact"]
        assert np.mean(found) > 0.95, (route, np.mean(found))
        assert not right[[q.kind == "compare" for q in qs]].any()  # no sentence answers a comparison
        gaps[route] = confidence[right].mean() - confidence[~right].mean()
    assert gaps["rerank-large"] > gaps["rerank-small"] > 0, gaps
    # The index is reused from the models folder on the next start.
    assert (fp32.path.parent / rag.INDEX_FILE).is_file()
    assert np.array_equal(rag.KnowledgeIndex(fp32.path.parent, fp32).vectors, index.vectors)


def test_the_pipeline_answers_through_a_real_stand_in_llm(parts):
    """Every step on real sessions; a comparison escalates to the large tier, which answers it right; the
    answer cache (when on) serves the repeat without a second call. The reranker's and the tier's spans carry
    their own answers as `tracetune.prediction` (what labels are compared with, per route)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    index, fp32, rerankers = parts
    port, stop, ready = free_port(), threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_standins, kwargs={
        "llm_port": port, "crm_port": free_port(), "stop": stop, "ready": ready.set,
        "llm_options": {"latency_ms": 0.0, "accuracy": 1.0, "rate_limit_rps": 0.0}}, daemon=True)
    thread.start()
    assert ready.wait(30)
    base = f"http://127.0.0.1:{port}/v1"
    llm = {"llm-small": rag.Reader(ChatClient(base, "standin-small")),
           "llm-large": rag.Reader(ChatClient(base, "standin-large"))}
    pipeline = rag.build(index, fp32.encode, rerankers, llm=llm, seed=4, tracer=provider.get_tracer("test"))
    try:
        pipeline.apply_config(PipelineConfig(rag.NAME, 1, {"generate": {
            "route_weights": {"llm-small": 0.0, "llm-large": 1.0}, "cache_enabled": True}}))
        values = knowledge.facts()
        question = "Which has the higher weight, the Kestrel 100 or the Kestrel 300?"
        expected = max(("Kestrel 100", "Kestrel 300"), key=lambda p: int(values[p, "weight"].split()[0]))
        for _ in range(2):
            task = pipeline.run({"text": question})
            assert rag.result(task)["answer"] == expected and rag.result(task)["escalated"]
        stats = httpx.get(f"http://127.0.0.1:{port}/stats").json()
        assert stats["models"]["standin-large"]["completions"] == 1  # the repeat came from the answer cache
        said = {s.name.split()[-1]: s.attributes.get("tracetune.prediction") for s in exporter.get_finished_spans()
                if s.attributes.get("tracetune.step") in ("rerank", "generate")}
        assert said.get("generate") == expected and said.get("rerank") not in (None, ""), said
        fact = pipeline.run({"text": "How many users can share the Heron 500?"})
        assert rag.result(fact)["answer"] == values["Heron 500", "users"]
    finally:
        pipeline.close()
        provider.shutdown()
        stop.set()
        thread.join(15)
