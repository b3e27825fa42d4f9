"""A generated support-ticket corpus with ground-truth labels (no data download).

Varied templates, fillers, typos and lengths per category, reproducible from a seed. The demo load
draws from it, and the classifier is trained on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CATEGORIES = ["billing", "login", "shipping", "refund", "bug", "account", "feature_request", "cancellation"]

_TEMPLATES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {plan} subscription this month",
        "why is my invoice {amount} higher than last month",
        "the {card} card on file was billed but the payment shows as failed",
        "please explain the extra fee on invoice {order}",
        "my bill says {amount} but the plan costs less",
        "tax was added to my invoice even though we are exempt",
        "can I get a copy of the receipt for the {plan} plan charge",
    ],
    "login": [
        "I can't log in, the password reset email never arrives",
        "two factor code is rejected every time I sign in",
        "my account is locked after too many login attempts",
        "single sign on with {sso} fails with an error page",
        "the login page keeps redirecting me back to sign in",
        "forgot my password and the reset link has expired",
        "authenticator app lost, how do I get into my account",
    ],
    "shipping": [
        "my order {order} has not arrived and tracking has not moved in {days} days",
        "the package was delivered to the wrong address",
        "when will order {order} ship, it says processing",
        "tracking number for {order} does not work on the courier site",
        "parcel arrived damaged, the box was crushed",
        "can I change the delivery address for order {order}",
        "shipment is stuck in customs for {days} days",
    ],
    "refund": [
        "I returned the item {days} days ago and still no refund",
        "please refund order {order}, it was not what I ordered",
        "how long does a refund take to reach my {card} card",
        "refund was approved but the money is not back",
        "I want my money back for the {plan} plan I never used",
        "partial refund only covered half of order {order}",
    ],
    "bug": [
        "the app crashes when I open the {feature} screen",
        "export to csv produces an empty file",
        "error 500 when saving changes in {feature}",
        "the {feature} page is blank on {browser}",
        "notifications stopped working after the last update",
        "search returns results from other workspaces, looks like a bug",
        "the dashboard graph shows wrong numbers since yesterday",
    ],
    "account": [
        "how do I change the email address on my account",
        "please merge my two accounts into one",
        "I need to add {count} more seats for my team",
        "update the company name shown on our profile",
        "transfer account ownership to a colleague",
        "how do I delete a user from our workspace",
    ],
    "feature_request": [
        "it would be great if {feature} supported dark mode",
        "please add an api endpoint for {feature}",
        "can you add export to excel for reports",
        "feature request: let us schedule {feature} weekly",
        "we would love integration with {sso} for {feature}",
        "suggestion: bulk edit for {feature} would save us hours",
    ],
    "cancellation": [
        "please cancel my {plan} subscription at the end of the term",
        "how do I close my account and stop all payments",
        "I want to cancel, the product is too expensive for us",
        "cancel the renewal of our {plan} plan",
        "we are moving to another vendor, please end our contract",
        "stop auto renew and cancel my membership",
    ],
}

_FILLERS = {
    "plan": ["pro", "basic", "team", "enterprise", "annual", "monthly"],
    "amount": ["$20", "$49.99", "twice", "15%", "$300"],
    "card": ["visa", "mastercard", "amex", "debit", "credit"],
    "order": ["#48213", "#10022", "A-5531", "#99120", "order 7781"],
    "days": ["3", "5", "10", "14", "two", "several"],
    "sso": ["okta", "google", "azure ad", "github"],
    "feature": ["reports", "calendar", "invoices", "settings", "analytics", "projects"],
    "browser": ["safari", "chrome", "firefox", "edge"],
    "count": ["3", "10", "25", "two"],
}

_OPENERS = ["", "", "hi,", "hello team,", "urgent:", "hey", "good morning,", "please help:"]
_CLOSERS = ["", "", "thanks", "thank you!", "asap please", "regards", "this is frustrating", "cheers"]
_CONTEXT = [
    "I have been a customer for {days} years.",
    "this is the second time this happens.",
    "my manager is asking about it.",
    "we use the {plan} plan across the company.",
    "I tried on {browser} and on my phone.",
    "nothing in the help center explains it.",
]


@dataclass(frozen=True)
class Ticket:
    text: str
    category: str


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    op = rng.random()
    if op < 0.4:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swap
    if op < 0.7:
        return word[:i] + word[i + 1:]  # drop
    return word[:i] + word[i] + word[i:]  # double


def _fill(template: str, rng: random.Random) -> str:
    out = template
    for key, values in _FILLERS.items():
        token = "{" + key + "}"
        while token in out:
            out = out.replace(token, rng.choice(values), 1)
    return out


def make_ticket(rng: random.Random, category: str | None = None, typo_rate: float = 0.04) -> Ticket:
    category = category or rng.choice(CATEGORIES)
    parts = [rng.choice(_OPENERS), _fill(rng.choice(_TEMPLATES[category]), rng)]
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        parts.append(_fill(rng.choice(_CONTEXT), rng))
    parts.append(rng.choice(_CLOSERS))
    words = " ".join(p for p in parts if p).split()
    words = [_typo(w, rng) if rng.random() < typo_rate else w for w in words]
    text = " ".join(words)
    if rng.random() < 0.3:
        text = text.capitalize()
    return Ticket(text=text, category=category)


def generate(n: int, seed: int = 7, typo_rate: float = 0.04) -> list[Ticket]:
    rng = random.Random(seed)
    return [make_ticket(rng, typo_rate=typo_rate) for _ in range(n)]
