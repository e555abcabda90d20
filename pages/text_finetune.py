"""Fine-tune the language model on your own text: background job, live progress, perplexity before/after."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import plotly.express as px
import streamlit as st

from engine.core import runs
from engine.core.errors import UserError
from engine.text import causal_lm, generation, lm_finetune, text_files
from pages.common import KEEP, allowed, friendly_errors, generation_slot, language_model, locked, manager, md_escape

D = lm_finetune.LMFinetuneConfig()  # the engine's defaults are the form's defaults
ss = st.session_state
LRS = [1e-5, 3e-5, 1e-4, 3e-4, 5e-4, 1e-3, 3e-3]

MIN_EVAL_TOKENS = 1000  # below this, one odd sentence moves the held-out perplexity a lot

st.title("Fine-tune on your own text")
st.caption("Continue training the language model on a text of yours: its style and words become more likely. "
           "Perplexity on a held-out slice of your text (the last 10%, never trained on) shows how much better "
           "the model predicts it — lower is better.")


def corpora() -> list[Path]:
    """Validated UTF-8 texts from the uploads and the paste box, stored in the workspace (and the example)."""
    paths = [text_files.EXAMPLE_TEXT] if ss.get("tf_example") else []
    for up in ss.get("tf_files") or []:
        paths.append(lm_finetune.save_corpus(up.getvalue(), up.name))
    if (ss.get("tf_paste") or "").strip():
        paths.append(lm_finetune.save_corpus(ss.tf_paste.encode(), "the pasted text"))
    if not paths:
        raise UserError("upload a .txt file or paste some text first (or tick the example text)")
    return paths


with st.container(border=True):
    st.subheader("1 · Your text")
    limit = text_files.MAX_TEXT_BYTES // 2**20  # the same number in the label, the browser's check and the engine's
    st.file_uploader(f"Upload .txt files (UTF-8, up to {limit} MB each)", type=["txt"], accept_multiple_files=True,
                     key="tf_files", max_upload_size=limit)
    st.text_area("…or paste text", key="tf_paste", persist_state=KEEP, height=120, placeholder="A few paragraphs in the style you want…")
    st.checkbox(f"Add the example text: {text_files.EXAMPLE_TITLE}, {text_files.EXAMPLE_TEXT.stat().st_size // 1000} kB",
                key="tf_example", persist_state=KEEP,
                help="A style anyone recognises: after a minute of fine-tuning the mini model writes in it.")

with st.container(border=True):
    st.subheader("2 · Settings")
    choices = causal_lm.model_choices()
    a, b, c = st.columns(3)
    model = a.selectbox("Base model", list(choices), format_func=choices.get, key="tf_model", persist_state=KEEP,
                        index=list(choices).index("mini") if "mini" in choices else 0)
    epochs = b.slider("Epochs (0 = from the text's size)", 0, 20, 0, key="tf_epochs", persist_state=KEEP,
                      help=f"Passes over your text. 0: about {lm_finetune.TARGET_STEPS['small']} optimizer steps' worth "
                           f"({lm_finetune.TARGET_STEPS['large']} for models over 30M parameters), at most "
                           f"{lm_finetune.MAX_AUTO_EPOCHS} passes.")
    lr = c.select_slider("Learning rate", LRS, value=D.lr, key="tf_lr", persist_state=KEEP, format_func=lambda v: f"{v:g}")
    a, b, c = st.columns(3)
    block = a.select_slider("Block size (tokens)", [16, 32, 64, 128, 256, 512], value=D.block_size, key="tf_block", persist_state=KEEP,
                            help="Length of the text pieces the model learns from (capped at the model's context).")
    batch = b.select_slider("Batch size", [1, 2, 4, 8, 16, 32], value=D.batch_size, key="tf_batch", persist_state=KEEP)
    seed = c.number_input("Seed", 0, 2**31 - 1, D.seed, key="tf_seed", persist_state=KEEP)
    prompt = st.text_input("Prompt for the before/after samples", key="tf_prompt", persist_state=KEEP,
                           placeholder="default: the first words of the held-out text")
    go, example = st.columns([1, 2])
    start = go.button("Start fine-tuning", type="primary", icon=":material/model_training:", **locked())
    try_example = example.button(f"Try it on {text_files.EXAMPLE_TITLE}", icon=":material/auto_stories:",
                                 **locked(help="One click: the example text alone, the settings above, the prompt "
                                               f"“{text_files.EXAMPLE_PROMPT}” for the before/after samples."))
    if (start or try_example) and allowed():
        with friendly_errors("start lm fine-tune"):
            texts = [text_files.EXAMPLE_TEXT] if try_example else corpora()
            cfg = lm_finetune.LMFinetuneConfig(texts=[str(p) for p in texts], model=model, epochs=epochs or None, lr=lr,
                                               block_size=block, batch_size=batch, seed=int(seed),
                                               sample_prompt=(prompt or text_files.EXAMPLE_PROMPT) if try_example else prompt).validate()
            names = [text_files.EXAMPLE_TITLE] if try_example else [u.name for u in ss.get("tf_files") or []]
            title = f"{choices[model].split(' (')[0]} on {', '.join(names) or 'pasted text'}"
            ss.tf_run = manager().submit("lm-finetune", dataclasses.asdict(cfg), title)
            ss.tf_pick = ss.tf_run  # show the new run (the Run selector below would keep the previous one)
            st.query_params["run"] = ss.tf_run  # a browser refresh finds the run again
            st.toast("Fine-tuning started in the background.")


@st.fragment(run_every=1)
def live(run_id: str) -> None:
    """Progress of a queued/running job, polled every second; a full rerun when it ends shows the results."""
    p = manager().progress(run_id)
    if p is None:
        if ss.get("tf_live") == run_id:
            ss.tf_live = None
            st.rerun()  # finished: redraw the whole page with the results
        return
    ss.tf_live = run_id
    pos = manager().queue_position(run_id)
    if p.get("phase") == "training":
        st.progress(p["step"] / p["steps"], text=f"epoch {p['epoch']}/{p['epochs']} · step {p['step']}/{p['steps']} · "
                                                 f"loss {p['loss']:.3f} · {p['tokens_s']:.0f} tokens/s · ETA {p['eta_s']:.0f} s")
    else:
        st.info(p.get("message") or (f"queued ({pos} ahead)" if pos else p.get("phase", "queued")), icon=":material/hourglass_top:")
    if st.button("Cancel", icon=":material/cancel:", key=f"tf_cancel_{run_id}", **locked()) and allowed():
        manager().cancel(run_id)


def results(run: dict) -> None:
    s = run["summary"]
    a, b, c = st.columns(3)
    a.metric("Perplexity before", f"{s['ppl_before']:.1f}")
    b.metric("Perplexity after", f"{s['ppl_after']:.1f}", delta=f"{s['ppl_after'] - s['ppl_before']:+.1f}", delta_color="inverse")
    c.metric("Training", f"{s['steps']} steps", help=f"{s['epochs']} epochs (chosen by {s.get('epochs_from', 'you')}) · {s['seconds']:.0f} s · {s['train_tokens']} training tokens")
    st.caption(f"Perplexity measured on {s['val_tokens']} held-out tokens (the last part of your text, never trained on).")
    if s["val_tokens"] < MIN_EVAL_TOKENS:
        st.warning(f"Only {s['val_tokens']} held-out tokens: too few for the perplexity to mean much "
                   f"(a few thousand words of text give {MIN_EVAL_TOKENS}+).", icon=":material/warning:")
    st.markdown(f"**Same prompt, same seed ({s['sample_seed']})** — prompt: *{md_escape(s['sample_prompt'])}*")
    left, right = st.columns(2)
    for col, title, body in ((left, f"Base: {s['base_model']}", s["sample_base"]), (right, "Fine-tuned", s["sample_finetuned"])):
        with col.container(border=True):
            st.caption(title)
            st.markdown(md_escape(body))
    if s.get("losses"):
        st.plotly_chart(px.line(x=list(range(1, len(s["losses"]) + 1)), y=s["losses"], markers=True,
                                labels={"x": "step", "y": "training loss"}, height=260), width="stretch")
    with st.form(f"tf_compare_{run['id']}", border=False):
        q = st.text_input("Try another prompt on both", value=s["sample_prompt"])
        if st.form_submit_button("Generate with both"):
            with friendly_errors("compare samples"), generation_slot() as free:
                cfg = generation.GenerationConfig(max_new_tokens=40, seed=s["sample_seed"], **generation.PRESETS["Balanced"])
                left, right = st.columns(2)
                for col, spec in ((left, s["base_spec"]), (right, s["model_dir"])) if free else ():
                    col.markdown(md_escape(generation.generate(language_model(spec), q, cfg).samples[0].text))
    st.caption("The fine-tuned model is now in the **Model** list of the Generate page.")
    if st.button("Prepare download (zipped Hugging Face folder)", icon=":material/folder_zip:", **locked()) and allowed():
        with friendly_errors("export lm"):
            ss.tf_zip = str(lm_finetune.export_zip(Path(s["model_dir"])))
    if ss.get("tf_zip") and Path(ss.tf_zip).parent == Path(s["model_dir"]).parent:
        st.download_button("Download model .zip", Path(ss.tf_zip).read_bytes(), file_name=Path(ss.tf_zip).name,
                           mime="application/zip", icon=":material/download:")


st.subheader("3 · Runs")
all_runs = runs.list_runs("lm-finetune")
if not all_runs:
    st.caption("No text fine-tuning runs yet.")
    st.stop()
ids = [r["id"] for r in all_runs]
wanted = ss.get("tf_run") or st.query_params.get("run")
run_id = st.selectbox("Run", ids, index=ids.index(wanted) if wanted in ids else 0, key="tf_pick",
                      format_func=lambda i: next(f"{r['title']} · {i}" for r in all_runs if r["id"] == i))
run = runs.get(run_id)
run_epochs = run["config"].get("epochs") or (run.get("summary") or {}).get("epochs")
st.caption(f"Status: **{run['status']}** · base model `{run['config'].get('model')}` · "
           f"{f'{run_epochs} epochs' if run_epochs else 'epochs from the text size'}"
           f"{'' if run['config'].get('epochs') or not run_epochs else ' (from the text size)'} · "
           f"lr {run['config'].get('lr'):g} · block {run['config'].get('block_size')} tokens")
if run["status"] in runs.ACTIVE or manager().progress(run_id) is not None:
    live(run_id)
elif run["status"] == "done":
    results(run)
else:
    ckpt = runs.read(run, "checkpoint/checkpoint.json", {})
    st.warning(f"This run is **{run['status']}**" + (f": {run['error']}" if run.get("error") else "")
               + (f" — it stopped at step {ckpt['step']}; resume continues from there." if ckpt else "."))
    if st.button("Resume", icon=":material/play_arrow:", **locked()) and allowed():
        with friendly_errors("resume lm fine-tune"):
            manager().resume(run_id)
            st.rerun()
