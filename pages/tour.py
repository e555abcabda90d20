"""Guided tour: the transfer-learning story in seven steps, with Next/Back, for a live audience."""
from dataclasses import asdict
from pathlib import Path

import plotly.express as px
import streamlit as st

from engine import demo, report
from engine.core import runs
from engine.data import imagedata, sample
from engine.models import sources
from engine.text import causal_lm
from engine.vision import filters, heatmaps, inference
from pages import lab_inside
from pages.common import allowed, audience, curves, friendly_errors, locked, manager, md_escape, model_for
from pages.datamap_view import dataset_map

STEPS = [
    ("Bring images", "A few labelled photos per class are all it takes: here, four kinds of fruit."),
    ("Start from a pretrained network", "We reuse a network that already learned to see and only teach it our classes."),
    ("Watch it learn", "Each point is one pass over the images: the pretrained features give the new layer a head start."),
    ("See its mistakes", "The confusion matrix shows which fruit it mixes up, and the pictures show why."),
    ("Predict a new photo", "Show it a photo it has never seen, from the camera or a file."),
    ("Pretrained vs from scratch", "The same network trained from random weights starts lower, learns slower and ends lower."),
    ("Generate text", "Transfer works for language too: a pretrained GPT-2-style model continues any sentence."),
]

step = int(st.query_params.get("step", 1))
step = min(max(step, 1), len(STEPS))
title, sentence = STEPS[step - 1]
# Back and Next above the step, beside its progress: always in the same place, never scrolled away
back, bar, forward = st.columns([1, 5, 1], vertical_alignment="bottom")
bar.progress(step / len(STEPS), text=f"Step {step} of {len(STEPS)}")
if back.button("Back", disabled=step == 1, icon=":material/arrow_back:", width="stretch"):
    st.query_params["step"] = step - 1
    st.rerun()
if forward.button("Next", disabled=step == len(STEPS), icon=":material/arrow_forward:", type="primary", width="stretch"):
    st.query_params["step"] = step + 1
    st.rerun()
st.title(title)
st.subheader(sentence, divider="blue")


def learning_sentence(metrics: list[dict], n_classes: int) -> str:
    """What the curve shows, in its own numbers (so the words can never disagree with the picture)."""
    first, best = metrics[0], max(metrics, key=lambda m: m["val_acc"])
    text = f"After the first pass: **{first['val_acc']:.0%}** of the validation images right (guessing: {1 / n_classes:.0%})."
    if len(metrics) > 1:
        text += f" Best so far: **{best['val_acc']:.0%}**, after pass {best['epoch']} of {len(metrics)}."
    return text


def comparison_sentence(curves_: dict) -> str:
    """Start and best accuracy of the pretrained and the scratch curve, as the chart draws them."""
    pre, scratch = curves_.get("pretrained"), curves_.get("scratch")
    if not pre or not scratch or len(pre) < 2 or len(scratch) < 2:
        return ""
    # index 0 is the untrained network; the first trained point is index 1
    return (f"After one epoch: **{pre[1]:.0%}** pretrained vs **{scratch[1]:.0%}** from scratch; "
            f"best: **{max(pre):.0%}** vs **{max(scratch):.0%}**.")


def latest_run(status: str | None = None) -> dict | None:
    done = [r for r in runs.list_runs("finetune") if status is None or r["status"] == status]
    return done[0] if done else None


if step == 1:
    with friendly_errors("tour sample"):
        if not audience():  # (a visitor only looks: the presenter's workspace is theirs)
            sample.load_sample()
        counts = imagedata.dataset_counts(sample.SAMPLE_NAME)
        cols = st.columns(len(counts))
        for col, (cls, n) in zip(cols, counts.items()):
            col.image([str(imagedata.thumbnail_path(r["sha256"], r["ext"])) for r in imagedata.list_images(sample.SAMPLE_NAME, cls, 0, 4)],
                      width=90)
            col.metric(cls, f"{n} images")

elif step == 2:
    words, knows = st.columns([3, 2])
    words.write("The backbone is a ResNet-18. We give it a new last layer for our classes and fine-tune it **gently**: "
                "the new layer learns at full speed, the pretrained layers 10x slower, so what they know is adjusted, not overwritten.")
    source = sources.resolve_vision("resnet18", "auto")
    words.caption(f"Weights: {source.name}. {source.reason}")
    if audience():
        words.caption("The presenter starts the run; the next step shows the latest one.")
    if words.button("Start fine-tuning", type="primary", icon=":material/play_arrow:", **locked()) and allowed():
        with friendly_errors("tour start"):
            sample.load_sample()
            cfg = demo.run_config()  # the default strategy, every setting from the recipe book
            st.session_state.tour_run = manager().submit("finetune", asdict(cfg), "Tour: fine-tuning on fruit")
            st.query_params["step"] = 3
            st.rerun()
    with knows, friendly_errors("tour: what it knows"):
        pre, rnd = st.columns(2)
        pre.image(filters.filter_grid(lab_inside.backbone("auto")[0], scale=2), width="stretch", caption="first layer, pretrained")
        rnd.image(filters.filter_grid(lab_inside.backbone("none")[0], scale=2), width="stretch", caption="random weights")
        if st.button("Measure the head start", icon=":material/scatter_plot:") or st.session_state.get("tour_map"):
            m = dataset_map(sample.SAMPLE_NAME, imagedata.training_data(sample.SAMPLE_NAME).version)
            st.session_state.tour_map = True
            st.metric("images beside their own class, before training", f"{m.knn['pretrained']:.0%}",
                      delta=f"{(m.knn['pretrained'] - m.knn['random']) * 100:+.0f} points vs random weights",
                      help="Each image's 5 nearest neighbours by the backbone's features vote for its class.")

