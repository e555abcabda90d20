"""Generate text: prompt, sampling controls and presets, streaming with a real Stop, token view, history."""
from __future__ import annotations

import time
from datetime import datetime

import pandas as pd
import streamlit as st

from engine.models import sources
from engine.text import causal_lm, generation, history
from pages.common import KEEP, bold_prompt, friendly_errors, generation_slot, language_model, md_escape
from pages.downloads import offer_download

D = generation.GenerationConfig()  # the engine's defaults are the page's defaults
ss = st.session_state
KNOBS = ("temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size")
# token probability -> colour: an ordered scale from sure (blue) through grey to unsure (orange, then an
# orange background), the blue/orange pair that colour-blind viewers tell apart
COLOURS = ((0.5, "blue"), (0.05, "gray"), (0.01, "orange"), (0.0, "orange-background"))
LEGEND = ":blue[≥ 50%] · :gray[5–50%] · :orange[1–5%] · :orange-background[< 1%]"


def preset_caption(values: dict) -> str:
    return (f"temperature {values['temperature']} · top-k {values['top_k'] or 'off'} · top-p {values['top_p']} · "
            f"repetition penalty {values['repetition_penalty']} · no-repeat n-gram {values['no_repeat_ngram_size'] or 'off'}")


def apply_preset() -> None:
    for k, v in generation.PRESETS.get(ss.g_preset, {}).items():
        ss[f"g_{k}"] = v


def load_settings(row: dict) -> None:
    """History 'Re-run': put a past generation's model, prompt and settings back into the widgets and run it."""
    cfg = generation.GenerationConfig.from_dict(row["settings"])
    ss.g_model, ss.g_prompt, ss.g_preset = row["model"], row["prompt"], "Custom"
    for k in (*KNOBS, "max_new_tokens", "num_return_sequences", "seed"):
        ss[f"g_{k}"] = getattr(cfg, k)
    ss.g_stop = " | ".join(s.replace("\n", "\\n") for s in cfg.stop)
    ss.g_autorun = True


for key, value in {"g_prompt": "The meaning of life is", "g_preset": "Balanced", "g_max_new_tokens": D.max_new_tokens, "g_num_return_sequences": 1,
                   "g_seed": None, "g_stop": "", **{f"g_{k}": getattr(D, k) for k in KNOBS}}.items():
    ss.setdefault(key, value)

st.title("Generate text")

# A generation left running by the previous script run (Stop button, or any other click): stop its backend.
if "g_stream" in ss:
    pending = ss.pop("g_stream")
    pending["stream"].stop()
    pending["stream"].thread.join(timeout=10)
    if pending["stream"].result is not None:
        ss.g_last = {"gen": pending["stream"].result, "spec": pending["spec"], "stopped": True}
        history.save_generation(pending["spec"], pending["stream"].result)

choices = causal_lm.model_choices()
if ss.get("g_model") not in choices:
    ss.g_model = "auto"  # the best model this machine has (offline: the bundled mini, saying why)
spec = st.selectbox("Model", list(choices), format_func=choices.get, key="g_model", persist_state=KEEP)
if spec == "auto" and (wanted := sources.resolve_text("auto")).download:
    offer_download(wanted, "Until it is here, the bundled mini GPT-2 writes.")
    spec = "mini"
lm = None
with friendly_errors("load language model"):
    lm = language_model(spec)
if lm is None:
    st.stop()
st.caption(f"**{lm.name}** · {lm.parameters / 1e6:.1f}M parameters · context {lm.context} tokens · {lm.device.type} · "
           f"{lm.source.reason} Inference: {lm.dtype_reason}.")

ss.g_max_new_tokens = min(ss.g_max_new_tokens, lm.context - 1)  # a smaller model may have a shorter context
prompt = st.text_area("Prompt", key="g_prompt", persist_state=KEEP, height=100,
                      help="The model continues this text. An empty prompt is refused; a prompt longer than the "
                           "model's context keeps its last tokens (you will see a note).")
st.radio("Preset", [*generation.PRESETS, "Custom"], key="g_preset", persist_state=KEEP, horizontal=True, on_change=apply_preset,
         captions=[preset_caption(v) for v in generation.PRESETS.values()] + ["your own values below"])
with st.expander("Sampling controls", expanded=ss.g_preset == "Custom"):
    a, b, c = st.columns(3)
    a.slider("Max new tokens", 1, min(generation.MAX_NEW_TOKENS, lm.context - 1), key="g_max_new_tokens", persist_state=KEEP)
    a.slider("Temperature", 0.0, 2.0, step=0.05, key="g_temperature", persist_state=KEEP, help="0 = greedy (always the most likely token).")
    b.number_input("Top-k", 0, 1000, key="g_top_k", persist_state=KEEP, help="Sample only among the k most likely tokens; 0 = off.")
    b.slider("Top-p", 0.05, 1.0, step=0.01, key="g_top_p", persist_state=KEEP, help="Sample among the most likely tokens covering p of the probability; 1 = off.")
    c.slider("Repetition penalty", 1.0, 2.0, step=0.05, key="g_repetition_penalty", persist_state=KEEP, help="1 = off; higher discourages tokens already used.")
    c.number_input("No-repeat n-gram size", 0, 10, key="g_no_repeat_ngram_size", persist_state=KEEP, help="Never repeat an n-gram of this size; 0 = off.")
    a, b, c = st.columns(3)
    a.slider("Samples (side by side)", 1, generation.MAX_SAMPLES, key="g_num_return_sequences", persist_state=KEEP)
    b.number_input("Seed", 0, 2**31 - 1, key="g_seed", persist_state=KEEP, placeholder="random", help="Empty = a fresh seed (shown afterwards). Same seed + settings = same text.")
    b.button("Random seed", key="g_seed_random", icon=":material/casino:", on_click=ss.update, kwargs={"g_seed": None},
             disabled=ss.g_seed is None, help="Empty the Seed box: every generation then draws a fresh seed.")
    c.text_input("Stop strings", key="g_stop", persist_state=KEEP, placeholder="e.g. \\n | --", help="Separate with |; \\n means a line break. A sample ends at the first one (not shown).")

