"""Detokenizers that turn pre-tokenized evaluation text back into ordinary text before BPE.

WikiText-103's raw files are word-tokenized ("@-@" joins hyphenated words, punctuation stands
apart); a BPE model was trained on ordinary text, so the evaluation first undoes that
tokenization. The rules below are the ones Megatron's zero-shot evaluation applies, in the same
order, so that perplexities are comparable:

    "s '" -> "s'"                                possessive plurals
    " @-@ " -> "-", " @,@ " -> ",", " @.@ " -> "."    number and word separators
    " : " " ; " " . " " ! " " ? " " , "          lose the space before the mark
    ( x ) [ x ] { x } " x " ' x '                 lose the spaces inside the brackets / quotes
    "= = = =" -> "====", "= = =" -> "===", "= =" -> "=="    section headings
    " ° " -> "°", " \\n" -> "\\n", "\\n " -> "\\n", " N " -> " 1 ", " 's" -> "'s"

(Megatron also lists a rule whose pattern is the literal text "/' [0-9]/"; it never matches
WikiText and is left out.)
"""

from __future__ import annotations

import re
from typing import Callable, Optional

__all__ = ["wikitext_detokenizer", "ptb_detokenizer", "get_detokenizer"]

# (kind, pattern, replacement): "str" is a plain replacement, "re" a regular expression.
_WIKITEXT_RULES: tuple[tuple[str, str, str], ...] = (
    ("str", "s '", "s'"),
    ("str", " @-@ ", "-"),
    ("str", " @,@ ", ","),
    ("str", " @.@ ", "."),
    ("str", " : ", ": "),
    ("str", " ; ", "; "),
    ("str", " . ", ". "),
    ("str", " ! ", "! "),
    ("str", " ? ", "? "),
    ("str", " , ", ", "),
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"),
    ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("str", "= = = =", "===="),
    ("str", "= = =", "==="),
    ("str", "= =", "=="),
    ("str", " \u00b0 ", "\u00b0"),
    ("str", " \n", "\n"),
    ("str", "\n ", "\n"),
    ("str", " N ", " 1 "),
    ("str", " 's", "'s"),
)

_COMPILED = tuple((kind, re.compile(pattern) if kind == "re" else pattern, repl)
                  for kind, pattern, repl in _WIKITEXT_RULES)


def wikitext_detokenizer(text: str) -> str:
    """Undo WikiText's word tokenization (rules in the module docstring, applied in order)."""
    for kind, pattern, repl in _COMPILED:
        text = pattern.sub(repl, text) if kind == "re" else text.replace(pattern, repl)
    return text


def ptb_detokenizer(text: str) -> str:
    """Undo Penn Treebank tokenization (the rules Megatron applies to PTB text)."""
    for old, new in ((" '", "'"), (" \n", "\n"), ("\n ", "\n"), (" n't", "n't"), (" N ", "1 "),
                     ("$ 1", "$1"), ("# 1", "#1")):
        text = text.replace(old, new)
    return text


_BY_NAME: dict[str, Callable[[str], str]] = {
    "ptb": ptb_detokenizer,
    "wiki": wikitext_detokenizer,
}


def get_detokenizer(path: str) -> Optional[Callable[[str], str]]:
    """The detokenizer whose key ("ptb", "wiki") occurs in `path`, or None. (The WIKITEXT103 task
    always applies the WikiText detokenizer, whatever the file is called.)"""
    for key, fn in _BY_NAME.items():
        if key in path:
            return fn
    return None
