"""AppTest for the Generate page, on the tiny model standing in for the bundled mini."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.text import history

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "generate.py")


@pytest.fixture
def app(tiny_as_mini):
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    assert not at.exception and not at.error
    return at


def generate_button(at):
    return next(b for b in at.button if b.label == "Generate")


def generate(at, prompt: str, seed: int | None = 5, **widgets):
    at.text_area(key="g_prompt").set_value(prompt)
    if seed is not None:
        at.number_input(key="g_seed").set_value(seed)
    for key, value in widgets.items():
        at.slider(key=f"g_{key}").set_value(value)
    generate_button(at).click().run()
    assert not at.exception
    return at


def sample_texts(at) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**the cat**")]


def test_generate_shows_text_stats_token_view_and_history(app):
    generate(app, "the cat")
    assert not app.error
    assert len(sample_texts(app)) == 1
    stats = next(c.value for c in app.caption if "tokens/s" in c.value)
    assert "seed **5**" in stats and "mini-gpt2" in stats
    assert app.metric[0].label.startswith("Perplexity")
    table = app.dataframe[0].value
    assert len(table) > 0 and table["probability"].between(0, 1).all()
    rows = history.recent()
    assert len(rows) == 1 and rows[0]["prompt"] == "the cat" and rows[0]["settings"]["seed"] == 5


def test_same_seed_same_text_and_rerun_from_history(app):
    first = sample_texts(generate(app, "the cat"))
    again = sample_texts(generate(app, "the cat"))
    assert first == again
    app.button(key=f"g_rerun_{history.recent()[-1]['id']}").click().run()
    assert not app.exception
    assert sample_texts(app) == first
    assert len(history.recent()) == 3


def test_samples_side_by_side(app):
    generate(app, "the cat", num_return_sequences=3)
    texts = sample_texts(app)
    assert len(texts) == 3 and len(set(texts)) > 1
    assert [c.value for c in app.caption if c.value.startswith("sample 3")]


def test_empty_prompt_is_a_clear_error(app):
    generate(app, "   ")
    assert any("prompt is empty" in e.value for e in app.error)
    assert history.recent() == []


def test_long_prompt_is_truncated_with_a_notice(app):
    generate(app, "the cat " * 100)
    assert any("kept its last" in w.value for w in app.warning)


def test_presets_set_visible_values(app):
    app.radio(key="g_preset").set_value("Precise").run()
    assert app.slider(key="g_temperature").value == 0.3
    assert app.number_input(key="g_no_repeat_ngram_size").value == 3
    app.radio(key="g_preset").set_value("Creative").run()
    assert app.slider(key="g_temperature").value == 1.1
    assert "temperature 0.3" in str(app.radio(key="g_preset").proto)


def test_reuse_this_seed_fills_the_seed_box(app):
    app.text_area(key="g_prompt").set_value("the cat")
    generate_button(app).click().run()  # no seed: a fresh one is drawn
    first = sample_texts(app)
    seed = history.recent()[0]["settings"]["seed"]
    next(b for b in app.button if b.label == "Reuse this seed").click().run()
    assert not app.exception and app.number_input(key="g_seed").value == seed
    generate_button(app).click().run()
    assert sample_texts(app) == first


def test_generate_works_with_the_prompt_shown_at_start(app):
    # the box starts with a real prompt (not a placeholder that looks like one): Generate just works
    shown = app.text_area(key="g_prompt").value
    assert shown and shown.strip()
    generate_button(app).click().run()
    assert not app.exception and not app.error
    rows = history.recent()
    assert len(rows) == 1 and shown.endswith(rows[0]["prompt"])  # (the tiny test model's context is short)


def test_model_text_is_shown_literally_even_when_the_prompt_ends_in_a_space(app):
    generate(app, "the cat ")
    shown = [m.value for m in app.markdown if m.value.startswith("**the cat**")]
    assert shown and shown[0].startswith("**the cat** ")  # bold closes on the text (not "**the cat **", shown raw)


def test_token_view_uses_an_ordered_colour_blind_safe_scale_with_a_legend(app):
    # orange and red were nearly the same, so almost everything looked red: one blue-grey-orange scale
    # (the pair colour-blind viewers tell apart), its legend drawn in the same colours
    generate(app, "the cat")
    view = next(m.value for m in app.markdown if m.value.count(":") >= 2 and "[" in m.value and not m.value.startswith("**"))
    used = set(__import__("re").findall(r":([a-z]+(?:-background)?)\[", view))
    assert used and used <= {"blue", "gray", "orange", "orange-background"}
    legend = next(c.value for c in app.caption if "probability of the token" in c.value)
    for mark in (":blue[", ":gray[", ":orange[", ":orange-background["):
        assert mark in legend


def test_the_seed_can_go_back_to_random(app):
    app.text_area(key="g_prompt").set_value("the cat")
    generate_button(app).click().run()
    seed = history.recent()[0]["settings"]["seed"]
    next(b for b in app.button if b.label == "Reuse this seed").click().run()
    assert app.number_input(key="g_seed").value == seed
    next(b for b in app.button if b.key == "g_seed_random").click().run()  # back to a fresh seed each time
    assert app.number_input(key="g_seed").value is None
    generate_button(app).click().run()
    generate_button(app).click().run()
    seeds = [r["settings"]["seed"] for r in history.recent()[-2:]]
    assert len(set(seeds)) == 2


def test_settings_survive_a_visit_to_another_page(tiny_as_mini):
    """Streamlit forgets a widget's value once a run does not draw it: someone who set 40 tokens and a
    temperature, looked at Predict and came back found the defaults again."""
    from tests.helpers import away_and_back, open_page

    at = open_page("pages/generate.py")
    assert not at.exception
    at.slider(key="g_max_new_tokens").set_value(40)
    at.slider(key="g_temperature").set_value(0.5)
    at.text_area(key="g_prompt").set_value("Once upon a time")
    away_and_back(at.run(), "pages/generate.py", "pages/runs.py")
    assert at.slider(key="g_max_new_tokens").value == 40
    assert at.slider(key="g_temperature").value == 0.5
    assert at.text_area(key="g_prompt").value == "Once upon a time"
