"""Does a sentence parse? An offline judge of generated English for the model cards.

CMU's Link Grammar parser (Debian `python3-link-grammar` with `link-grammar-dictionaries-en`) links the
words of a sentence pairwise (subject to verb, determiner to noun, ...); a sentence *parses* when one
linkage covers every word with no word left out ("null count" 0). It is strict about syntax and lenient
about vocabulary: an unknown word is guessed from its ending ("gifage" passes as a noun), which the card's
dictionary-word share measures separately. Read a share of parsing sentences against the same parser on
human text of the same kind: about 70% of the sentences of held-out fortunes parse (quotes, dialogue
and verse are loose English too).
"""
from __future__ import annotations

import atexit
import importlib
import re
import sys
from functools import lru_cache
from pathlib import Path

DEBIAN_PACKAGES = Path("/usr/lib/python3/dist-packages")  # where Debian's python3-link-grammar puts the module
INSTALL = "apt-get install python3-link-grammar link-grammar-dictionaries-en"
MIN_WORDS = 3           # shorter pieces ("Culture", "[Norms]") are not judged
PARSE_SECONDS = 1       # a sentence the parser cannot settle in this time counts as not parsing


@lru_cache(maxsize=1)
def _parser():
    """(module, English dictionary, options), or None where Link Grammar is not installed."""
    try:
        lg = importlib.import_module("linkgrammar")
    except ImportError:
        # Debian installs the module for its own python3; the same ABI loads it from another 3.x of that version.
        if not (DEBIAN_PACKAGES / "linkgrammar").is_dir():
            return None
        sys.path.append(str(DEBIAN_PACKAGES))  # last, so that nothing already installed is shadowed
        try:
            lg = importlib.import_module("linkgrammar")
        except ImportError:
            return None
        finally:
            sys.path.remove(str(DEBIAN_PACKAGES))
    try:
        lg.LG_Error.set_handler(lambda error, data: None)  # it reports a missing locale and such on stderr: not the reader's concern
        options = lg.ParseOptions(min_null_count=0, max_null_count=0, max_parse_time=PARSE_SECONDS, verbosity=0)
        return lg, lg.Dictionary("en"), options
    except Exception:  # the module without its English dictionary
        return None


atexit.register(_parser.cache_clear)  # free the dictionary while its module can still do it


def available() -> bool:
    return _parser() is not None


def sentences(text: str) -> list[str]:
    """The sentences of a text, split at line breaks and at . ! ? before a space; pieces of fewer than
    MIN_WORDS words are left out."""
    out = []
    for line in text.split("\n"):
        for piece in re.split(r"(?<=[.!?])\s+", line.strip()):
            if len(re.findall(r"[A-Za-z]+", piece)) >= MIN_WORDS:
                out.append(piece)
    return out


def parses(sentence: str) -> bool:
    """True when Link Grammar finds a linkage of every word of `sentence` (raises if it is not installed)."""
    parser = _parser()
    if parser is None:
        raise RuntimeError(f"Link Grammar is not installed: {INSTALL}")
    lg, dictionary, options = parser
    try:
        return len(lg.Sentence(sentence, dictionary, options).parse()) > 0
    except lg.LG_TimerExhausted:
        return False


def parsing_share(texts: list[str]) -> tuple[float, int] | None:
    """(share of the sentences of `texts` that parse, number of sentences judged); None without the parser
    or without a sentence to judge."""
    if not available():
        return None
    judged = [parses(s) for t in texts for s in sentences(t)]
    if not judged:
        return None
    return sum(judged) / len(judged), len(judged)
