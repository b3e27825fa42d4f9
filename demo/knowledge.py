"""A generated product knowledge base and the questions customers ask about it (no data download).

Sixteen products in four families whose names differ only by a model number ("Falcon 200",
"Falcon 300", ...) and twelve topics each: 192 passages of three sentences (the fact, a related fact of
the same product, a general remark). Every fact is a number with a unit ("14 hours"), and each
question has one right answer, the fact it asks about. Questions paraphrase the topic (some never
name it) and always name the product, so a sentence encoder alone confuses siblings: retrieval by
embeddings gets the family and topic right far more often than the model number, which is what a
reranker (and a better LLM reading the context) is for. Reproducible from a seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FAMILIES = ("Falcon", "Heron", "Osprey", "Kestrel")
MODEL_NUMBERS = ("100", "200", "300", "500")
PRODUCTS = tuple(f"{family} {number}" for family in FAMILIES for number in MODEL_NUMBERS)

# topic -> (title, unit, value range, fact sentence, question paraphrases). `{p}` is the product, `{v}` the
# value with its unit. Paraphrases marked with a leading "~" avoid the topic's own words.
_TOPICS: dict[str, tuple[str, str, tuple[int, int], str, tuple[str, ...]]] = {
    "battery": ("battery life", "hours", (6, 40), "The {p} runs for {v} on a full battery.", (
        "What is the battery life of the {p}?", "How many hours does the {p} last on one charge?",
        "~how long will my {p} keep going before it dies", "Battery life of {p}?")),
    "charging": ("charging time", "minutes", (30, 240), "A full recharge of the {p} takes {v}.", (
        "How long does the {p} take to charge?", "What is the charging time of the {p}?",
        "~how long do i leave the {p} plugged in until it is full", "{p} recharge time")),
    "warranty": ("warranty", "months", (6, 60), "The {p} comes with a warranty of {v}.", (
        "How long is the warranty on the {p}?", "What warranty period does the {p} have?",
        "~if my {p} breaks after a while am i still covered, for how long", "{p} warranty length")),
    "returns": ("returns", "days", (14, 90), "An unused {p} can be returned within {v} of delivery.", (
        "How many days do I have to return the {p}?", "What is the return window for the {p}?",
        "~i changed my mind about the {p}, how long can i still send it back", "{p} return policy days")),
    "reset": ("factory reset", "seconds", (5, 30), "To factory reset the {p}, hold the power button for {v}.", (
        "How do I factory reset the {p}?", "How long do I hold the button to reset the {p}?",
        "~my {p} is stuck, how long should i press power to wipe it", "reset {p} button hold time")),
    "users": ("user limit", "users", (2, 250), "Up to {v} can share one {p} at the same time.", (
        "How many users can share the {p}?", "What is the maximum number of users on the {p}?",
        "~can my whole team use one {p} at once, how many people", "{p} max users")),
    "storage": ("storage", "GB", (16, 2048), "The {p} stores up to {v} of data.", (
        "How much storage does the {p} have?", "What is the storage capacity of the {p}?",
        "~how much data fits on the {p}", "{p} capacity in GB")),
    "weight": ("weight", "grams", (150, 4000), "The {p} weighs {v} without its stand.", (
        "How much does the {p} weigh?", "What is the weight of the {p}?",
        "~is the {p} heavy, what does it come to on a scale", "{p} weight grams")),
    "power": ("power draw", "watts", (3, 400), "Under full load the {p} draws {v} from the wall.", (
        "How much power does the {p} draw?", "What is the power consumption of the {p}?",
        "~what will the {p} do to my electricity bill, how much does it pull", "{p} wattage")),
    "range": ("wireless range", "metres", (5, 120), "The {p} keeps a wireless link up to {v} away.", (
        "What is the wireless range of the {p}?", "How far can I be from the {p} and stay connected?",
        "~will the {p} signal reach the far end of my house, what distance", "{p} range in metres")),
    "noise": ("noise level", "decibels", (18, 65), "At full speed the {p} is as loud as {v}.", (
        "How loud is the {p}?", "What is the noise level of the {p}?",
        "~will the {p} keep me awake at night, how quiet is it", "{p} decibels")),
    "support": ("support plan", "dollars", (5, 300), "Priority support for the {p} costs {v} a year.", (
        "How much does priority support for the {p} cost?", "What is the price of the {p} support plan?",
        "~what do i pay each year to get faster help with my {p}", "{p} support price")),
}
TOPICS = tuple(_TOPICS)
# The related fact each passage also states (same product), and the remark it ends on.
_RELATED = {"battery": "charging", "charging": "battery", "warranty": "returns", "returns": "warranty",
            "reset": "users", "users": "storage", "storage": "users", "weight": "power", "power": "noise",
            "range": "power", "noise": "power", "support": "warranty"}
# What a family's passages all say: shared text, so an encoder sees siblings as near-identical.
_FAMILY = {
    "Falcon": "The Falcon line is assembled in Porto and every model in it shares the same charger and case.",
    "Heron": "The Heron line is assembled in Gdansk and every model in it shares the same charger and case.",
    "Osprey": "The Osprey line is assembled in Tallinn and every model in it shares the same charger and case.",
    "Kestrel": "The Kestrel line is assembled in Brno and every model in it shares the same charger and case.",
}
_REMARKS = {
    "battery": "Battery life depends on screen brightness and wireless use.",
    "charging": "Use the supplied adapter; slower chargers work but take longer.",
    "warranty": "Keep the receipt: it is needed for every warranty claim.",
    "returns": "Returned items must come back in their original packaging.",
    "reset": "A reset erases every setting and paired device.",
    "users": "Each person signs in with their own account.",
    "storage": "Part of the storage is reserved for system updates.",
    "weight": "The stand adds a little weight and can be removed.",
    "power": "Standby power is far lower than the figure at full load.",
    "range": "Walls and metal furniture shorten the range.",
    "noise": "A quiet mode lowers the fan speed at night.",
    "support": "Standard email support is included at no charge.",
}
UNITS = tuple(sorted({topic[1] for topic in _TOPICS.values()}))
# A fact's value: a number and its unit; the one pattern the pipeline and the LLM stand-in read answers with.
VALUE = re.compile(r"\b\d+ (?:" + "|".join(UNITS) + r")\b")
_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset("a an the of on to for in is it my i do does how what much many long can with at and or "
                      "be by from this that will me there are one up its it's".split())


@dataclass(frozen=True)
class Passage:
    """One knowledge-base entry: `id` is "product/topic"; `sentences[0]` states its fact."""

    id: str
    product: str
    topic: str
    title: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.title}. " + " ".join(self.sentences)


@dataclass(frozen=True)
class Question:
    text: str
    answer: str  # the value ("14 hours"), or for a comparison the product ("Falcon 300")
    passage_id: str  # the passage that answers it (for a comparison, the first product's)
    kind: str = "fact"  # or "compare": two products, answered by reading both passages


# A share of customers compare two models of one family: no single sentence answers that, so an
# extractive answer is wrong and a reader (the LLM) has to weigh both passages.
COMPARE_SHARE = 0.25
_COMPARE = ("Which has the higher {t}, the {a} or the {b}?", "Between the {a} and the {b}, which has more {t}?",
            "{a} or {b}: which one has the bigger {t}?")


def facts(seed: int = 7) -> dict[tuple[str, str], str]:
    """The value of every (product, topic), e.g. ("Falcon 300", "battery") -> "14 hours"."""
    rng = random.Random(seed)
    return {(product, topic): f"{rng.randint(*spec[2])} {spec[1]}"
            for product in PRODUCTS for topic, spec in _TOPICS.items()}


def passages(seed: int = 7) -> list[Passage]:
    """The knowledge base, in a fixed order (its row numbers index the embedding matrix)."""
    values = facts(seed)
    out = []
    for product in PRODUCTS:
        for topic, (title, _, _, fact, _) in _TOPICS.items():
            related = _RELATED[topic]
            sentences = (fact.format(p=product, v=values[product, topic]),
                         _TOPICS[related][3].format(p=product, v=values[product, related]),
                         _REMARKS[topic], _FAMILY[product.split()[0]])
            out.append(Passage(f"{product}/{topic}", product, topic, f"{product} {title}", sentences))
    return out


def make_question(rng: random.Random, values: dict[tuple[str, str], str]) -> Question:
    """One customer question with its answer: a product, a topic and one of its phrasings, or (a
    COMPARE_SHARE of them) two products of one family and a topic."""
    if rng.random() < COMPARE_SHARE:
        family = rng.choice(FAMILIES)
        a, b = rng.sample([f"{family} {n}" for n in MODEL_NUMBERS], 2)
        topic = rng.choice(TOPICS)
        while values[a, topic] == values[b, topic]:
            a, b = rng.sample([f"{family} {n}" for n in MODEL_NUMBERS], 2)
        winner = max((a, b), key=lambda p: int(values[p, topic].split()[0]))
        text = rng.choice(_COMPARE).format(t=_TOPICS[topic][0], a=a, b=b)
        return Question(text, winner, f"{a}/{topic}", "compare")
    product, topic = rng.choice(PRODUCTS), rng.choice(TOPICS)
    phrasing = rng.choice(_TOPICS[topic][4]).lstrip("~")
    text = phrasing.format(p=product if rng.random() < 0.8 else product.lower())
    return Question(text, values[product, topic], f"{product}/{topic}")


def questions(n: int, seed: int = 1, kb_seed: int = 7) -> list[Question]:
    rng = random.Random(seed)
    values = facts(kb_seed)
    return [make_question(rng, values) for _ in range(n)]


def words(text: str) -> list[str]:
    """Lower-cased words without stopwords: what lexical overlap counts."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


