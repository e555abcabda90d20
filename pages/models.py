"""Models: every model the app knows, real weights downloaded with progress, or imported offline."""
from __future__ import annotations

import streamlit as st

from engine.models import sources, store
from pages.common import allowed, friendly_errors, locked
from pages.downloads import download_jobs, download_outcome, download_progress, start_download

st.title("Models")
st.caption("The pretrained networks the app can start from. Real weights (ImageNet, GPT-2) are used wherever they "
           "are on this machine; the bundled mini models work with no network at all.")

if sources.online():
    st.caption("Network: **online** — real weights can be downloaded here.")
else:
    st.caption(f"Network: **offline** ({sources.offline_reason()}) — bring weights in from a file below.")

found = store.catalog()
STATUS = {"bundled": "bundled", "cached": "on this machine", "downloadable": "downloadable", "unavailable": "unavailable offline"}
st.dataframe([{"model": m.name, "kind": m.kind, "status": STATUS[m.status], "size (MB)": round(m.size_mb, 1),
               "good for": m.good_for, "where": m.path} for m in found], hide_index=True, width="stretch")


download_outcome()
if download_jobs() or st.session_state.get("downloading"):
    download_progress()

left, right = st.columns(2)
with left:
    st.subheader("Download")
    fetchable = [m.name for m in found if m.status == "downloadable"]
    if fetchable:
        name = st.selectbox("Model", fetchable, key="dl_model",
                            format_func=lambda n: f"{n} ({next(m.size_mb for m in found if m.name == n):.0f} MB)")
        if st.button("Download", type="primary", **locked()) and allowed():
            with friendly_errors("download"):
                start_download(name)
                st.rerun()
    else:
        st.caption("Nothing to download: " + ("every model is here." if sources.online() else "no network."))
    here = [m.name for m in found if m.status == "cached"]
    if here:
        gone = st.selectbox("Delete a downloaded or imported model", here, key="rm_model")
        if st.button("Delete", **locked()) and allowed():
            with friendly_errors("delete"):
                store.delete(gone)
                st.rerun()

with right:
    st.subheader("Import from a file")
    st.caption("A torchvision ImageNet checkpoint (`.pth`, read as tensors only) or a ZIP of a Hugging Face model folder "
               "(config.json, `.safetensors` weights, tokenizer files). Pickle `.bin` weights and custom code are refused.")
    upload = st.file_uploader("Weights file", type=["pth", "zip"], key="import_file", **locked())
    as_name = st.text_input("Name (optional)", key="import_name",
                            help=".pth: the architecture, found from the tensors when empty. .zip: the model id, e.g. gpt2.")
    if upload is not None and st.button("Import", **locked()) and allowed():
        with friendly_errors("import"), st.spinner(f"Checking {upload.name}…"):
            m = store.import_file(upload.name, data=upload.getvalue(), name=as_name.strip() or None)
            st.success(f"Imported {m.name} ({m.size_mb:.0f} MB): `auto` uses it from now on.")
