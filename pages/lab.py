"""Transfer Lab: watch, with real training runs, what pretraining buys and which strategy fits a dataset."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import streamlit as st

from engine.core import runs
from engine.data import demo_tasks, imagedata, sample
from engine.lab import advisor, experiments
from engine.text import lm_finetune, text_files
from pages import lab_charts as charts
from pages import lab_inside
from pages.common import allowed, friendly_errors, locked, manager

st.title("Transfer Lab")
st.caption("Real training runs, side by side. Each experiment runs in the background and its curves fill in while it learns.")

TABS = {
    "compare": ("Pretrained vs scratch", "Does starting from pretrained weights help?",
                "The same network, data, epochs and learning rate twice: once from pretrained weights, once from random ones."),
    "freeze": ("How much to freeze", "How many layers should keep their pretrained weights?",
               "k = how many of the 5 stages stay frozen: k=5 trains only a new output layer (a linear probe), k=0 trains everything."),
    "data-size": ("Less data", "What if you only have a few labelled images?",
                  "Pretrained and from-scratch networks trained on 1, 5, 10 … labelled images per class, tested on the same held-out images."),
    "unsupervised": ("Learning without labels", "Can a network learn useful features from images without any labels?",
                     "A small autoencoder learns to redraw the images (no labels), then its encoder is trained with a few labels, vs the same "
                     "encoder from random weights. It needs many images a tiny network can learn from: try Demo: clothing, 120 per class."),
    "advise": ("Strategy advisor", "Which fine-tuning strategy fits this dataset?",
               "Measures how many images per class you have and how much the pretrained features already separate your classes."),
    "text-compare": ("Text: pretrained vs scratch", "Does a pretrained language model learn a new text faster?",
                     "The same GPT-2 shape and tokenizer twice, the same steps on the same text: once from the pretrained weights, "
                     "once from random ones. Perplexity on the held-out end of the text: how surprised the model is by each next "
                     "word (lower is better)."),
    "text-data-size": ("Text: less data", "What if you only have a little text?",
                       "Pretrained and from-scratch language models trained the same steps on 10%, 30% and all of the text, "
                       "tested on the same held-out end."),
}


# ----------------------------------------------------------------------------- data and options
def choose_data() -> str | None:
    names = [d["name"] for d in imagedata.list_datasets()]
    a, b = st.columns([3, 2], vertical_alignment="bottom")
    if not names:
        a.info("No dataset yet: load the bundled sample (4 fruit classes) or the demo tasks.", icon=":material/photo_library:")
    if b.button("Load the sample and the demo tasks", icon=":material/download:", key="lab_demo",
                **locked(help="The fruit sample, plus fractal patterns (similar to the mini backbone's pretraining images) and line "
                              "drawings (different), each with 30 or 120 images per class: together, the advisor's four scenarios. "
                              "And grey clothing photos for learning without labels.")) and allowed():
        with friendly_errors("lab: demo data"), st.spinner("Adding datasets…"):
            sample.load_sample()
            for key in demo_tasks.DEMOS:
                demo_tasks.import_demo(key)
            st.rerun()
    if not names:
        return None
    default = names.index(sample.SAMPLE_NAME) if sample.SAMPLE_NAME in names else 0
    return a.selectbox("Dataset", names, index=default, key="lab_data")


def choose_text(exp: str) -> str | None:
    """The new text for the text experiments: the bundled Genesis, or an uploaded .txt file."""
    choice = st.radio("Text", [text_files.EXAMPLE_TITLE, "Upload a .txt file"], horizontal=True, key=f"lab_text_choice_{exp}")
    if choice == text_files.EXAMPLE_TITLE:
        return "example"
    up = st.file_uploader("A plain-text file (UTF-8)", type=["txt"], key=f"lab_text_upload_{exp}")
    if up is None:
        return None
    with friendly_errors("lab: text upload"):
        return str(lm_finetune.save_corpus(up.getvalue(), up.name))
    return None


def options() -> dict:
    with st.expander("Options"):
        c = st.columns(3)
        preset = c[0].radio("Preset", experiments.PRESET_NAMES, horizontal=True, key="lab_preset",
                            captions=["a minute or two", "several minutes: more epochs, seeds and settings"])
        epochs = c[1].number_input("Epochs (0 = preset)", 0, 200, 0, key="lab_epochs")
        seeds = c[2].number_input("Seeds to average (0 = preset)", 0, 10, 0, key="lab_seeds")
    return {"preset": preset, "epochs": int(epochs) or None, "seeds": int(seeds) or None}


# ----------------------------------------------------------------------------- results
def numbers(state: dict) -> None:
    """The three benefits beside the curves: pretrained value, difference to scratch, one-line reading."""
    b = (state.get("result") or {}).get("benefits") or {}
    g, readings = b.get("groups") or {}, b.get("readings") or {}
    finished = state.get("status") in ("done", "cancelled")
    for key, title, fmt, what in (
            ("start", "Higher start", "{:.0%}", "Accuracy after the first epoch."),
            ("slope", "Higher slope", "{:.0f} pts/epoch", f"Accuracy gained per epoch over the first {b.get('early_epochs', 3)} epochs."),
            ("asymptote", "Higher asymptote", "{:.0%}", "The best accuracy reached.")):
        p, s = (g.get(side, {}).get(key, {}) for side in ("pretrained", "scratch"))
        if p.get("mean") is None or s.get("mean") is None:
            st.metric(title, "–")
            continue
        scale = 100 if key == "slope" else 1
        delta = (p["mean"] - s["mean"]) * 100
        st.metric(title, fmt.format(p["mean"] * scale), f"{delta:+.0f} points vs scratch ({fmt.format(s['mean'] * scale)})",
                  help=f"{what} Pretrained network; spread over seeds ± {p['std'] * 100:.0f} points (scratch ± {s['std'] * 100:.0f}).")
        if finished and readings.get(key):
            st.caption(readings[key])


def text_numbers(state: dict) -> None:
    """The three benefits for the language model: lower perplexity is better."""
    b = (state.get("result") or {}).get("benefits") or {}
    g, readings = b.get("groups") or {}, b.get("readings") or {}
    finished = state.get("status") in ("done", "cancelled")
    interval = (state.get("config") or {}).get("eval_every")
    for key, title, what in (("start", "Lower start", f"Perplexity after the first {interval} steps."),
                             ("slope", "Faster fall", f"How much perplexity falls per {interval} steps, over the next {b.get('early_intervals', 3)} intervals."),
                             ("asymptote", "Lower asymptote", "The best perplexity reached.")):
        p, s = (g.get(side, {}).get(key, {}) for side in ("pretrained", "scratch"))
        if p.get("mean") is None or s.get("mean") is None:
            st.metric(title, "–")
            continue
        if key == "slope":
            fall = lambda v: 1 - math.exp(-v)  # noqa: E731
            st.metric(f"{title} (per {interval} steps)", f"{fall(p['mean']):.0%}", f"scratch {fall(s['mean']):.0%}", delta_color="off", help=what)
        else:
            # lower is better: the change is shown as a fall (a down arrow, green when the pretrained model is lower)
            change = p["mean"] / s["mean"] - 1
            st.metric(title, f"{p['mean']:.0f}", f"{change:+.0%} vs scratch's {s['mean']:.0f}", delta_color="inverse",
                      help=f"{what} Pretrained model; scratch alongside.")
        if finished and readings.get(key):
            st.caption(readings[key])


def show_result(state: dict, run_dir: Path) -> None:
    exp = state.get("experiment")
    res = state.get("result") or {}
    if exp in experiments.TEXT_EXPERIMENTS:
        data = state.get("data") or {}
        st.caption(f"{data.get('name', '')}: {data.get('train_tokens', 0):,} training tokens, {data.get('val_tokens', 0):,} held out · "
                   f"{(state.get('weights') or {}).get('name', '')}, {(state.get('weights') or {}).get('parameters', 0) / 1e6:.1f}M parameters")
    if exp == "text-compare":
        left, right = st.columns([5, 2], gap="large")
        left.plotly_chart(charts.text_curves_figure(state), key="lab_text_curves")
        with right:
            text_numbers(state)
    elif exp == "text-data-size":
        a, b = st.columns(2)
        a.plotly_chart(charts.text_curves_figure(state, "All of the text: held-out perplexity (lower is better)"), key="lab_text_size_curves")
        b.plotly_chart(charts.text_size_figure(state), key="lab_text_size")
        if state.get("status") == "done" and res.get("reading"):
            st.caption(res["reading"])
    if exp == "advise":
        return show_advice(res) if res.get("advice") else None
    if exp == "unsupervised" and state.get("ae"):
        a, b = st.columns([2, 3])
        a.plotly_chart(charts.ae_loss_figure(state), key="lab_ae_loss")
        if (run_dir / "reconstructions.png").is_file():
            b.image(str(run_dir / "reconstructions.png"), caption="Top: held-out images · bottom: the autoencoder's redrawing of them (it never saw a label)")
    if exp in ("compare", "unsupervised"):
        left, right = st.columns([5, 2], gap="large")
        names = ({"pretrained": "pretrained encoder (no labels used)", "scratch": "same encoder, random start"} if exp == "unsupervised"
                 else {"pretrained": f"pretrained: {(state.get('weights') or {}).get('name', '')}", "scratch": "from scratch (random weights)"})
        title = ("Step 2: trained with {} labels per class · accuracy on unseen images".format((state.get("data") or {}).get("labels_per_class"))
                 if exp == "unsupervised" else "Accuracy on images it never trained on (band = spread over seeds)")
        left.plotly_chart(charts.curves_figure(state, title, names), key=f"lab_curves_{exp}")
        with right:
            numbers(state)
    elif exp == "freeze":
        a, b = st.columns(2)
        a.plotly_chart(charts.freeze_figure(state), key="lab_freeze")
        b.plotly_chart(charts.lr_rule_figure(state), key="lab_rule")
        if state.get("status") == "done":
            a.caption(res.get("reading", ""))
            b.caption(res.get("lr_reading", ""))
    elif exp == "data-size":
        st.plotly_chart(charts.data_size_figure(state), key="lab_size")
        if state.get("status") == "done" and res.get("reading"):
            st.caption(res["reading"])


def show_advice(res: dict) -> None:
    adv = res["advice"]
    a, b = st.columns(2)
    a.plotly_chart(charts.advisor_figure(res), key="lab_quadrants")
    b.plotly_chart(charts.probe_figure(res), key="lab_probe")
    st.success(f"**{adv['scenario']}** → **{adv['strategy']}**: {adv['headline']}", icon=":material/recommend:")
    for r in adv["reasons"]:
        st.markdown(f"- {r}")
    acc = res["nearest_mean_accuracy"]
    st.caption(f"Size: {res['images_per_class']:.0f} labelled images per class (small below {res['thresholds']['small_below_images_per_class']}). "
               f"Similarity {res['similarity']:.2f}: the share of the random network's mistakes that the pretrained features fix "
               f"({acc['random']:.0%} → {acc['pretrained']:.0%}; similar from {res['thresholds']['similar_at_or_above']}). "
               f"Weights: {res['weights']['name']}.")
    cfg = advisor.recommended_config(res["data"], advisor.Advice(**adv), res["weights"].get("requested", "auto"),
                                     res.get("requested_image_size"))
    # the other settings come from the recipe book when the run starts (the Fine-tune page shows them)
    label = f"Start this run on the Fine-tune page ({cfg.strategy}" + (f", k={cfg.freeze}" if cfg.strategy == "partial" else "") + ", the recipe's settings)"
    if st.button(label, type="primary", icon=":material/play_arrow:", key="lab_start_advised", **locked()) and allowed():
        with friendly_errors("lab: start advised run"):
            run_id = manager().submit("finetune", dataclasses.asdict(cfg), f"{cfg.data} · resnet18 · {cfg.strategy} (advised)")
            st.session_state["ft_run"] = run_id
            st.switch_page("pages/finetune.py", query_params={"run": run_id})


def live(run_id: str, drawn_active: bool) -> None:
    run = runs.get(run_id)
    active = run["status"] in runs.ACTIVE
    if drawn_active and not active:
        st.rerun()  # just finished: redraw once without polling
    state = experiments.read_result(run["dir"]) or {}
    if active:
        prog = manager().progress(run_id) or {}
        pos = manager().queue_position(run_id)
        done = sum(1 for r in state.get("runs", []) if r.get("done"))
        total = len(state.get("runs", [])) or 1
        within = ((prog.get("epoch") or 0) + (prog.get("step") or 0) / max(1, prog.get("steps") or 1)) / max(1, prog.get("epochs") or 1)
        frac = (done + min(within, 1.0)) / total if prog.get("runs") else 0.0
        text = f"Queued: {pos} job(s) ahead" if pos else prog.get("message") or prog.get("phase") or "starting"
        a, b = st.columns([5, 1], vertical_alignment="bottom")
        a.progress(min(frac, 1.0), text=text)
        if b.button("Cancel", icon=":material/stop:", key=f"lab_cancel_{run_id}", **locked(help="Stops now; finished runs are kept.")) and allowed():
            manager().cancel(run_id)
    elif run["status"] == "done":
        st.caption(f"Done: {len(state.get('runs', []))} training runs in {state.get('seconds', 0):.0f} s.")
    elif run["status"] == "failed":
        st.error(f"The experiment failed: {run.get('error') or 'no reason recorded'}")
    elif run["status"] in ("cancelled", "interrupted"):
        st.warning(f"This experiment was {run['status']}; the runs that finished are shown.")
    if state:
        show_result(state, Path(run["dir"]))


def experiment_tab(exp: str, data: str | None, opts: dict) -> None:
    _, question, how = TABS[exp]
    st.subheader(question)
    st.caption(how)
    mine = [r for r in runs.list_runs("lab") if r["config"].get("experiment") == exp]
    start = st.button("Run it" if exp != "advise" else "Measure this dataset", type="primary", icon=":material/play_arrow:",
                      key=f"lab_start_{exp}", **locked(disabled=data is None))
    if start and allowed():
        with friendly_errors(f"lab: start {exp}"):
            cfg = experiments.LabConfig(exp, data=data, preset=opts["preset"],
                                **({} if exp == "advise" else {"seeds": opts["seeds"]} if exp in experiments.TEXT_EXPERIMENTS
                                   else {"epochs": opts["epochs"], "seeds": opts["seeds"]}))
            st.session_state[f"lab_{exp}"] = experiments.submit(cfg, manager())
            st.rerun()
    if not mine:
        return
    ids = [r["id"] for r in mine]
    # this session's latest run, else the latest one on the chosen dataset, else the latest of all
    wanted = st.session_state.get(f"lab_{exp}") or next((r["id"] for r in mine if r["config"].get("data") == data), None)
    pick = st.selectbox("Results", ids, index=ids.index(wanted) if wanted in ids else 0, key=f"lab_pick_{exp}",
                        # no status in the label: it is drawn once per page run and would stay "running" after the
                        # run finishes; the live part below shows the status and keeps it current
                        format_func=lambda i: next(f"{r['title'].split(' · ', 2)[-1]} · {i}" for r in mine if r["id"] == i))
    active = runs.get(pick)["status"] in runs.ACTIVE
    st.fragment(run_every=1 if active else None)(live)(pick, active)


with friendly_errors("lab: page"):
    data = choose_data()
    opts = options()
    *tabs, inside_tab = st.tabs([TABS[e][0] for e in TABS] + ["Inside the network"])
    for tab, exp in zip(tabs, TABS):
        with tab:
            experiment_tab(exp, choose_text(exp) if exp in experiments.TEXT_EXPERIMENTS else data, opts)
    with inside_tab:
        lab_inside.show(data)