_PRODUCT = re.compile(r"\b(?:" + "|".join(FAMILIES) + r") (?:" + "|".join(MODEL_NUMBERS) + r")\b", re.I)


def answer_of(sentence: str) -> str:
    """The fact a sentence states (its first number and unit), or "" when it states none."""
    found = VALUE.search(sentence)
    return found.group(0) if found else ""


def answer_in(text: str) -> str:
    """What a reader's reply answers: the fact it states, else the product it names ("" for neither)."""
    if fact := answer_of(text):
        return fact
    found = _PRODUCT.search(text)
    return found.group(0).title() if found else ""


def products_in(text: str) -> list[str]:
    """The products a text names, in order, each once."""
    return list(dict.fromkeys(m.group(0).title() for m in _PRODUCT.finditer(text)))


def best_sentence(question: str, sentences: list[str], weights: dict[str, float] | None = None) -> int:
    """Index of the sentence stating a fact that shares the most (weighted) question words: a reader's
    extractive pick (the first such sentence on a tie; -1 when no sentence states a fact)."""
    asked = set(words(question))
    stating = [i for i, s in enumerate(sentences) if answer_of(s)]
    scores = {i: sum((weights or {}).get(w, 1.0) for w in set(words(sentences[i])) & asked) for i in stating}
    return max(stating, key=lambda i: (scores[i], -i)) if stating else -1
