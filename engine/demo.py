"""An instant demo workspace: every page has something to show seconds after start-up.

`prepare()` adds, each only when missing (so running it twice changes nothing):
  - the bundled sample dataset,
  - one finished fine-tuning run on it (curves, confusion matrix, mistakes),
  - a pretrained-vs-scratch comparison from the Transfer Lab, when the Lab is available,
  - a few text generations in the history.
A workspace that holds the user's own data is left alone unless `force=True`.

`reset()` is the app's "Reset demo" button (and `engine demo --reset`): it deletes what people
added since (datasets, runs, generations that are not the demo's), then completes the demo.
`run_job` runs it as a background job so the page stays responsive.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import asdict
from typing import Callable

from engine import jobs
from engine.core import runs, workspace
from engine.core.errors import UserError
from engine.data import imagedata, sample
from engine.text import history
from engine.train import recipes
from engine.vision.config import FinetuneConfig

log = logging.getLogger(__name__)

DEMO_RUN_TITLE = "Demo: fruit, fine-tuned from the pretrained backbone"
DEMO_LAB_TITLE = "Demo: pretrained vs from scratch"
RESET_TITLE = "Demo: reset"
DEMO_PROMPTS = ["The meaning of life is", "A good programmer", "Love is"]


def _user_items() -> list[tuple[str, str | int, str]]:
    """(kind, key, label) for everything in the workspace the demo did not make."""

    items = [("dataset", d["name"], f"dataset {d['name']!r}") for d in imagedata.list_datasets() if d["name"] != sample.SAMPLE_NAME]
    items += [("run", r["id"], f"run {r['title']!r}") for r in runs.list_runs()
              if not r["title"].startswith("Demo:") and r["status"] not in runs.ACTIVE]
    items += [("generation", g["id"], f"generation {g['id']}") for g in history.recent(500) if not g["settings"].get("demo")]
    return items


def user_data() -> list[str]:
    """What in this workspace the demo did not make (datasets, runs, generations)."""
    return [label for _, _, label in _user_items()]


def _prompts_todo() -> list[str]:
    """The demo prompts that have no generation in the history yet."""

    have = {g["prompt"] for g in history.recent(500) if g["settings"].get("demo")}
    return [p for p in DEMO_PROMPTS if p not in have]


def missing(lab: bool = True) -> list[str]:
    """The demo pieces this workspace does not have yet."""

    todo = [] if sample.SAMPLE_NAME in {d["name"] for d in imagedata.list_datasets()} else ["sample dataset"]
    todo += [] if _has_run("finetune", DEMO_RUN_TITLE) else ["fine-tuning run"]
    todo += [] if not lab or _has_run("lab", DEMO_LAB_TITLE) else ["pretrained-vs-scratch comparison"]
    todo += [f"{n} generations" for n in [len(_prompts_todo())] if n]
    return todo


def remove_user_data() -> list[str]:
    """Delete every dataset, finished run and generation the demo did not make. Returns what went."""

    delete = {"dataset": imagedata.delete_dataset, "run": runs.delete, "generation": history.delete}
    gone = []
    for kind, key, label in _user_items():
        delete[kind](key)
        gone.append(label)
    log.info("demo reset removed %d items", len(gone))
    return gone


def _run_in_foreground(kind: str, title: str, config: dict) -> str:
    """Create a run record and execute it here (not in a worker), so the CLI can wait for it."""

    run_id = runs.create(kind, title, config)
    runs.set_status(run_id, "running", device="cpu" if os.environ.get("TRANSFER_STUDIO_DEVICE") == "cpu" else None)
    ctx = jobs.JobContext(run_id=run_id, config=config, run_dir=runs.run_dir(run_id))
    status, summary, error = jobs.execute(kind, ctx)
    runs.set_status(run_id, status, error=error, summary=summary or None)
    if status != "done":
        raise UserError(f"the demo {kind} run failed: {error}")
    return run_id


def _has_run(kind: str, title: str) -> bool:
    return any(r["title"] == title and r["status"] == "done" for r in runs.list_runs(kind))


def run_config():
    """The demo's fine-tuning run: the sample with the default strategy, every setting from the recipe."""

    return FinetuneConfig(data=sample.SAMPLE_NAME, weights="auto", strategy=recipes.DEFAULT_STRATEGY)


def prepare(force: bool = False, epochs: int | None = None, generations: bool = True, lab: bool = True,
            step: Callable[[str], None] = lambda what: None) -> dict:
    """Fill the current workspace (TRANSFER_STUDIO_HOME) with demo content; idempotent.

    `step(what)` is called before each piece is made (progress; a job's cancel check).
    """
    mine = user_data()
    if mine and not force:
        raise UserError(f"this workspace holds your own data ({', '.join(mine[:3])}{'…' if len(mine) > 3 else ''}); "
                        "use another --workspace, --force to add the demo beside it, or --reset to delete it")
    done = {"workspace": str(workspace.home()), "added": []}
    step("sample dataset")
    ds = sample.load_sample()
    if not ds.get("existed"):
        done["added"].append("sample dataset")

    if not _has_run("finetune", DEMO_RUN_TITLE):
        step("fine-tuning run")
        cfg = dataclasses.replace(run_config(), epochs=epochs) if epochs else run_config()
        _run_in_foreground("finetune", DEMO_RUN_TITLE, asdict(cfg))
        done["added"].append("fine-tuning run")

    if lab and not _has_run("lab", DEMO_LAB_TITLE):
        from engine.lab import experiments as lab_engine  # deferred: imports torch

        step("pretrained-vs-scratch comparison")
        cfg = lab_engine.LabConfig(experiment="compare", data=sample.SAMPLE_NAME, preset="quick")
        _run_in_foreground("lab", DEMO_LAB_TITLE, {k: v for k, v in asdict(cfg).items() if v is not None})
        done["added"].append("pretrained-vs-scratch comparison")

    if generations:
        from engine.text import causal_lm, generation, history  # deferred: imports torch

        todo = _prompts_todo()
        if todo:
            step("generations")
            lm = causal_lm.load("auto")
            for i, prompt in enumerate(todo):
                cfg = generation.GenerationConfig(max_new_tokens=40, seed=1000 + i, **generation.PRESETS["Balanced"])
                gen = generation.generate(lm, prompt, cfg)
                history.save("auto", gen.prompt, {**gen.settings, "demo": True}, [s.completion for s in gen.samples], gen.stats())
            done["added"].append(f"{len(todo)} generations")
    return done


def reset(epochs: int | None = None, lab: bool = True, step: Callable[[str], None] = lambda what: None) -> dict:
    """Back to the demo: delete what is not the demo's, then add what the demo is missing."""
    step("removing datasets, runs and generations added since")
    removed = remove_user_data()
    done = prepare(force=True, epochs=epochs, lab=lab, step=step)
    return {**done, "removed": removed}


def run_job(ctx) -> dict:
    """Job runner (kind "demo"): `reset` in the background, with progress and a cancel check per step."""
    def step(what: str) -> None:
        ctx.check_cancel()
        ctx.report(phase="running", message=f"Demo: {what}…")

    cfg = ctx.config
    done = reset(epochs=cfg.get("epochs"), lab=bool(cfg.get("lab", True)), step=step)
    ctx.report(message="Demo ready: added " + (", ".join(done["added"]) or "nothing (already complete)"))
    return {"added": done["added"], "removed": len(done.get("removed", []))}
