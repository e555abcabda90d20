"""The grammar check of the model cards: sentence splitting, and Link Grammar's verdict on whole sentences."""
from __future__ import annotations

import pytest

from engine.core.errors import UserError
from engine.text import grammar

needs_parser = pytest.mark.skipif(not grammar.available(), reason=f"Link Grammar is not installed ({grammar.INSTALL})")


def test_sentences_split_at_line_breaks_and_sentence_ends_and_leave_out_fragments():
    text = "Love is the same time. It is not the only thing!\nCulture\n[Norms]\nWhy do birds sing? So do I, sir."
    assert grammar.sentences(text) == ["Love is the same time.", "It is not the only thing!", "Why do birds sing?", "So do I, sir."]
    assert grammar.sentences("") == [] and grammar.sentences("Yes. No.") == []


@needs_parser
def test_english_parses_and_word_salad_does_not():
    for good in ("The cat sat on the mat.", "When I was young, I wanted to fly.", "Love is the same time."):
        assert grammar.parses(good), good
    for bad in ("The best way to have to say a cake.", "When I was young, I was a little I had ever seen his wife.",
                "cat the mat on sat the"):
        assert not grammar.parses(bad), bad


@needs_parser
def test_parsing_share_counts_the_sentences_of_every_text():
    share, n = grammar.parsing_share(["The cat sat on the mat. cat the mat on sat the", "Culture", "It has a new system."])
    assert n == 3 and share == pytest.approx(2 / 3)
    assert grammar.parsing_share(["Yes.", ""]) is None  # nothing to judge


def test_without_the_parser_nothing_is_judged_and_the_error_says_how_to_install(monkeypatch):
    from engine.pretrain import mini_gpt2

    monkeypatch.setattr(grammar, "_parser", lambda: None)
    assert not grammar.available() and grammar.parsing_share(["The cat sat on the mat."]) is None
    with pytest.raises(RuntimeError, match="apt-get install python3-link-grammar"):
        grammar.parses("The cat sat on the mat.")
    assert mini_gpt2.fortunes_parsing(["The cat sat on the mat."]) is None
    with pytest.raises(UserError, match="--anneal-grammar .* python3-link-grammar"):
        mini_gpt2.grammatical(["The cat sat on the mat."])
