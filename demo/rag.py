"""The second demo pipeline, `rag_answering`: retrieval-augmented answers to product questions.

A customer asks about a product; the pipeline embeds the question (MiniLM fp32, batched, cached),
retrieves the nearest passages of the knowledge base (`demo.knowledge`, embedded once with the same
encoder), reranks them with one of two rerankers routed by weight, and answers: from the top passage
itself when the reranker is confident, else through an LLM (a cascade over two tiers routed by weight,
with an answer cache the owner or the tuner may switch on). Built on the public executor runtime only.

The two rerankers are real ONNX encoders at work on every request:

- `rerank-small`: the int8 encoder over each candidate's title, blended with the retrieval score.
  Cheap, and no better than retrieval at telling "Falcon 200" from "Falcon 300".
- `rerank-large`: the fp32 encoder over every sentence of every candidate (sentence-level similarity),
  plus the words the question shares with the passage weighed by rarity (model numbers are rare).
  Several times the compute, and far more often right.

Where the cost and the latency pull: batching the rerankers and the encoder saves priced compute and
costs queueing time; the large reranker costs compute and makes the top passage right more often (fewer
LLM calls needed for the floor); the large LLM tier is slower and dearer and reads the context more
carefully; the cascade threshold trades LLM tokens for quality.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry import trace

from tracetune.base.settings import Settings
from tracetune.demo import knowledge
from tracetune.executor import Batching, Cache, Cascade, ChatClient, Infer, InputError, Pipeline, Step, Task

NAME = "rag_answering"
RERANKERS = ("rerank-small", "rerank-large")
LLM_TIERS = ("llm-small", "llm-large")
# The declared defaults, as a team would first ship it: half the traffic on each reranker, most LLM calls
# on the large tier (which holds the quality floor), and the LLM asked whenever the reranker is less than
# 90% sure.
RERANK_WEIGHTS = {"rerank-small": 0.5, "rerank-large": 0.5}
LLM_WEIGHTS = {"llm-small": 0.3, "llm-large": 0.7}
CASCADE_THRESHOLD = 0.9
TOP_K = 6  # passages retrieved for the reranker
SMALL_TOP_K = 4  # of which the small reranker looks at the first
CONTEXT = 3  # reranked passages given to the LLM
MAX_QUESTION_CHARS = 1000
# The SLO the pipeline starts with until its owner sets another (PUT /v1/pipelines/rag_answering/slo), read
# off the simulated trade-off on the bench's load (docs/rag.md, "Choosing the objectives"):
# - p95 2 s, p99 4 s: an answer within two seconds; at the bursts it is the large LLM tier (700 ms, 5/s)
#   that breaks them, so they bind: holding the floor inside them costs 10% more than with no latency target.
# - quality floor 0.88 (of the 95% lower bound): a quarter of the questions compare two products, which only
#   the large tier answers reliably, so the floor needs part of the traffic there; 0.90 inside 2 s / 4 s is
#   reachable only at the edge (no config with any margin), 0.88 with some. Without the floor the cheapest
#   configs answer from the reranker alone (quality 0.72).
# - 0.40 USD per 1k: the budget, which the declared defaults (0.52) overrun and configs holding the other
#   objectives meet at 0.20-0.22.
SLO = {"p95_ms": 2000.0, "p99_ms": 4000.0, "error_rate": 0.02, "cost_per_1k": 0.4, "quality_floor": 0.88}
INDEX_FORMAT = 1
INDEX_FILE = "rag-index.npz"
SYSTEM_PROMPT = ("Answer the customer's question from the numbered context passages only. Reply with the one "
                 "sentence of the context that answers it.")


class KnowledgeIndex:
    """The passages and their fp32 embeddings (built once into `models_dir`, reused while current);
    `search` is exact nearest neighbours by cosine, which at this size beats any approximate index."""

    def __init__(self, models_dir: Path, encoder, kb_seed: int = 7):
        self.passages = knowledge.passages(kb_seed)
        self.by_id = {p.id: p for p in self.passages}
        digest = hashlib.sha256(json.dumps([p.text for p in self.passages]).encode())
        digest.update(str(Path(encoder.path).stat().st_size).encode())
        key = f"{INDEX_FORMAT}:{digest.hexdigest()}"
        path = Path(models_dir) / INDEX_FILE
        vectors = None
        if path.is_file():
            try:
                with np.load(path) as stored:
                    if str(stored["key"]) == key:
                        vectors = stored["vectors"]
            except (OSError, ValueError, KeyError):
                vectors = None
        if vectors is None:
            vectors = encoder.encode([p.text for p in self.passages])
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, key=np.array(key), vectors=vectors)
            os.replace(tmp, path)
        self.vectors = np.asarray(vectors, dtype=np.float32)
        # Inverse document frequency of each word over the passages: rare words (model numbers) weigh more.
        counts = Counter(w for p in self.passages for w in set(knowledge.words(p.text)))
        n = len(self.passages)
        self.idf = {w: math.log((n + 1) / (c + 0.5)) for w, c in counts.items()}

    def search(self, vector: np.ndarray, k: int = TOP_K) -> list[tuple[int, float]]:
        scores = self.vectors @ vector
        top = np.argpartition(-scores, min(k, len(scores) - 1))[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i), float(scores[i])) for i in top]


def _softmax_top(scores: np.ndarray, temperature: float) -> float:
    z = (scores - scores.max()) / temperature
    e = np.exp(z)
    return float(e.max() / e.sum())


def _answer(index: KnowledgeIndex, question: str, ranked: list[int], confidence: float, route: str,
            ) -> tuple[dict[str, Any], float]:
    """The extractive answer (the top passage's sentence that best matches the question) and what the
    LLM would be given."""
    top = index.passages[ranked[0]]
    sentence = top.sentences[max(0, knowledge.best_sentence(question, list(top.sentences), index.idf))]
    return ({"answer": knowledge.answer_of(sentence), "source": top.id, "by": route,
             "passages": [index.passages[i].id for i in ranked[:CONTEXT]]}, confidence)


class SmallReranker:
    """The first SMALL_TOP_K candidates' titles through the int8 encoder, blended with the retrieval score;
    one session call per batch (every title of every request in it)."""

    TEMPERATURE = 0.02

    def __init__(self, index: KnowledgeIndex, encoder):
        self.index, self.encoder = index, encoder

    def __call__(self, items: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
        titles = self.encoder.encode([self.index.passages[row].title for it in items
                                      for row, _ in it["candidates"][:SMALL_TOP_K]])
        out, at = [], 0
        for it in items:
            candidates = it["candidates"][:SMALL_TOP_K]
            rows = [row for row, _ in candidates]
            retrieval = np.array([score for _, score in candidates], dtype=np.float32)
            title = titles[at:at + len(rows)] @ it["vector"]
            at += len(rows)
            scores = 0.5 * retrieval + 0.5 * title
            order = np.argsort(-scores, kind="stable")
            out.append(_answer(self.index, it["question"], [rows[j] for j in order],
                               _softmax_top(scores, self.TEMPERATURE), "rerank-small"))
        return out


class LargeReranker:
    """Each candidate's title through the fp32 encoder, the retrieval score, and the question's words found
    in the title weighed by their rarity (a model number is rare, a topic word is not)."""

    TEMPERATURE = 0.05
    LEXICAL = 0.05

    def __init__(self, index: KnowledgeIndex, encoder):
        self.index, self.encoder = index, encoder

    def __call__(self, items: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
        titles = self.encoder.encode([self.index.passages[row].title for it in items for row, _ in it["candidates"]])
        out, at = [], 0
        for it in items:
            asked = set(knowledge.words(it["question"]))
            rows = [row for row, _ in it["candidates"]]
            retrieval = np.array([score for _, score in it["candidates"]], dtype=np.float32)
            title = titles[at:at + len(rows)] @ it["vector"]
            at += len(rows)
            lexical = np.array([sum(self.index.idf.get(w, 0.0) for w in asked & set(knowledge.words(
                self.index.passages[row].title))) for row in rows], dtype=np.float32)
            scores = 0.5 * retrieval + 0.5 * title + self.LEXICAL * lexical
            order = np.argsort(-scores, kind="stable")
            out.append(_answer(self.index, it["question"], [rows[j] for j in order],
                               _softmax_top(scores, self.TEMPERATURE), "rerank-large"))
        return out


class Reader:
    """An LLM tier as the cascade's remote: the prompt in, the fact of the sentence it answers with out."""

    def __init__(self, client: ChatClient):
        self.client = client

    def __call__(self, prompt: str, timeout: float | None = None) -> dict[str, Any]:
        data = self.client.complete([{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": prompt}], timeout=timeout)
        try:
            content = data["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ValueError(f"{self.client.model} answered without choices[0].message") from None
        return {"answer": knowledge.answer_in(content), "by": data.get("model") or self.client.model,
                "text": content[:300]}

    def close(self) -> None:
        self.client.close()


def prompt(task: Task, index: KnowledgeIndex) -> str:
    """Question and context as the LLM reads them (also the answer cache's key)."""
    ranked = task.escalated.get("rerank") or task.data["rerank"]
    context = "\n".join(f"[{n}] {index.by_id[pid].text}" for n, pid in enumerate(ranked["passages"], 1))
    return f"Context:\n{context}\n\nQuestion: {task.data['text']}"


def normalize(task: Task) -> None:
    span = trace.get_current_span()
    text = " ".join(task.text.split())
    span.set_attribute("tracetune.feature.question_length", len(text))
    if not text:
        raise InputError("empty question: nothing to answer")
    if len(text) > MAX_QUESTION_CHARS:
        raise InputError(f"question of {len(text)} characters exceeds the {MAX_QUESTION_CHARS}-character limit")
    task.data["text"] = text


def answer_label(value: Any) -> str | None:
    """A step's answer as the label the ground truth is compared with (`tracetune.prediction`): per route,
    the rerankers' own answers and the tiers' are then known right or wrong, not only the final one."""
    return value.get("answer") if isinstance(value, Mapping) else None


def result(task: Task) -> dict[str, Any]:
    answer = task.data["rerank"]
    local = task.escalated.get("rerank") or answer
    return {"answer": answer.get("answer", ""), "source": local["source"], "by": answer.get("by"),
            "confidence": task.confidence.get("rerank"), "reranker": task.routes.get("rerank"),
            "escalated": "rerank" in task.escalated, "passages": local["passages"]}


def build(index: KnowledgeIndex, embed: Any, rerankers: Mapping[str, Any], *,
          llm: Mapping[str, Any] | None = None, seed: int | None = None,
          tracer: trace.Tracer | None = None) -> Pipeline:
    """The pipeline over a built `index`, `embed(texts) -> vectors` (fp32 encoder), `rerankers` (route ->
    batch function, RERANKERS by default) and `llm` (route -> remote taking the prompt, LLM_TIERS)."""

    def retrieve(task: Task) -> None:
        hits = index.search(np.asarray(task.data["embed"], dtype=np.float32))
        task.data["retrieve"] = hits
        trace.get_current_span().set_attribute("tracetune.feature.retrieval_score", round(hits[0][1], 4))

    rerank_weights = RERANK_WEIGHTS if set(rerankers) == set(RERANKERS) else None
    llm_weights = LLM_WEIGHTS if llm is not None and set(llm) == set(LLM_TIERS) else None
    return Pipeline(NAME, [
        Step("normalize", normalize),
        Infer("embed", {"fp32": lambda texts: list(embed(texts))}, seed=seed,
              batching=Batching(max_size=8, max_wait_ms=5.0), cache=Cache(ttl_seconds=600, max_entries=20_000)),
        Step("retrieve", retrieve),
        Infer("rerank", dict(rerankers), weights=rerank_weights, seed=None if seed is None else seed + 1,
              input=lambda task: {"question": task.data["text"], "candidates": task.data["retrieve"],
                                  "vector": np.asarray(task.data["embed"], dtype=np.float32)},
              batching=Batching(max_size=4, max_wait_ms=10.0), prediction=answer_label),
        Cascade("generate", after="rerank", remote=dict(llm) if llm else None, weights=llm_weights,
                threshold=CASCADE_THRESHOLD, route="llm", input=lambda task: prompt(task, index),
                cache=Cache(enabled=False, ttl_seconds=600, max_entries=20_000),
                seed=None if seed is None else seed + 2, prediction=answer_label),
    ], slo=SLO, result=result, outcome=lambda task: task.data["rerank"].get("answer", ""), tracer=tracer)


def rag_answering(settings: Settings) -> Pipeline:
    """The pipeline as `tracetune executor` runs it: the encoders from `settings.models_dir` (built on
    first use), the knowledge index beside them, the two LLM tiers (`llm_model`, `llm_large_model`)."""
    from tracetune.demo.models import Encoder, build_models

    build_models(settings.models_dir)
    fp32 = Encoder(settings.models_dir, "fp32")
    int8 = Encoder(settings.models_dir, "int8")
    index = KnowledgeIndex(settings.models_dir, fp32)
    llm = {route: Reader(ChatClient(settings.llm_base_url, model, api_key=settings.llm_api_key))
           for route, model in zip(LLM_TIERS, (settings.llm_model, settings.llm_large_model), strict=True)}
    return build(index, fp32.encode, {"rerank-small": SmallReranker(index, int8),
                                      "rerank-large": LargeReranker(index, fp32)}, llm=llm)
