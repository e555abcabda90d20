"""AppTest for the Images page: sample dataset button, upload results, browse."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine.data import imagedata
from tests.imgs import png

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "images.py")


def test_empty_workspace_offers_sample_and_loads_it():
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert any("No datasets yet" in i.value for i in at.info)
    at.button[0].click().run()  # "Load sample dataset"
    assert not at.exception
    assert imagedata.dataset_counts("Fruit (sample)") == {"apple": 40, "banana": 40, "lemon": 40, "strawberry": 40}
    assert at.selectbox[0].value == "Fruit (sample)"


def test_upload_shows_per_file_results():
    imagedata.create_dataset("pets")
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    # simulate what the uploader hands to the engine, then render the results table
    at.session_state["results"] = imagedata.add_images("pets", "cat", [("a.png", png(seed=1)), ("bad.jpg", b"nope")])
    at.run()
    assert not at.exception
    assert any("1 of 2 files added" in w.value for w in at.warning)
    df = at.dataframe[0].value
    assert list(df["status"]) == ["accepted", "rejected"] and "not an image" in df["reason"][1]


def test_browse_shows_counts_and_split():
    imagedata.create_dataset("pets")
    imagedata.add_images("pets", "cat", [(f"{i}.png", png((200, 0, 0), seed=i)) for i in range(5)])
    imagedata.add_images("pets", "dog", [(f"{i}.png", png((0, 0, 200), seed=i)) for i in range(5)])
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert at.selectbox[0].value == "pets"
    assert imagedata.split_counts("pets") == {"cat": {"train": 4, "val": 1}, "dog": {"train": 4, "val": 1}}
    assert any("Validation split" in c.value for c in at.caption) and not at.warning


def upload(at, files) -> None:
    """Choose files in the class uploader and press its Add button, as a person does."""
    at.file_uploader(key=f"files{at.session_state['upload_round']}").set_value([(n, b, "image/png") for n, b in files]).run()
    next(b for b in at.button if b.label.startswith("Add ")).click().run()


def test_class_choice_stays_after_an_upload():
    # after adding images to a class the selector stays on that class (it jumped back to the first one,
    # so the next batch went into the wrong class)
    imagedata.create_dataset("pets")
    imagedata.add_images("pets", "cat", [("c.png", png((200, 0, 0), seed=1))])
    imagedata.add_images("pets", "dog", [("d.png", png((0, 0, 200), seed=2))])
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    cls = next(s for s in at.selectbox if s.label == "Class")
    cls.set_value("dog").run()
    upload(at, [("d2.png", png((0, 0, 190), seed=3))])
    assert not at.exception
    assert imagedata.dataset_counts("pets") == {"cat": 1, "dog": 2}
    assert next(s for s in at.selectbox if s.label == "Class").value == "dog"
    # a new class made by an upload is selected afterwards as well
    cls = next(s for s in at.selectbox if s.label == "Class")
    cls.set_value("➕ New class…").run()
    next(t for t in at.text_input if t.label == "New class name").set_value("zebra").run()
    upload(at, [("z.png", png((0, 200, 0), seed=4))])
    assert imagedata.dataset_counts("pets")["zebra"] == 1
    assert next(s for s in at.selectbox if s.label == "Class").value == "zebra"


def test_deleting_a_thumbnail_can_be_undone():
    imagedata.create_dataset("pets")
    imagedata.add_images("pets", "cat", [(f"{i}.png", png((200, 0, 0), seed=i)) for i in range(3)])
    imagedata.add_images("pets", "dog", [(f"{i}.png", png((0, 0, 200), seed=i)) for i in range(3)])
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    first = imagedata.list_images("pets", "cat", 0, 1)[0]
    at.button(key=f"del{first['id']}").click().run()
    assert imagedata.dataset_counts("pets")["cat"] == 2
    undo = next(b for b in at.button if b.label.startswith("Undo"))
    undo.click().run()
    assert not at.exception
    assert imagedata.dataset_counts("pets")["cat"] == 3
    assert any(r["sha256"] == first["sha256"] and r["original_name"] == first["original_name"]
               for r in imagedata.list_images("pets", "cat", 0, 10))


def test_deleting_a_class_asks_first():
    imagedata.create_dataset("pets")
    imagedata.add_images("pets", "cat", [(f"{i}.png", png((200, 0, 0), seed=i)) for i in range(2)])
    imagedata.add_images("pets", "dog", [(f"{i}.png", png((0, 0, 200), seed=i)) for i in range(2)])
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    submit = next(b for b in at.get("form_submit_button") if "Delete class" in b.label)
    submit.click().run()
    assert set(imagedata.dataset_counts("pets")) == {"cat", "dog"}  # not without the confirmation
    assert any("confirm" in w.value.lower() or "tick" in w.value.lower() for w in at.warning)


def test_loading_the_sample_says_what_arrived():
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.button[0].click().run()  # "Load sample dataset"
    assert any("160 images" in s.value and "4 classes" in s.value for s in at.success)
    at.button[0].click().run()  # a second time: nothing new, and it says so
    assert any("already" in s.value for s in [*at.success, *at.info])
