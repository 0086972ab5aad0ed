"""Sentence splitting for ``--split-sentences`` that works offline (no model download).

English uses a rule-based splitter written for speed (one regular-expression scan per text): a
sentence ends at ``.``, ``!`` or ``?`` (possibly repeated, possibly followed by closing quotes or
brackets) when whitespace and then an upper-case letter or a digit (possibly after opening quotes
or brackets) follow, unless the word before the period is a known abbreviation (``Mr.``,
``e.g.``, ``etc.`` ...), a single-letter initial (``J. Smith``) or dotted initials (``U.S.``).
A blank line (paragraph break) always ends a sentence. Other languages use ``pysbd``'s rules.

Without ``keep_newlines`` each sentence is stripped of surrounding whitespace (NLTK punkt's
behaviour, which Megatron uses); with it, the whitespace that follows a sentence (newlines
included) stays at the end of that sentence, so the sentences concatenate back to the text.
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt vs etc eg ie cf al fig figs no nos vol vols ed eds inc ltd co corp
jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun approx dept est gen
gov sen rep rev lt col sgt capt cmdr adm maj messrs mme mlle pp ch sec art op ca viz resp esp
""".split())

# end punctuation, closing quotes/brackets, whitespace; the next sentence must start with a word char
_CANDIDATE = re.compile(r"""([.!?]+)(["'\u201d\u2019)\]]*)(\s+)(?=["'\u201c\u2018(\[]*(\w))""")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_INITIALS = re.compile(r"^(?:[^\W\d_]\.)*[^\W\d_]$")

# NLTK punkt language names (Megatron's --lang) -> pysbd language codes.
_PYSBD_LANGUAGES = {
    "danish": "da", "dutch": "nl", "french": "fr", "german": "de", "greek": "el", "italian": "it",
    "polish": "pl", "russian": "ru", "spanish": "es", "hindi": "hi", "marathi": "mr", "chinese": "zh",
    "amharic": "am", "arabic": "ar", "armenian": "hy", "bulgarian": "bg", "urdu": "ur", "persian": "fa",
    "burmese": "my", "japanese": "ja", "kazakh": "kk", "slovak": "sk",
}


def _is_abbreviation(text: str, end: int) -> bool:
    """Whether the word that ends just before ``text[end]`` (a period) is an abbreviation."""
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:end].lstrip("\"'\u201c\u2018([")
    if not word:
        return False
    return word.lower().replace(".", "") in ABBREVIATIONS or bool(_INITIALS.match(word))


def split_english(text: str, keep_newlines: bool = False) -> list[str]:
    """Split English ``text`` into sentences (see the module docstring for the rules)."""
    cuts = []  # (end of sentence, start of next sentence)
    for m in _CANDIDATE.finditer(text):
        next_char = m.group(4)
        if not (next_char.isupper() or next_char.isdigit()):
            continue
        if m.group(1) == "." and _is_abbreviation(text, m.start(1)):
            continue
        cuts.append((m.end(2), m.end(3)))
    for m in _PARAGRAPH.finditer(text):
        cuts.append((m.start(), m.end()))
    cuts.sort()
    return _cut(text, cuts, keep_newlines)


def _cut(text: str, cuts, keep_newlines: bool) -> list[str]:
    sentences, start = [], 0
    for end, next_start in cuts:
        if end < start:  # overlapping boundaries (a sentence end right before a blank line)
            start = max(start, next_start)
            continue
        sentences.append(text[start:next_start] if keep_newlines else text[start:end])
        start = next_start
    sentences.append(text[start:])
    if keep_newlines:
        return [s for s in sentences if s]
    return [s.strip() for s in sentences if s.strip()]


class SentenceSplitter:
    """``splitter.split(text) -> list[str]`` for ``lang`` (an NLTK punkt name such as ``english``)."""

    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        self.lang = lang
        self.keep_newlines = keep_newlines
        if lang in ("english", "en"):
            self._segmenter = None
            return
        code = _PYSBD_LANGUAGES.get(lang, lang if lang in _PYSBD_LANGUAGES.values() else None)
        if code is None:
            raise ValueError(f"--lang {lang!r} is not supported for --split-sentences; choose english or one of "
                             f"{', '.join(sorted(_PYSBD_LANGUAGES))}")
        try:
            import pysbd
        except ImportError as e:
            raise ValueError(f"--split-sentences with --lang {lang} needs the 'pysbd' package "
                             "(pip install pysbd); english needs nothing") from e
        self._segmenter = pysbd.Segmenter(language=code, clean=False)

    def split(self, text: str) -> list[str]:
        if self._segmenter is None:
            return split_english(text, self.keep_newlines)
        pieces = self._segmenter.segment(text)
        if self.keep_newlines:
            return [p for p in pieces if p]
        return [p.strip() for p in pieces if p.strip()]
