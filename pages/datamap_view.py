"""The dataset map in the pages (Images, the Lab): pretrained vs random features in 2-D. Widgets only;
the map is engine.datamap's."""
from __future__ import annotations

import streamlit as st

from pages.common import friendly_errors


@st.cache_data(show_spinner=False, max_entries=8)
def dataset_map(dataset: str, version: str):
    """The map of a dataset, once per version of its images and labels (an edit draws a new one)."""
    from engine.vision import datamap

    return datamap.compute(dataset)


def dataset_map_view(dataset: str, key: str) -> None:
    """Pretrained vs random features of a dataset's images in 2-D, with the images of selected dots."""
    import pandas as pd
    import plotly.express as px

    from engine.data import imagedata

    st.caption("Each dot is one of your images, placed by the features of the backbone before any training: "
               "with pretrained features the classes already gather in groups, with the same network's random "
               "weights they do not. That head start is what fine-tuning builds on.")
    shown = st.session_state.setdefault("_maps", set())
    if not st.button("Draw the map", icon=":material/scatter_plot:", key=f"map_go_{key}") and (key, dataset) not in shown:
        return
    with friendly_errors("dataset map"), st.spinner("Computing the features and the map…"):
        m = dataset_map(dataset, imagedata.training_data(dataset).version)
        shown.add((key, dataset))
        left, right = st.columns(2)
        left.metric(f"Pretrained ({m.weights})", f"{m.knn['pretrained']:.0%}", help="5-nearest-neighbour accuracy in feature space")
        right.metric("Random weights", f"{m.knn['random']:.0%}", help="the same vote with the untrained network's features")
        fig = px.scatter(pd.DataFrame(m.rows()), x="x", y="y", color="class", facet_col="side", hover_data=["file"],
                         category_orders={"side": ["pretrained", "random"]}, color_discrete_sequence=px.colors.qualitative.D3)
        fig.for_each_annotation(lambda a: a.update(text={"side=pretrained": "pretrained features",
                                                         "side=random": "random features"}.get(a.text, a.text)))
        fig.update_xaxes(matches=None, showticklabels=False, title=None)
        fig.update_yaxes(matches=None, showticklabels=False, title=None)
        fig.update_layout(height=420, margin=dict(l=10, r=10, t=30, b=10))
        picked = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "box", "lasso"), key=f"map_plot_{key}")
        st.caption(f"{m.method} of the frozen features; the share is how often an image's 5 nearest neighbours "
                   "vote for its own class. Select dots (click, box or lasso) to see their images.")
        points = (picked or {}).get("selection", {}).get("points", []) if picked else []
        files = [p["customdata"][0] for p in points if p.get("customdata")][:12]
        if files:
            cols = st.columns(6)
            for i, f in enumerate(files):
                cols[i % 6].image(f, width=96)
