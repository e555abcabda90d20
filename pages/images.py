"""Images: build datasets of labelled images (upload per class, ZIP, camera, sample) and browse them."""
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.data import imagedata, sample
from engine.vision import label_issues
from pages.common import allowed, friendly_errors, locked, upload_fits
from pages.datamap_view import dataset_map_view

st.title("Images")
st.caption("Bring labelled images: one class per thing you want the model to tell apart. "
           "Every file is checked; nothing you already stored is lost when an upload is refused.")

state = st.session_state
state.setdefault("upload_round", 0)  # bumping it clears the uploaders after an upload


def show_results(rows: list[dict]) -> None:
    if not rows:
        return
    df = pd.DataFrame(rows)[["file", "class", "status", "reason"]]
    ok = (df.status == "accepted").sum()
    (st.success if ok == len(df) else st.warning)(f"{ok} of {len(df)} files added.")
    st.dataframe(df, hide_index=True, width="stretch")


datasets = [d["name"] for d in imagedata.list_datasets()]
left, right = st.columns([2, 1])
with right:
    if st.button("Load sample dataset", icon=":material/nutrition:", **locked(help="4 fruit classes x 40 images, bundled with the app")) and allowed():
        with friendly_errors("load sample"):
            loaded = sample.load_sample()
            state.dataset = loaded["dataset"]
            n = sum(loaded["classes"].values())
            state.flash = (f"{loaded['dataset']!r} is already here: {n} images in {len(loaded['classes'])} classes."
                           if loaded.get("existed") else
                           f"Loaded {loaded['dataset']!r}: {n} images in {len(loaded['classes'])} classes "
                           f"({', '.join(loaded['classes'])}). Browse them on the second tab, or fine-tune on them.")
            st.rerun()
    with st.popover("New dataset", icon=":material/add:", **locked()):
        with st.form("new_dataset", clear_on_submit=True):
            new_name = st.text_input("Name", placeholder="e.g. Cats vs dogs")
            if st.form_submit_button("Create", **locked()) and allowed():
                with friendly_errors("create dataset"):
                    state.dataset = imagedata.create_dataset(new_name)
                    st.rerun()
with left:
    if not datasets:
        st.info("No datasets yet. Create one, or load the sample dataset to try the app right away.")
        st.stop()
    current = state.get("dataset") if state.get("dataset") in datasets else datasets[-1]
    name = st.selectbox("Dataset", datasets, index=datasets.index(current))
    state.dataset = name

if state.get("flash"):
    st.success(state.pop("flash"), icon=":material/check_circle:")
counts = imagedata.dataset_counts(name)
add_tab, browse_tab, map_tab, issues_tab, manage_tab = st.tabs(["Add images", "Browse", "Map", "Label issues", "Manage"])

with add_tab:
    how = st.radio("Add images by", ["Upload files to a class", "ZIP of class folders", "Camera"], horizontal=True)
    if how == "ZIP of class folders":
        st.caption("A ZIP with one folder per class: `cats/1.jpg, dogs/2.png, …` (an outer folder is fine).")
        zip_file = st.file_uploader("ZIP file", type=["zip"], key=f"zip{state.upload_round}")
        if zip_file and upload_fits(zip_file) and st.button("Import ZIP", type="primary", **locked()) and allowed():
            with friendly_errors("import zip"):
                state.results = imagedata.import_zip(name, zip_file.getvalue())
                state.upload_round += 1
                st.rerun()
    else:
        cls_options = list(counts) + ["➕ New class…"]
        last = state.get("last_class")  # the class the last upload went to: the next batch most likely goes there too
        cls = st.selectbox("Class", cls_options, index=cls_options.index(last) if last in cls_options else 0)
        if cls == "➕ New class…":
            cls = st.text_input("New class name", placeholder="e.g. cat")
        if how == "Upload files to a class":
            files = st.file_uploader("Images", accept_multiple_files=True, key=f"files{state.upload_round}",
                                     help="JPEG, PNG, GIF, BMP, WEBP or TIFF")
            if files and st.button(f"Add {len(files)} file(s) to {cls or '…'}", type="primary", **locked(disabled=not cls)) and allowed():
                with friendly_errors("upload images"):
                    state.results = imagedata.add_images(name, cls, [(f.name, f.getvalue()) for f in files])
                    state.last_class = cls
                    state.upload_round += 1
                    st.rerun()
        else:
            photo = st.camera_input("Take a photo", key=f"cam{state.upload_round}", **locked(disabled=not cls))
            if photo and cls and allowed():
                with friendly_errors("camera"):
                    state.results = imagedata.add_images(name, cls, [(f"camera-{state.upload_round}.jpg", photo.getvalue())])
                    state.last_class = cls
                    state.upload_round += 1
                    st.rerun()
    show_results(state.pop("results", []))

