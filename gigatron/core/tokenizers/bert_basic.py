"""Google BERT's basic tokenizer over whole texts, with C-level string operations.

Google's code walks every character in Python; the same result is computed here with a few
whole-text operations: a translation table drops NUL, U+FFFD and control characters and turns
whitespace into spaces; ``str.lower`` and NFD normalisation with combining marks (category Mn)
removed strip accents (lower-case variant); one regular expression then yields the words: every
punctuation character and every CJK ideograph alone, and runs of other non-space characters.
Character classes come from Python's ``unicodedata`` with Google's definitions, so they agree
with Google's tokenizer character for character. WordPiece then runs once per distinct word.

Per-token order of operations in Google's code (clean, isolate CJK, split on whitespace,
lower-case and strip accents per word, split on punctuation) gives the same words as these
whole-text steps: lower-casing and NFD never create or remove whitespace, punctuation or CJK
characters other than those already isolated.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache

_CJK_RANGES = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]


def _ranges_to_class(codepoints: list) -> str:
    """A regex character-class body for a sorted list of code points."""
    parts, start, prev = [], None, None
    for cp in codepoints:
        if start is None:
            start = prev = cp
        elif cp == prev + 1:
            prev = cp
        else:
            parts.append((start, prev))
            start = prev = cp
    if start is not None:
        parts.append((start, prev))
    out = []
    for a, b in parts:
        out.append(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}")
    return "".join(out)


@lru_cache(maxsize=None)
def tables():
    """(cleanup translation table, accent-mark regex, word regex), built once per process."""
    drop, to_space, punct, marks = [], [], [], []
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if ch in " \t\n\r" or cat == "Zs":          # Google's _is_whitespace
            to_space.append(cp)
        elif cp in (0, 0xFFFD) or cat.startswith("C"):  # _clean_text drop + _is_control
            drop.append(cp)
        if (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126) or cat.startswith("P"):
            punct.append(cp)
        if cat == "Mn":
            marks.append(cp)
    table = {cp: None for cp in drop}
    table.update({cp: " " for cp in to_space})
    space = [cp for cp in range(sys.maxunicode + 1) if chr(cp).isspace()]  # str.split() separators
    cjk = [cp for a, b in _CJK_RANGES for cp in range(a, b + 1)]
    separators = sorted(set(space) | set(punct) | set(cjk))
    word_re = re.compile(f"[{_ranges_to_class(punct)}]|[{_ranges_to_class(cjk)}]|[^{_ranges_to_class(separators)}]+")
    marks_re = re.compile(f"[{_ranges_to_class(marks)}]+")
    return table, marks_re, word_re


# ASCII text: drop control characters, tabs and newlines become spaces; every ASCII punctuation
# character lies in Google's four ASCII ranges.
_ASCII_SPACES = bytes.maketrans(b"\t\n\r", b"   ")
_ASCII_DROP = bytes(list(range(0, 9)) + [11, 12] + list(range(14, 32)) + [127])
_ASCII_WORD_RE = re.compile(r"[!-/:-@\[-`{-~]|[^ !-/:-@\[-`{-~]+")


def basic_words(text: str, lower_case: bool) -> list:
    """The words Google's BasicTokenizer(do_lower_case=lower_case) produces for ``text``."""
    if text.isascii():
        text = text.encode("ascii").translate(_ASCII_SPACES, _ASCII_DROP).decode("ascii")
        return _ASCII_WORD_RE.findall(text.lower() if lower_case else text)
    table, marks_re, word_re = tables()
    text = text.translate(table)
    if lower_case:
        text = text.lower()
        if not text.isascii():
            text = marks_re.sub("", unicodedata.normalize("NFD", text))
    return word_re.findall(text)
