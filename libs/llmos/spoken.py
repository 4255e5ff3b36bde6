"""Written text as a person says it: lower case, numbers as words, symbols dropped.

Speech recognition transcribes what is said, so the speech service builds its domain language
models from this form, and the WER evaluation compares transcripts with references in it.
"""

from __future__ import annotations

import re
import unicodedata

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1000, "thousand"), (100, "hundred"))
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[a-z]+(?:'[a-z]+)?")
_MAX_DIGITS = 12  # longer digit runs (ids, phone numbers) are read digit by digit


def number_words(value: int) -> list[str]:
    """English words for a non-negative integer, as a person reads it."""
    if value < 20:
        return [_ONES[value]]
    if value < 100:
        tens, ones = divmod(value, 10)
        return [_TENS[tens]] + ([_ONES[ones]] if ones else [])
    for scale, name in _SCALES:
        if value >= scale:
            high, rest = divmod(value, scale)
            return number_words(high) + [name] + (number_words(rest) if rest else [])
    raise AssertionError("unreachable")


def _integer_words(digits: str) -> list[str]:
    if len(digits) > _MAX_DIGITS or (len(digits) > 1 and digits.startswith("0")):
        return [_ONES[int(d)] for d in digits]
    return number_words(int(digits))


def _number_token(token: str) -> list[str]:
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", token):
        token = token.replace(",", "")  # thousands separators
    whole, dot, fraction = token.partition(".")
    if "," in token or "." in fraction:  # a list such as 1,2 or a version such as 1.2.3
        return [word for part in re.split(r"[.,]", token) for word in _integer_words(part)]
    return _integer_words(whole) + (["point"] + [_ONES[int(d)] for d in fraction] if dot else [])


def spoken_words(text: str) -> list[str]:
    """The words of `text` as they would be spoken and transcribed."""
    folded = unicodedata.normalize("NFKC", text).lower().replace("’", "'").replace("%", " percent ")
    words: list[str] = []
    for token in _TOKEN.findall(folded.replace("&", " and ")):
        words.extend(_number_token(token) if token[0].isdigit() else [token])
    return words
