"""Facts in text, normalized so that two ways of writing the same fact compare equal.

The grounded-answer verifier checks a draft's facts against its evidence, and `llmos eval
answers` matches expected facts and finds unsupported ones, with the same rules: lower case,
Markdown marks dropped, number words as digits ("three years" is "3 years"), euro amounts as
"N eur" ("€14" is "14 EUR"); facts are numbers, times, e-mail addresses, phone numbers and
proper names.
"""

from __future__ import annotations

import re

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from llmos.text import plain

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
    "once": 1, "twice": 2, "single": 1, "double": 2, "half": 0.5,
}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_CURRENCY_BEFORE = re.compile(r"(?:€|\beuros?\b|\beur\b)\s*(\d+(?:[.,]\d+)?)")
_CURRENCY_AFTER = re.compile(r"(?<=\d)\s*(?:€|euros?\b)")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"\+?\d[\d ()-]{6,}\d")
_TIME = re.compile(r"\b\d{1,2}:\d{2}\b|\b\d{1,2}\s?(?:am|pm)\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_WORD = re.compile(r"[a-z0-9]+")
# A capitalized word that is not the first of its sentence or clause is a name ("Hamburg", "Klarna").
_NAME = re.compile(r"(?<=[a-z0-9,;)] )[A-Z][a-zA-Z]+(?:[- ][A-Z][a-zA-Z]+)*")
NOT_NAMES = frozenset({"I", "EUR", "EU", "ID", "PIN", "VAT", "PDF", "OK"})
STOP_WORDS = ENGLISH_STOP_WORDS | {"s", "t", "don", "doesn", "northwind", "outfitters", "want", "need", "know", "tell", "please"}


def normalize(text: str) -> str:
    """Lower case, Markdown marks dropped, number words as digits, euro amounts as "N eur"."""
    text = plain(text).lower()
    text = _NUMBER_WORD.sub(lambda match: digits(NUMBER_WORDS[match.group(1).lower()]), text)
    text = _CURRENCY_BEFORE.sub(r"\1 eur", text)
    text = _CURRENCY_AFTER.sub(" eur", text)
    return " ".join(text.split())


def digits(value: float) -> str:
    """A number as written in normalized text: 3, 4.9."""
    return str(int(value)) if float(value).is_integer() else str(value)


def facts(text: str) -> set[str]:
    """The checkable facts of `text`, normalized: numbers, times, e-mails, phone numbers, names."""
    text = " ".join(text.split())  # a name after a line break is still a name
    found: set[str] = set()
    for email in _EMAIL.findall(text):
        found.add(email.lower().rstrip("."))
        text = text.replace(email, " ")
    for phone in _PHONE.findall(text):
        number = re.sub(r"\D", "", phone)
        if len(number) >= 7:
            found.add(f"tel:{number}")
            text = text.replace(phone, " ")
    for name in _NAME.findall(plain(text)):
        if name not in NOT_NAMES and name.lower() not in STOP_WORDS:
            found.add(_stem(name.lower()))
    normalized = normalize(text)
    for time_of_day in _TIME.findall(normalized):
        found.add(time_of_day.replace(" ", ""))
        normalized = normalized.replace(time_of_day, " ")
    for number in _NUMBER.findall(normalized):
        value = float(number.replace(",", "."))
        found.add(digits(value))
    return found


def content_words(text: str) -> set[str]:
    """Lower-case words that carry meaning, crudely stemmed so "returns" meets "returned"."""
    return {_stem(word) for word in _WORD.findall(normalize(text)) if word not in STOP_WORDS}


def support(claim: set[str], source: set[str]) -> float:
    """Share of a sentence's content words (`claim`) found in a source sentence's."""
    return len(claim & source) / len(claim) if claim else 1.0


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word