with browse_tab:
    if not counts:
        st.info("This dataset has no classes yet: add images on the first tab.")
    else:
        split = imagedata.split_counts(name)
        df = pd.DataFrame([{"class": c, "train": s["train"], "validation": s["val"]} for c, s in split.items()])
        fig = px.bar(df, x="class", y=["train", "validation"], title=f"{sum(counts.values())} images in {len(counts)} classes",
                     labels={"value": "images", "variable": "split"}, height=320)
        st.plotly_chart(fig, width="stretch")
        why = imagedata.usability(counts)
        if why:
            st.warning(f"Not ready to train yet: {why}.")
        else:
            st.caption("Validation split: 20% of each class, chosen by a seeded hash of the image, so it stays the same across restarts.")
        cls = st.selectbox("Show class", list(counts), key="browse_class")
        per_page, n = 24, counts[cls]
        pages = max(1, -(-n // per_page))
        page_no = st.number_input(f"Page (of {pages})", 1, pages, 1) if pages > 1 else 1
        undo = state.get("undo")
        if undo and undo["dataset"] == name:
            note = st.container(horizontal=True, vertical_alignment="center")
            note.caption(f"Deleted {undo['file']!r} from {undo['class']}.")
            if note.button("Undo delete", icon=":material/undo:", key="undo_delete", **locked()) and allowed():
                with friendly_errors("undo delete"):
                    imagedata.add_images(name, undo["class"], [(undo["file"], undo["bytes"])])
                    state.pop("undo")
                    st.rerun()
        rows = imagedata.list_images(name, cls, (page_no - 1) * per_page, per_page)
        cols = st.columns(6)
        for i, row in enumerate(rows):
            with cols[i % 6]:
                st.image(str(imagedata.thumbnail_path(row["sha256"], row["ext"])), caption=row["original_name"][:28])
                if st.button("Delete", key=f"del{row['id']}", icon=":material/delete:", **locked()) and allowed():
                    # keep the bytes until the next delete, so one click can bring the image back
                    data = imagedata.image_path(row["sha256"], row["ext"]).read_bytes()
                    imagedata.delete_image(row["id"])
                    state.undo = {"dataset": name, "class": cls, "file": row["original_name"], "bytes": data}
                    st.rerun()

with map_tab:
    dataset_map_view(name, "images")

with issues_tab:
    st.caption("Images whose label a model that never saw them finds unlikely (out-of-fold linear heads on "
               "pretrained features, then cleanlab's confident learning). Look, then relabel or delete.")
    if st.button("Find label issues", icon=":material/rule:", key="issues_go"):
        with friendly_errors("label issues"), st.spinner("Checking every label…"):
            state.issues = {"dataset": name, **label_issues.find(name)}
    found = state.get("issues") if state.get("issues", {}).get("dataset") == name else None
    if found:
        st.caption(f"{len(found['issues'])} of {found['images']} labels look wrong; the out-of-fold heads agree with "
                   f"{found['out_of_fold_accuracy']:.0%} of the labels ({found['weights']} features).")
        if found["out_of_fold_accuracy"] < 0.9 and found["issues"]:
            st.info("The heads that judge the labels are only as good as the features: below 90% agreement many "
                    "flags are hard images rather than wrong labels. Look at each before you change it; real "
                    "ImageNet weights (the Models page) make far fewer false alarms.", icon=":material/visibility:")
        if not found["issues"]:
            st.success("No label looks wrong.")
        for i, issue in enumerate(found["issues"][:24]):
            pic, words, acts = st.columns([1, 3, 2], vertical_alignment="center")
            pic.image(issue["file"], width=96)
            words.markdown(f"**{issue['name']}** · labelled **{issue['given']}** ({issue['p_given']:.0%}), "
                           f"looks like **{issue['suggested']}** ({issue['p_suggested']:.0%})")
            if issue["image_id"] is not None:
                if acts.button(f"Relabel as {issue['suggested']}", key=f"relabel{i}", **locked()) and allowed():
                    before = imagedata.move_image(issue["image_id"], issue["suggested"])
                    state.undo_label = (issue["image_id"], before, issue["name"])
                    found["issues"].pop(i)
                    st.rerun()
                if acts.button("Delete", key=f"issue_del{i}", icon=":material/delete:", **locked()) and allowed():
                    data = imagedata.image_path(Path(issue["file"]).stem, Path(issue["file"]).suffix[1:]).read_bytes()
                    imagedata.delete_image(issue["image_id"])
                    state.undo = {"dataset": name, "class": issue["given"], "file": issue["name"], "bytes": data}
                    found["issues"].pop(i)
                    st.rerun()
    if state.get("undo_label"):
        image_id, before, what = state.undo_label
        if st.button(f"Undo: give {what} its label {before!r} back", key="undo_label_go"):
            imagedata.move_image(image_id, before)
            state.pop("undo_label")
            st.rerun()

with manage_tab:
    c1, c2 = st.columns(2)
    with c1, st.form("rename_dataset"):
        new = st.text_input("Rename dataset", value=name)
        if st.form_submit_button("Rename", **locked()) and allowed():
            with friendly_errors("rename dataset"):
                state.dataset = imagedata.rename_dataset(name, new)
                st.rerun()
    with c2:
        confirm = st.checkbox(f"Yes, delete {name!r} and its {sum(counts.values())} images")
        if st.button("Delete dataset", type="primary", icon=":material/delete_forever:", **locked(disabled=not confirm)) and allowed():
            imagedata.delete_dataset(name)
            state.pop("dataset", None)
            st.rerun()
    if counts:
        c1, c2 = st.columns(2)
        with c1, st.form("rename_class"):
            old = st.selectbox("Class", list(counts))
            new = st.text_input("New name")
            if st.form_submit_button("Rename class", **locked()) and allowed():
                with friendly_errors("rename class"):
                    imagedata.rename_class(name, old, new)
                    st.rerun()
        with c2, st.form("delete_class"):
            victim = st.selectbox("Class to delete", list(counts))
            sure = st.checkbox("Yes, delete this class and its images (cannot be undone)")
            if st.form_submit_button("Delete class and its images", **locked()) and allowed():
                if not sure:
                    st.warning("Tick the box to confirm: the class and its images are deleted for good.")
                else:
                    imagedata.delete_class(name, victim)
                    st.rerun()
