"""AppTest for the Images page: sample dataset button, upload results, browse."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

from engine import imagedata
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
