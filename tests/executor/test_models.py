"""The MiniLM encoder and ticket classifier built by `build_models`, run in real onnxruntime sessions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tracetune.demo.corpus import CATEGORIES, generate
from tracetune.demo.models import (
    PUBLISHED_SENTENCES,
    Encoder,
    ModelFilesMissing,
    TicketClassifier,
    build_models,
    model_paths,
    similarities,
)

PARAPHRASES = [
    ("I can't log in to my account", "I am unable to sign in"),
    ("Where is my package? It hasn't arrived yet", "My order still has not been delivered"),
    ("Please cancel my subscription", "I want to end my plan"),
    ("I was charged twice this month", "There are two identical charges on my card"),
    ("The app crashes when I open the reports page", "Opening reports makes the application crash"),
]
UNRELATED = [
    ("I can't log in to my account", "Could you add a dark mode"),
    ("Where is my package? It hasn't arrived yet", "The app crashes when I open the reports page"),
    ("Please cancel my subscription", "How do I change the email on my profile"),
    ("I was charged twice this month", "The weather is lovely today."),
    ("The app crashes when I open the reports page", "My refund has not arrived"),
]


@pytest.fixture(scope="module")
def fp32(models_dir) -> Encoder:
    return Encoder(models_dir, "fp32", threads=2)


@pytest.fixture(scope="module")
def int8(models_dir) -> Encoder:
    return Encoder(models_dir, "int8", threads=2)


@pytest.fixture(scope="module")
def fresh_tickets():
    """Tickets the head never saw: another seed and twice the typos of the training corpus."""
    return generate(400, seed=2024, typo_rate=0.08)


@pytest.fixture(scope="module")
def fresh_predictions(models_dir, fresh_tickets):
    classifier = TicketClassifier(models_dir, "fp32", threads=2)
    return classifier.predict([t.text for t in fresh_tickets])


def test_fp32_encoder_reproduces_the_published_similarities(fp32):
    embeddings = fp32.encode(PUBLISHED_SENTENCES)
    assert embeddings.shape == (3, 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    sims = similarities(embeddings)
    assert sims["1-2"] == pytest.approx(0.6660, abs=1e-3)
    assert sims["1-3"] == pytest.approx(0.1046, abs=1e-3)
    assert sims["2-3"] == pytest.approx(0.1411, abs=1e-3)


def test_encoder_graph_is_standard_opset_17_with_pooling_inside(models_dir):
    model = onnx.load(str(model_paths(models_dir)["fp32"][0]))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert {n.domain for n in model.graph.node} == {""}  # no contrib ops: any ONNX runtime can run it
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["embeddings"]
    ops = {n.op_type for n in model.graph.node}
    assert {"CumSum", "Erf", "LayerNormalization", "ReduceSum", "ReduceL2"} <= ops and "Range" not in ops


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_paraphrases_score_clearly_above_unrelated_pairs(variant, fp32, int8):
    encoder = fp32 if variant == "fp32" else int8

    def cosine(pairs):
        left = encoder.encode([a for a, _ in pairs])
        right = encoder.encode([b for _, b in pairs])
        return np.sum(left * right, axis=1)

    same, other = cosine(PARAPHRASES), cosine(UNRELATED)
    assert (same > other + 0.1).all(), (same, other)  # pairwise: each sentence is closer to its paraphrase
    assert same.mean() - other.mean() > 0.4


def test_int8_agrees_with_fp32_on_tickets(fp32, int8, models_dir):
    texts = [t.text for t in generate(200, seed=31, typo_rate=0.04)]
    a, b = fp32.encode(texts), int8.encode(texts)
    cosine = np.sum(a * b, axis=1)
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.9
    meta = json.loads(model_paths(models_dir)["int8"][1].read_text())["agreement_with_fp32"]
    assert meta["mean_cosine"] >= 0.98 and meta["nearest_neighbour_agreement"] >= 0.8
    assert int8.path.stat().st_size < fp32.path.stat().st_size / 3


def test_batch_results_equal_one_by_one_results(fp32, int8):
    texts = ["refund please", "Where is my order #48213?", "word " * 300,
             *[t.text for t in generate(20, seed=8)]]
    batch = fp32.encode(texts)
    alone = np.vstack([fp32.encode([t]) for t in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-5)  # padding and neighbours change nothing
    # int8 activations are quantized with one scale per batch tensor, so a batch's other rows shift
    # each row's result a little: close, not equal.
    cosine = np.sum(int8.encode(texts) * np.vstack([int8.encode([t]) for t in texts]), axis=1)
    assert cosine.min() > 0.95


def test_tokenize_pads_to_the_longest_and_truncates_at_max_tokens(fp32):
    ids, mask = fp32.tokenize(["hi", "hello there team"])
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (2, 5)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert ids[0, 0] == 101 and ids[0, 2] == 102 and ids[0, 3] == 0  # [CLS] hi [SEP] [PAD]
    assert fp32.token_lengths(["hi", "word " * 300]) == [3, 128]
    assert fp32.encode([]).shape == (0, 384)


def test_classifier_metadata_and_held_out_accuracy_on_a_fresh_seed(models_dir, fresh_tickets, fresh_predictions):
    classifier = TicketClassifier(models_dir, "fp32")
    assert classifier.labels == CATEGORIES and classifier.meta["labels"] == CATEGORIES
    assert classifier.variant == "fp32"
    recorded = classifier.meta["held_out_accuracy"]
    assert 0.85 <= recorded <= 0.98  # realistic: high, but the corpus has genuinely ambiguous tickets
    accuracy = np.mean([label == t.category for (label, _), t in zip(fresh_predictions, fresh_tickets, strict=True)])
    assert 0.83 <= accuracy <= 0.98 and abs(accuracy - recorded) < 0.07
    assert all(label in CATEGORIES and 0.0 < confidence <= 1.0 for label, confidence in fresh_predictions)


def test_low_confidence_predictions_are_wrong_more_often(fresh_tickets, fresh_predictions):
    confidence = np.array([c for _, c in fresh_predictions])
    correct = np.array([label == t.category for (label, _), t in zip(fresh_predictions, fresh_tickets, strict=True)])
    order = np.argsort(confidence)
    quarter = len(order) // 4
    low, high = correct[order[:quarter]].mean(), correct[order[-quarter:]].mean()
    assert high >= 0.95 and low < high - 0.15, (low, high)


def test_int8_classifier_mostly_agrees_with_fp32(models_dir, fresh_tickets, fresh_predictions):
    classifier = TicketClassifier(models_dir, "int8", threads=2)
    assert classifier.variant == "int8" and 0.8 <= classifier.meta["held_out_accuracy"] <= 0.98
    texts = [t.text for t in fresh_tickets[:150]]
    same = np.mean([a[0] == b[0] for a, b in zip(classifier.predict(texts), fresh_predictions[:150], strict=True)])
    assert same >= 0.93
    assert classifier.token_lengths(["hi", "word " * 300]) == [3, 128]
    assert classifier.predict([]) == []


def test_build_models_reuses_what_is_there(models_dir):
    files = sorted(p for p in models_dir.iterdir() if p.is_file())
    before = {p.name: p.stat().st_mtime_ns for p in files}
    report = build_models(models_dir, progress=True)
    assert report["built"] == [] and sorted(report["reused"]) == sorted(model_paths(models_dir))
    assert {p.name: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p.name for p in models_dir.iterdir()) == sorted(before)  # no temporary files left behind
    assert json.loads(json.dumps(report)) == report
    assert report["published_similarities"]["fp32"]["1-2"] == pytest.approx(0.6660, abs=1e-3)
    assert report["int8_agreement"]["mean_cosine"] >= 0.98
    assert 0.85 <= report["classifier"]["held_out_accuracy"] <= 0.98


def test_unknown_variant_and_missing_models_fail_with_a_clear_message(models_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown encoder variant 'fp16'"):
        Encoder(models_dir, "fp16")
    with pytest.raises(ModelFilesMissing, match="tracetune models build"):
        TicketClassifier(tmp_path)
