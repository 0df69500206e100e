"""Answer quality Q: GSM8K Pass@1 with numeric answer extraction.

GSM8K (Cobbe et al., 2021; MIT licence, shipped in ``agent/data/gsm8k/``) gives each test item a
worked solution ending in ``#### <number>``. A model's response is correct when the last number
it writes equals that number as a number: ``$1,234.50`` and ``1234.5`` match, ``18`` and
``18.0`` match. Pass@1 is the share of items answered correctly with one greedy attempt.

The default evaluation set follows the paper (arXiv 2505.16508): 100 questions stratified by
question length, so short and long problems are equally represented; the sample is fixed by a
seed so runs on different devices score the same questions.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources

DEFAULT_SAMPLE = 100
DEFAULT_SEED = 2505  # arXiv 2505.16508

SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem step by step, then write the final "
    "answer as a single number on the last line."
)

# A number as people write it: optional sign and currency, thousands separators, decimals.
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@dataclass(frozen=True)
class GsmItem:
    """One GSM8K test item.

    Attributes:
        index: Line number in the test split (0-based), a stable id.
        question: The problem text.
        solution: The reference worked solution.
        answer: The reference final number.
    """

    index: int
    question: str
    solution: str
    answer: Decimal


def parse_number(text: str) -> Decimal | None:
    """Parse one number as written (``$1,234.50``, ``-3``, ``18.``); None if not a number."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not cleaned or cleaned in ("-", "."):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_answer(text: str) -> Decimal | None:
    """The final number in a model's response, or None when it wrote no number.

    A ``####`` marker, when present, is honoured (the model imitated the dataset's format);
    otherwise the last number in the text is the answer.
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(tail)
        if found:
            return parse_number(found[0])
    found = _NUMBER.findall(text)
    for candidate in reversed(found):
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def is_correct(response: str, item: GsmItem) -> bool:
    """True when the response's final number equals the reference answer numerically."""
    predicted = extract_answer(response)
    return predicted is not None and predicted == item.answer


def load_gsm8k() -> list[GsmItem]:
    """Load the 1,319-item GSM8K test split shipped with the package."""
    data = resources.files("agent").joinpath("data/gsm8k/test.jsonl").read_text("utf-8")
    items = []
    for index, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        answer = parse_number(row["answer"].rsplit("####", 1)[1].strip())
        if answer is None:
            raise ValueError(f"GSM8K line {index + 1}: no numeric answer after ####")
        items.append(GsmItem(index, row["question"], row["answer"], answer))
    return items


def stratified_sample(items: list[GsmItem], n: int = DEFAULT_SAMPLE,
                      seed: int = DEFAULT_SEED) -> list[GsmItem]:
    """Pick ``n`` items stratified by question length (characters), deterministically.

    Items are sorted by (length, index) and cut into ``n`` strata of near-equal size; one item
    is drawn from each with a seeded generator. Uses only ``Random.random()``, whose sequence is
    stable across Python versions. ``n >= len(items)`` returns every item in index order.
    """
    if n <= 0:
        raise ValueError("sample size must be positive")
    if n >= len(items):
        return sorted(items, key=lambda it: it.index)
    ordered = sorted(items, key=lambda it: (len(it.question), it.index))
    rng = random.Random(seed)
    picked = []
    for k in range(n):
        lo = k * len(ordered) // n
        hi = (k + 1) * len(ordered) // n
        picked.append(ordered[lo + int(rng.random() * (hi - lo))])
    return picked


def select_items(limit: int | None = None, full: bool = False,
                 seed: int = DEFAULT_SEED) -> list[GsmItem]:
    """The evaluation set: the full split, the stratified 100, or the first ``limit`` of those."""
    items = load_gsm8k()
    chosen = items if full else stratified_sample(items, DEFAULT_SAMPLE, seed)
    return chosen[:limit] if limit is not None else chosen


def messages_for(item: GsmItem) -> tuple[dict[str, str], ...]:
    """Zero-shot chat prompt for one item."""
    return ({"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": item.question})
