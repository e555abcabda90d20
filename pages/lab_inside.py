"""The Transfer Lab's "Inside the network" tab: first-layer filters (pretrained, random, fine-tuned),
one image's feature maps stage by stage, and the dataset map. Widgets and calls only."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from engine.core import runs
from engine.data import imagedata
from engine.models import sources
from engine.vision import filters, network, preprocess
from pages.common import friendly_errors, model_for
from pages.datamap_view import dataset_map_view

ARCH = "resnet18"


@st.cache_resource(show_spinner=False)
def backbone(weights: str):
    """The starting network for `weights` ("auto" or "none"), built once per process (read-only)."""
    source = sources.resolve_vision(ARCH, weights)
    return network.build_model(ARCH, 2, source, seed=0).eval(), source


def finetuned_runs() -> dict[str, str]:
    out = {}
    for r in runs.list_runs("finetune"):
        if r["status"] == "done" and (Path(r["dir"]) / "model.safetensors").is_file() and r["config"].get("model") == ARCH:
            out[r["id"]] = r["title"]
    return out


def show(data: str | None) -> None:
    st.subheader("What does a pretrained network look for?")
    st.caption("The first layer's 64 filters, each a 7x7 patch of colour it responds to. Pretrained: smooth blobs of "
               "colour and edges, useful in almost any photo, which is why they transfer (ImageNet weights show crisp "
               "edges at every angle; the bundled mini backbone, pretrained on generated images, mostly colour blobs). "
               "Random: noise. Fine-tuned: almost the pretrained ones, moved a little towards your images.")
    with friendly_errors("lab: filters"):
        pretrained, source = backbone("auto")
        random, _ = backbone("none")
        cols = st.columns(3)
        cols[0].image(filters.filter_grid(pretrained), caption=f"pretrained ({source.name})", width="stretch")
        cols[1].image(filters.filter_grid(random), caption="random weights", width="stretch")
        tuned = finetuned_runs()
        if tuned:
            pick = cols[2].selectbox("Fine-tuned run", list(tuned), format_func=tuned.get, key="lab_inside_run")
            run = runs.get(pick)
            model = model_for(run).model
            cols[2].image(filters.filter_grid(model), caption=f"fine-tuned ({pick})", width="stretch")
        else:
            cols[2].info("Fine-tune a resnet18 to see its filters here.")
    if data is None:
        return
    st.subheader("One image, stage by stage")
    st.caption("What each stage of the pretrained network passes on for one of your images (its 16 most active "
               "feature maps): small details first, then ever coarser grids of larger, more specific patterns.")
    with friendly_errors("lab: feature maps"):
        td = imagedata.training_data(data)
        files = [str(p) for p, _ in td.train[:24]]
        if files:
            chosen = st.select_slider("Image", options=files, format_func=lambda f: f"{files.index(f) + 1}", key="lab_inside_img")
            pp = preprocess.preprocessing_for(source, None)
            x8 = preprocess.load_images([Path(chosen)], pp.resize)
            x = preprocess.normalize(preprocess.center_crop(x8, pp.image_size), pp)
            left, right = st.columns([1, 4])
            left.image(chosen, width=140)
            for name, grid in filters.stage_maps(pretrained, x):
                right.image(grid, caption=name, width=min(720, grid.shape[1]))
    st.subheader("Your images, before any training")
    dataset_map_view(data, "lab")