stops = [s.strip().replace("\\n", "\n") for s in ss.g_stop.split("|") if s.strip()]
cfg = generation.GenerationConfig(max_new_tokens=ss.g_max_new_tokens, num_return_sequences=ss.g_num_return_sequences,
                               seed=ss.g_seed, stop=stops, **{k: ss[f"g_{k}"] for k in KNOBS})
go = st.button("Generate", type="primary", icon=":material/play_arrow:") or ss.pop("g_autorun", False)

if go:
    with friendly_errors("generate"), generation_slot() as free:
        if free:
            stream = generation.Stream(lm, prompt, cfg)
            ss.g_stream = {"stream": stream, "spec": spec}
            stop_slot = st.empty()
            stop_slot.button("Stop", icon=":material/stop:", help="Stops the model after the current token.")
            live, shown, last = st.empty(), "", 0.0
            for chunk in stream:
                shown += chunk
                if time.monotonic() - last > 0.1:  # bounded redraw rate: the whole text is re-rendered each time
                    live.markdown(md_escape(prompt + shown) + " ▌")
                    last = time.monotonic()
            live.empty()
            stop_slot.empty()
            ss.pop("g_stream", None)
            ss.g_last = {"gen": stream.result, "spec": spec, "stopped": False}
            history.save_generation(spec, stream.result)

last = ss.get("g_last")
if last:
    gen = last["gen"]
    if gen.prompt_notice:
        st.warning(gen.prompt_notice)
    if last["stopped"]:
        st.info("Stopped: the model stopped generating when you pressed Stop.")
    if any(s.finish == "time limit" for s in gen.samples):
        st.info(f"Cut short after {generation.MAX_GENERATION_SECONDS:.0f} s, the time one generation may take here "
                "(a shared demo must keep answering). Ask for fewer tokens or samples.", icon=":material/timer:")
    cols = st.columns(len(gen.samples))
    for i, (col, sample) in enumerate(zip(cols, gen.samples)):
        with col.container(border=True):
            st.markdown(bold_prompt(gen.prompt) + md_escape(sample.completion))
            st.caption(f"sample {i + 1} · {len(sample.token_ids)} tokens · ended by {sample.finish}")
    a, b = st.columns([4, 1])
    a.caption(f"**{gen.tokens_per_s:.1f} tokens/s** · {gen.new_tokens} new tokens · {gen.seconds:.2f} s · model {gen.model} "
              f"({gen.dtype}) · seed **{gen.seed}**")
    b.button("Reuse this seed", icon=":material/replay:", on_click=ss.update, kwargs={"g_seed": gen.seed},
             help="Put this seed in the Seed box: the same settings then give the same text.")

    with st.expander("Token view: how sure was the model?", expanded=True):
        with friendly_errors("token view"):
            which = st.selectbox("Sample", range(len(gen.samples)), format_func=lambda i: f"sample {i + 1}") if len(gen.samples) > 1 else 0
            key = (last["spec"], tuple(gen.prompt_ids), tuple(gen.samples[which].token_ids))  # one forward pass, not one per rerun
            if ss.get("g_scores", (None,))[0] != key:
                ss.g_scores = (key, generation.token_view(language_model(last["spec"]), gen, which))
            scores, ppl = ss.g_scores[1]
            st.metric("Perplexity of the generated text", f"{ppl:.1f}" if scores else "–",
                      help="exp(average surprise per token) under the model itself: lower = more predictable text.")
            parts = []
            for s in scores:
                colour = next(c for limit, c in COLOURS if s.prob >= limit)
                body = s.token.lstrip(" ")
                lead = " " * (len(s.token) - len(body))
                parts.append(lead + (f":{colour}[{md_escape(body)}]" if body.strip() else md_escape(body)))
            st.markdown("".join(parts) or "_no tokens_")
            st.caption("Colour = the model's probability of the token it produced (before temperature/top-k/top-p): " + LEGEND)
            st.dataframe(pd.DataFrame({
                "token": [repr(s.token) for s in scores],
                "probability": [s.prob for s in scores],
                "top alternatives": [" · ".join(f"{t!r} {p:.0%}" for t, p in s.alternatives) for s in scores],
            }), hide_index=True, width="stretch", height=240,
                column_config={"probability": st.column_config.ProgressColumn(format="%.3f", min_value=0.0, max_value=1.0)})

with st.expander("History"):
    rows = history.recent(10)
    if not rows:
        st.caption("Past generations appear here; re-run any of them with one click.")
    for row in rows:
        a, b = st.columns([6, 1])
        when = datetime.fromtimestamp(row["created"]).strftime("%Y-%m-%d %H:%M")
        a.markdown(f"_{md_escape(row['prompt'][:80])}_ → {md_escape((row['outputs'] or [''])[0][:120])}")
        a.caption(f"{when} · {row['stats'].get('model', row['model'])} · seed {row['settings'].get('seed')} · "
                  f"{len(row['outputs'])} sample(s) · {preset_caption(row['settings'])}")
        b.button("Re-run", key=f"g_rerun_{row['id']}", on_click=load_settings, args=(row,), icon=":material/replay:")
