"""MiniLM encoder speed, fp32 against int8: texts/s and per-batch latency at batch 1, 8 and 32.

Runs both variants on the same generated tickets (tokenized up front, so only onnxruntime is timed),
in batches of consecutive tickets (as a batcher without length bucketing forms them: each batch pads
to its longest ticket) and in length-sorted batches (what bucketing approaches), and reports
how closely int8 follows fp32 (cosine of each ticket's two embeddings, same nearest neighbour,
same predicted category).

    .venv/bin/python bench/models.py                  # threads=1, 512 tickets
    .venv/bin/python bench/models.py --threads 2 --tickets 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracetune.demo.corpus import generate  # noqa: E402
from tracetune.demo.models import TicketClassifier, build_models  # noqa: E402


def time_batches(classifier: TicketClassifier, texts: list[str], batch: int, rounds: int) -> list[float]:
    """Seconds per session call, for every batch in every round (after one warm-up pass)."""
    batches = [classifier.tokenize(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    for ids, mask in batches[:3]:
        classifier.encoder.run(ids, mask)
    out = []
    for _ in range(rounds):
        for ids, mask in batches:
            started = time.perf_counter()
            classifier.encoder.run(ids, mask)
            out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=None, help="built models (default: a temp build)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tickets", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    console = Console()

    with tempfile.TemporaryDirectory() as tmp:
        models_dir = args.models_dir or Path(tmp)
        build_models(models_dir, progress=True)
        texts = [t.text for t in generate(args.tickets, seed=77)]
        classifiers = {v: TicketClassifier(models_dir, v, threads=args.threads) for v in ("fp32", "int8")}
        lengths = classifiers["fp32"].token_lengths(texts)

        table = Table(title=f"MiniLM encoder, {args.threads} thread(s), {len(texts)} tickets "
                            f"(mean {statistics.mean(lengths):.0f} tokens, max {max(lengths)})")
        for column in ("batch", "order", "variant", "texts/s", "p50 ms", "p95 ms", "int8 x"):
            table.add_column(column, justify="right")
        by_length = [texts[i] for i in np.argsort(lengths, kind="stable")]
        runs = [(1, "-", texts), (8, "arrival", texts), (8, "by length", by_length),
                (32, "arrival", texts), (32, "by length", by_length)]
        for batch, order, ordered in runs:
            rates = {}
            for variant, classifier in classifiers.items():
                seconds = time_batches(classifier, ordered, batch, args.rounds)
                rates[variant] = args.rounds * len(texts) / sum(seconds)
                p50, p95 = np.percentile(seconds, [50, 95]) * 1000
                speedup = f"{rates['int8'] / rates['fp32']:.2f}x" if variant == "int8" else ""
                table.add_row(str(batch), order, variant, f"{rates[variant]:.0f}", f"{p50:.1f}", f"{p95:.1f}",
                              speedup)
            table.add_section()
        console.print(table)

        fp32 = classifiers["fp32"].encoder.encode(texts)
        int8 = classifiers["int8"].encoder.encode(texts)
        cosine = np.sum(fp32 * int8, axis=1)

        def neighbours(e: np.ndarray) -> np.ndarray:
            sim = e @ e.T
            np.fill_diagonal(sim, -np.inf)
            return sim.argmax(axis=1)

        labels = {v: [label for label, _ in c.predict(texts)] for v, c in classifiers.items()}
        agreement = Table(title="int8 against fp32")
        agreement.add_column("measure")
        agreement.add_column("value", justify="right")
        agreement.add_row("mean cosine", f"{cosine.mean():.4f}")
        agreement.add_row("min cosine", f"{cosine.min():.4f}")
        agreement.add_row("same nearest neighbour", f"{np.mean(neighbours(fp32) == neighbours(int8)):.1%}")
        agreement.add_row("same predicted category", f"{np.mean(np.equal(labels['fp32'], labels['int8'])):.1%}")
        console.print(agreement)


if __name__ == "__main__":
    main()