elif step == 3:
    run_id = st.session_state.get("tour_run") or (latest_run() or {}).get("id")

    @st.fragment(run_every=1)
    def watch() -> None:
        if not run_id:
            st.info("No run yet: go back one step and start one.")
            return
        run = runs.get(run_id)
        p = manager().progress(run_id) or {}
        st.caption(f"{run['title']} · {p.get('phase', run['status'])}" + (f" · epoch {p['epoch']}/{p['epochs']}" if p.get("epoch") else ""))
        metrics = runs.read(run, "metrics.json", [])
        if metrics:
            st.markdown(learning_sentence(metrics, len(runs.read(run, "run.json", {}).get("classes") or [1])))
            _, acc = curves({"run": metrics})
            acc.update_layout(height=330)  # the whole step fits a 1280x720 projector
            st.plotly_chart(acc, width="stretch")
    watch()

elif step == 4:
    run = latest_run("done")
    ev = runs.read(run, "eval.json", {}) if run else {}
    if not ev:
        st.info("Finish a run first (step 2).")
    else:
        left, right = st.columns([3, 2])
        left.plotly_chart(report.confusion_figure(ev).update_layout(height=380), width="stretch")
        shown = [m for m in ev["mistakes"] if Path(m["file"]).is_file()][:6]
        looked = right.toggle("Where it looked", key="tour_heat", help="Grad-CAM: what made it say the wrong class.")
        heats = [None] * len(shown)
        if looked and shown:
            with friendly_errors("tour heatmaps"):
                model = model_for(run)
                heats = heatmaps.explain_files(model, [m["file"] for m in shown], [m["pred"] for m in shown])
        grid = right.columns(3)  # two rows of three: the step fits a projector without scrolling
        for i, (m, heat) in enumerate(zip(shown, heats)):
            grid[i % 3].image(heat.overlay if heat is not None else m["file"], width="stretch",
                              caption=f"{m['true']} → {m['pred']} ({m['conf']:.0%})")

elif step == 5:
    run = latest_run("done")
    if not run:
        st.info("Finish a run first (step 2).")
    else:
        cam, pick = st.columns(2)  # side by side: a full-width camera alone is taller than a projector
        photo = cam.camera_input("Take a photo") or pick.file_uploader("…or choose an image", type=["png", "jpg", "jpeg", "webp"])
        if photo:
            with friendly_errors("tour predict"):
                img = imagedata.decode_image(photo.getvalue(), photo.name)
                model = model_for(run)
                top = inference.predict(model, [img], top_k=3)[0]
                heat = heatmaps.explain(model, [img])[0]
                c1, c0, c2 = st.columns([1, 1, 2])
                c1.image(img, width=200)
                c0.image(heat.overlay, width=200, caption=f"where it looked for {heat.label}")
                c2.plotly_chart(px.bar(x=[p for _, p in top], y=[label for label, _ in top], orientation="h",
                                       labels={"x": "probability", "y": ""}, range_x=[0, 1], height=260), width="stretch")

elif step == 6:
    from engine.lab import experiments

    states = [experiments.read_result(r["dir"]) or {} for r in runs.list_runs("lab") if r["status"] == "done"]
    result = next((s.get("result") or {} for s in states if s.get("experiment") == "compare"), {})
    if result.get("curves"):
        st.markdown(comparison_sentence({k: v["mean"] for k, v in result["curves"].items()}))
        st.plotly_chart(report.comparison_figure(result["curves"], "Validation accuracy per epoch").update_layout(height=360),
                        width="stretch")
    else:
        st.info("No comparison yet: the Transfer Lab runs one in about a minute.")
    st.page_link("pages/lab.py", label="Open the Transfer Lab", icon=":material/science:")

elif step == 7:
    from engine.text import generation

    prompt = st.text_input("Start a sentence", "The best thing about machine learning is")
    if st.button("Continue it", type="primary"):
        with friendly_errors("tour generate"):
            lm = causal_lm.load("auto")
            gen = generation.generate(lm, prompt, generation.GenerationConfig(max_new_tokens=40, seed=7, **generation.PRESETS["Balanced"]))
            st.info(md_escape(gen.samples[0].text))
            st.caption(f"{lm.name} · {gen.tokens_per_s:.0f} tokens/s")

