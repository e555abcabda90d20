"""Predict with a trained model: images or camera -> top-k, a ZIP -> CSV; export and import models."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import streamlit as st

from engine.core import access, runs, workspace
from engine.core.errors import UserError
from engine.data import imagedata
from engine.vision import export, heatmaps, inference, live
from pages.common import allowed, audience_wait, friendly_errors, locked, md_escape, model_for, upload_fits

IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]
BATCH = 32
MAX_SHOWN = 48  # images drawn with a chart each; more go through ZIP -> CSV

st.title("Predict")


def usable_runs() -> list[dict]:
    """Finished runs (and imported models) that have weights to predict with."""
    return [r for r in runs.list_runs() if r["kind"] in ("finetune", "imported") and r["status"] not in runs.ACTIVE
            and (Path(r["dir"]) / "model.safetensors").is_file()]


def label(run: dict) -> str:
    acc = (run.get("summary") or {}).get("best_val_acc")
    return run["title"] + (f" · {acc:.0%} val" if isinstance(acc, float) and math.isfinite(acc) else "") + f" · {run['id']}"


def decode_all(files: list[tuple[str, bytes]]) -> tuple[list[str], list, list[dict]]:
    """Decode untrusted files; the bad ones get a per-file reason instead of stopping the rest."""
    names, images, bad = [], [], []
    for name, data in files:
        try:
            images.append(imagedata.decode_image(data, name))
            names.append(name)
        except UserError as err:
            bad.append({"file": name, "reason": str(err)})
    return names, images, bad


def predict_all(model, images: list, top_k: int) -> list[list[tuple[str, float]]]:
    out = []
    for i in range(0, len(images), BATCH):
        out += inference.predict(model, images[i:i + BATCH], top_k=top_k)
    return out


def prob_bars(box, top: list[tuple[str, float]]) -> None:
    """The top-k classes as labelled bars, most likely first. Streamlit's own progress bars, not a chart:
    an audience's phones draw them at a fraction of a chart's cost (the live camera redraws them 3x a second)."""
    for label, p in top:
        box.progress(min(max(float(p), 0.0), 1.0), text=f"{md_escape(label)} · {p:.1%}")


def show_predictions(model, files: list[tuple[str, bytes]], top_k: int, key: str, explain: tuple = (False, None)) -> None:
    """Top-k bars per image; with explain = (True, class or None), Grad-CAM heat beside each image."""
    names, images, bad = decode_all(files)
    for b in bad:
        st.warning(f"**{b['file']}** skipped: {b['reason']}", icon=":material/broken_image:")
    heats = heatmaps.explain(model, images, target=explain[1]) if explain[0] and images else []
    for i, (name, image, top) in enumerate(zip(names, images, predict_all(model, images, top_k))):
        left, right = st.columns([2, 3] if heats else [1, 3], vertical_alignment="center")
        if heats:
            pic, heat = left.columns(2)
            pic.image(image, caption=name, width=150)
            heat.image(heats[i].overlay, caption=f"looked for {heats[i].label} ({heats[i].probability:.0%})", width=150)
        else:
            left.image(image, caption=name, width=160)
        right.markdown(f"**{top[0][0]}** · {top[0][1]:.1%}")
        prob_bars(right, top)


def live_camera(model, run_id: str, top_k: int, heat: bool) -> None:
    """Continuous classification of the webcam (WebRTC): the top-k bars redraw several times a second."""
    try:
        from streamlit_webrtc import WebRtcMode, webrtc_streamer
    except ImportError:
        st.info("Live video needs the streamlit-webrtc package; the still photo works without it.")
        return
    import av

    key = (run_id, top_k, heat)  # another model or setting: a new classifier
    if st.session_state.get("pr_live_key") != key:
        st.session_state.pr_live_key, st.session_state.pr_live = key, live.Classifier(model, top_k=top_k, heat=heat)
    clf = st.session_state.pr_live

    def on_frame(frame):  # runs in the video thread, never in the script
        return av.VideoFrame.from_ndarray(clf.process(frame.to_ndarray(format="rgb24")), format="rgb24")

    video, bars = st.columns([3, 2])
    with video:
        try:
            stream = webrtc_streamer(key="pr_live_video", mode=WebRtcMode.SENDRECV, video_frame_callback=on_frame,
                                     media_stream_constraints={"video": True, "audio": False},
                                     rtc_configuration={"iceServers": []},  # a local server: no STUN/TURN needed, none reachable
                                     server_rtc_configuration={"iceServers": []}, async_processing=True)
        except Exception as err:  # noqa: BLE001 - the component needs a live server session (not a script test)
            st.warning(f"Live video cannot start here ({type(err).__name__}); use Still photo.")
            return
    st.caption("Allow the camera when the browser asks; if it cannot start (no camera, permission refused, the "
               "stream stopped), the Still photo mode works everywhere.")

    @st.fragment(run_every=0.3)
    def live_bars() -> None:
        top, rate = clf.latest()
        if not top:
            st.caption("Waiting for the first frames…")
            return
        st.markdown(f"**{top[0][0]}** · {top[0][1]:.0%}")
        prob_bars(st, top)
        st.caption(f"{rate:.1f} predictions/s on {model.device.type}")

    with bars:
        if stream.state.playing:
            live_bars()
        else:
            st.caption("Press START to classify the camera continuously.")


def zip_to_csv(model, data: bytes, top_k: int) -> pd.DataFrame:
    """One row per file, in ZIP order; images are decoded and predicted a batch at a time (bounded memory)."""
    rows: list[dict] = []
    batch: list[tuple[int, object]] = []  # (row index, image)

    def flush() -> None:
        for (i, _), top in zip(batch, inference.predict(model, [im for _, im in batch], top_k=top_k)):
            rows[i] |= {"prediction": top[0][0], "probability": round(top[0][1], 4)}
            for k, (lbl, p) in enumerate(top[1:], start=2):
                rows[i] |= {f"top{k}": lbl, f"top{k}_probability": round(p, 4)}
        batch.clear()

    for name, blob, why in imagedata.zip_files(data):
        rows.append({"file": name, "error": why})
        if blob is not None:
            try:
                batch.append((len(rows) - 1, imagedata.decode_image(blob, name)))
            except UserError as err:
                rows[-1]["error"] = str(err)
        if len(batch) == BATCH:
            flush()
    flush()
    extra = [c for k in range(2, top_k + 1) for c in (f"top{k}", f"top{k}_probability")]
    return pd.DataFrame(rows).reindex(columns=["file", "prediction", "probability", *extra, "error"]).dropna(axis=1, how="all")


def export_tab(run: dict) -> None:
    onnx = st.checkbox("Include ONNX (runs anywhere with onnxruntime; takes a few seconds more)", value=True, key="pr_onnx")
    half = st.checkbox("fp16 weights (about half the size; predictions change by about 1e-3)", value=False, key="pr_fp16")
    if st.button("Build export ZIP", icon=":material/package_2:", key="pr_export", **locked()) and allowed():
        with friendly_errors("predict: export"), st.spinner("Exporting, then checking the file against the app…"):
            out = Path(run["dir"]) / "export" / f"{run['id']}{'-onnx' if onnx else ''}{'-fp16' if half else ''}.zip"
            st.session_state["pr_zip"] = str(export.export_run(Path(run["dir"]), out, onnx=onnx, half=half))
            st.session_state["pr_parity"] = export.parity(Path(run["dir"]), out) if onnx else None
    path = st.session_state.get("pr_zip")
    if path and Path(path).is_file() and Path(path).is_relative_to(Path(run["dir"])):
        left, right = st.columns([2, 3], vertical_alignment="center")
        # a callable: the (large) file is read only when the button is clicked, not on every rerun
        left.download_button(f"Download {Path(path).name} ({Path(path).stat().st_size / 2**20:.1f} MB)", lambda: Path(path).read_bytes(),
                             file_name=Path(path).name, mime="application/zip", type="primary", icon=":material/download:", key="pr_download")
        check = st.session_state.get("pr_parity")
        if check and "-onnx" in path:
            right.metric("Parity: largest probability difference, app vs model.onnx", f"{check['max_prob_diff']:.1e}",
                         help=f"{check['what']} through the app and through onnxruntime on the exported file; "
                              f"the top class agrees on {check['top1_agree']} of {check['images']}.")
        st.caption("Contains model.safetensors, labels, preprocessing, a model card" +
                   (" and model.onnx, which takes uint8 RGB crops (the card has a 10-line example)." if "-onnx" in path else "."))


def import_tab() -> None:
    up = st.file_uploader("An exported model ZIP or a model.safetensors from this app", type=["zip", "safetensors"], key="pr_import")
    if up is not None and st.button("Import model", icon=":material/upload:", key="pr_import_go", **locked()) and allowed():
        with friendly_errors("predict: import"):
            data = up.getvalue()
            suffix = ".zip" if up.name.lower().endswith(".zip") else ".safetensors"
            run_id = export.import_model(workspace.save_upload(data, "uploads", up.name, suffix))
            st.session_state["pr_run"] = st.query_params["run"] = run_id
            st.toast(f"Imported as {run_id}; it is now the selected model.", icon=":material/check_circle:")
            st.rerun()


def fresh(upload_key) -> bool:
    """A new upload counts against a visitor's predictions per minute; reruns of the same one do not."""
    seen = st.session_state.setdefault("_pr_seen", set())
    if upload_key in seen:
        return True
    if not audience_wait("predictions", access.PREDICTIONS_PER_MINUTE):
        return False
    seen.add(upload_key)
    return True


