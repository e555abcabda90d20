"""Home: what Transfer Studio is, and where to start."""
import streamlit as st

from engine import imagedata, runs

st.title("Transfer Studio")
st.subheader("Transfer learning you can touch", divider="blue")
st.write("Start from a network that has already learned to see or to write, then teach it your task with a "
         "handful of examples. Every step runs here, on this machine, and you watch it happen.")

n_datasets, n_runs = len(imagedata.list_datasets()), len(runs.list_runs())
a, b, c = st.columns(3)
with a.container(border=True):
    st.markdown("**1 · Bring images**")
    st.caption("Upload a few photos per class, a ZIP of class folders, use the camera, or load the bundled sample.")
    st.page_link("pages/images.py", label=f"Images ({n_datasets} datasets)", icon=":material/photo_library:")
with b.container(border=True):
    st.markdown("**2 · Fine-tune a pretrained ResNet**")
    st.caption("Train only a new head, the last layers, or everything; watch the curves; inspect the mistakes.")
    st.page_link("pages/finetune.py", label=f"Fine-tune ({n_runs} runs)", icon=":material/model_training:")
with c.container(border=True):
    st.markdown("**3 · See why pretraining helps**")
    st.caption("Pretrained vs from scratch, how much to freeze, how few labels you need, and advice for your data.")
    st.page_link("pages/lab.py", label="Transfer Lab", icon=":material/science:")
d, e, f = st.columns(3)
with d.container(border=True):
    st.markdown("**Generate text**")
    st.caption("A GPT-2-style model continues your sentence; see every sampling knob's effect.")
    st.page_link("pages/generate.py", label="Generate text", icon=":material/edit_note:")
with e.container(border=True):
    st.markdown("**Fine-tune the language model**")
    st.caption("Teach it your own text and watch perplexity drop.")
    st.page_link("pages/text_finetune.py", label="Fine-tune text", icon=":material/tune:")
with f.container(border=True):
    st.markdown("**Presenting?**")
    st.caption("A seven-step guided tour with big type for a projector.")
    st.page_link("pages/tour.py", label="Guided tour", icon=":material/slideshow:", query_params={"present": "1"})
