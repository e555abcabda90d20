"""Sharing the app with a room: the presenter password, what an audience member may do, fair limits."""
import pytest
from streamlit.testing.v1 import AppTest

from engine import jobs
from engine.core import access, runs
from engine.data import imagedata
from tests.helpers import make_page_dataset, open_page

PASSWORD = "s3cret presenter"


# ----------------------------------------------------------------------------- engine
def test_password_check(monkeypatch):
    monkeypatch.delenv(access.PASSWORD_ENV, raising=False)
    assert not access.password_set() and not access.check_password("") and not access.check_password("anything")
    monkeypatch.setenv(access.PASSWORD_ENV, PASSWORD)
    assert access.password_set() and access.check_password(PASSWORD)
    assert not access.check_password(PASSWORD[:-1]) and not access.check_password(PASSWORD + " ") and not access.check_password("")
    assert access.check_password("é") is False  # non-ASCII input is compared, not an error


def test_rate_limit_is_a_sliding_window():
    limit = access.RateLimit(3, window=60)
    assert [limit.wait_s(now=t) for t in (0, 1, 2)] == [0, 0, 0]
    assert limit.wait_s(now=10) == pytest.approx(50)  # the oldest event leaves the window at t=60
    assert limit.wait_s(now=60) == 0  # ... and then one more may happen
    assert limit.wait_s(now=60.5) == pytest.approx(0.5)


def test_generation_slots_never_block_and_estimate_the_wait():
    slots = access.Slots(2)
    assert slots.try_acquire() and slots.try_acquire() and not slots.try_acquire()
    slots.release(seconds=15.0)
    assert slots.try_acquire() and slots.wait_hint_s() >= 5


# ----------------------------------------------------------------------------- pages
@pytest.fixture
def shared(tmp_path, monkeypatch, fresh_manager):
    """A workspace with a dataset and a finished run, shared with a room (the password set)."""
    from tests.test_pages_vision import train_tiny

    run_id = train_tiny(tmp_path)
    monkeypatch.setenv(access.PASSWORD_ENV, PASSWORD)
    return run_id


def snapshot() -> tuple:
    return (sorted((d["name"], d["images"]) for d in imagedata.list_datasets()),
            sorted((r["id"], r["status"]) for r in runs.list_runs()), len(jobs.get_manager().active()))


PAGES = {  # page -> controls an audience member must find locked
    "pages/images.py": ["Load sample dataset", "Delete"],
    "pages/finetune.py": ["Start fine-tuning", "Suggest"],
    "pages/predict.py": ["Build export ZIP"],
    "pages/runs.py": ["Delete…"],
    "pages/home.py": ["Reset demo…"],
    "pages/lab.py": ["Load the sample and the demo tasks", "Run it"],
    "pages/text_finetune.py": ["Start fine-tuning"],
    "pages/tour.py": [],
    "pages/models.py": [],  # offline, nothing cached: no Download or Delete to show; the Import box is locked
}


@pytest.mark.parametrize("page", list(PAGES))
def test_an_audience_member_cannot_change_or_spend_anything(shared, page):
    """Every costly or destructive button is disabled, saying why; every button left enabled is
    clicked, and the datasets, the runs and the job queue stay exactly as they were."""
    query = {"step": "2"} if page == "pages/tour.py" else {}
    at = open_page(page, **query)
    assert not at.exception
    buttons = {b.label: b for b in at.button}
    for label in PAGES[page]:
        assert label in buttons, (page, label, list(buttons))
        assert buttons[label].disabled and "Presenter only" in buttons[label].help
    before = snapshot()
    enabled = [b.key or b.label for b in at.button if not b.disabled]
    for key in enabled:
        at = open_page(page, **query)
        target = next((b for b in at.button if (b.key or b.label) == key), None)
        if target is None or target.disabled:
            continue
        target.click().run()
        assert not at.exception, (page, key)
        assert snapshot() == before, (page, key)


def test_a_disabled_button_forced_by_a_client_is_still_refused(shared, monkeypatch):
    """A client can send a click for a disabled widget: the action checks the role again. (The
    buttons are drawn enabled here, as a hand-made websocket message would treat them.)"""
    import pages.common

    monkeypatch.setattr(pages.common, "locked", lambda disabled=False, **kw: {**kw, "disabled": disabled})
    at = open_page("pages/runs.py")
    next(b for b in at.button if b.label == "Delete…").click().run()
    assert any("Only the presenter" in e.value for e in at.error)
    assert "rn_confirm" not in at.session_state


def role_script():
    """The sidebar's role box beside one presenter-only button (AppTest runs it like a page)."""
    import streamlit as st

    from pages.common import locked, role_box

    with st.sidebar:
        role_box()
    st.button("Delete everything", **locked())


def delete_button(at):
    return next(b for b in at.button if b.label == "Delete everything")


def test_wrong_password_refused_right_one_unlocks_this_session_only(monkeypatch):
    monkeypatch.setenv(access.PASSWORD_ENV, PASSWORD)
    at = AppTest.from_function(role_script).run()
    assert any("audience" in c.value for c in at.sidebar.caption)
    assert delete_button(at).disabled
    at.sidebar.text_input(key="_role_password").input("wrong")
    next(b for b in at.button if b.label == "Unlock").click().run()
    assert any("Wrong password" in e.value for e in at.error)
    assert delete_button(at).disabled
    at.sidebar.text_input(key="_role_password").input(PASSWORD)
    next(b for b in at.button if b.label == "Unlock").click().run()
    assert any("presenter" in c.value for c in at.sidebar.caption)
    assert not delete_button(at).disabled
    assert "_role_password" not in at.session_state or at.session_state["_role_password"] != PASSWORD  # not kept
    other = AppTest.from_function(role_script).run()  # another browser session: still the audience
    assert delete_button(other).disabled
    next(b for b in at.button if b.label == "Lock again").click().run()
    assert delete_button(at).disabled


def test_no_password_set_means_one_user_and_no_role_line(tmp_path, fresh_manager, monkeypatch):
    monkeypatch.delenv(access.PASSWORD_ENV, raising=False)
    make_page_dataset(tmp_path / "d")
    at = AppTest.from_function(role_script).run()
    assert not at.sidebar.caption and not delete_button(at).disabled
    at = open_page("pages/images.py")
    assert not next(b for b in at.button if b.label == "Load sample dataset").disabled


def test_audience_predictions_per_minute_are_limited(shared, monkeypatch):
    from tests.helpers import PAGE_COLORS, noisy_png

    monkeypatch.setattr(access, "PREDICTIONS_PER_MINUTE", 2)
    at = open_page("pages/predict.py")
    for i in range(3):
        at.file_uploader(key="pr_files").set_value((f"r{i}.png", noisy_png(PAGE_COLORS["red"], seed=i), "image/png")).run()
        assert not at.exception
    assert any("Try again in" in w.value for w in at.warning)