def predict_tabs(run: dict, top_k_slot) -> None:
    model = model_for(run)
    classes = runs.read(run, "run.json", {}).get("classes", [])
    top_k = top_k_slot.slider("Top-k", 1, max(2, min(10, len(classes) or 5)), min(3, len(classes) or 3), key="pr_topk")
    on, which = st.columns([1, 2], vertical_alignment="center")
    explain = on.toggle("Show where the model looked", key="pr_explain",
                        help="Grad-CAM: the parts of the image that raised the score of a class (warm = more).")
    target = which.selectbox("Heat for", ["the predicted class", *classes], key="pr_heat_for", disabled=not explain)
    explain = (explain, None if target == "the predicted class" else target)
    images, camera, csv, export, imports = st.tabs(["Images", "Camera", "ZIP → CSV", "Export", "Import a model"])
    with images:
        ups = st.file_uploader("Images", type=IMAGE_TYPES, accept_multiple_files=True, key="pr_files")
        if ups and all(upload_fits(u) for u in ups) and fresh(tuple(u.file_id for u in ups)):
            show_predictions(model, [(u.name, u.getvalue()) for u in ups[:MAX_SHOWN]], top_k, "up", explain)
            if len(ups) > MAX_SHOWN:
                st.caption(f"Showing the first {MAX_SHOWN} of {len(ups)}; use ZIP → CSV for many images.")
    with camera:
        # the still photo by default: the live video's WebRTC component (and its imports) only when asked for
        if st.radio("Camera", ["Still photo", "Live video"], horizontal=True, key="pr_cam_mode",
                    captions=["works everywhere", "continuous, several predictions a second"]) == "Live video":
            live_camera(model, run["id"], top_k, explain[0])
        else:
            shot = st.camera_input("Take a picture", key="pr_camera")
            if shot and upload_fits(shot) and fresh(shot.file_id):
                show_predictions(model, [("camera", shot.getvalue())], top_k, "cam", explain)
    with csv:
        z = st.file_uploader("A ZIP of images (any folder layout)", type=["zip"], key="pr_zip_in")
        if z and upload_fits(z) and fresh(z.file_id):
            with friendly_errors("predict: zip"):  # a bad ZIP is reported here; the other tabs still work
                key = (z.file_id, run["id"], top_k)  # predict once per upload, not on every rerun
                if st.session_state.get("pr_csv", (None,))[0] != key:
                    with st.spinner("Predicting…"):
                        st.session_state["pr_csv"] = (key, zip_to_csv(model, z.getvalue(), top_k))
                df = st.session_state["pr_csv"][1]
                n_bad = int((df["error"] != "").sum()) if "error" in df else 0
                st.caption(f"{len(df) - n_bad} images predicted, {n_bad} skipped (reason in the `error` column).")
                if len(df):
                    st.dataframe(df, hide_index=True)
                    st.download_button("Download predictions.csv", df.to_csv(index=False), file_name="predictions.csv",
                                       mime="text/csv", icon=":material/download:", key="pr_csv_dl")
    with export:
        export_tab(run)
    with imports:
        import_tab()


with friendly_errors("predict"):
    available = {r["id"]: r for r in usable_runs()}
    if not available:
        st.info("No trained model yet. Fine-tune one on the **Fine-tune** page (under a minute on the sample dataset), "
                "or import a model exported from this app below.", icon=":material/model_training:")
        st.page_link("pages/finetune.py", label="Go to Fine-tune", icon=":material/arrow_forward:")
        st.subheader("Import a model")
        import_tab()
    else:
        ids = list(available)
        wanted = st.query_params.get("run") or st.session_state.get("pr_run")
        left, right = st.columns([3, 1])
        run_id = left.selectbox("Model", ids, index=ids.index(wanted) if wanted in ids else 0, format_func=lambda i: label(available[i]))
        st.session_state["pr_run"] = st.query_params["run"] = run_id
        predict_tabs(available[run_id], right)
