"""`engine models list|download|delete|import`: the model manager, with a progress line for downloads."""
from __future__ import annotations

from engine.cli.common import Parser, ProgressLine, command, emit


def cmd_models_list(args) -> int:
    from engine.models import sources, store  # deferred: off the CLI's start-up

    found = store.catalog()
    net = "online" if sources.online() else f"offline: {sources.offline_reason()}"
    emit(args, {"models": [m.to_dict() for m in found], "online": sources.online()}, store.format_table(found) + f"\n({net})")
    return 0


def cmd_models_download(args) -> int:
    from engine.jobs import JobContext, ctrl_c_cancels  # deferred: off the CLI's start-up
    from engine.models import store  # deferred: off the CLI's start-up

    ctx = JobContext(run_id="download", config={"name": args.name}, run_dir=None)
    with ctrl_c_cancels(ctx):  # Ctrl-C stops the download cleanly
        path = store.download(args.name, report=ProgressLine(), cancelled=ctx.cancelled)
    m = store.get(args.name)
    emit(args, m.to_dict(), f"{m.name}: {m.status}, {m.size_mb:.0f} MB at {path}")
    return 0


def cmd_models_delete(args) -> int:
    from engine.models import store  # deferred: off the CLI's start-up

    m = store.delete(args.name)
    emit(args, m.to_dict(), f"deleted {args.name} (now {m.status})")
    return 0


def cmd_models_import(args) -> int:
    from engine.models import store  # deferred: off the CLI's start-up

    m = store.import_file(args.file, name=args.name)
    emit(args, m.to_dict(), f"imported {m.name}: {m.status}, {m.size_mb:.0f} MB at {m.path}")
    return 0


def add_commands(sub) -> None:
    models = sub.add_parser("models", help="list, download, delete or import pretrained weights").add_subparsers(
        dest="models_command", required=True, parser_class=Parser)
    command(models, "list", cmd_models_list, "every model the app knows, with its status, size and place")
    command(models, "download", cmd_models_download, "download a model's weights (with progress; Ctrl-C stops cleanly)",
            ("name", "a name from `models list` (e.g. resnet18, gpt2) or a hub id org/model"))
    command(models, "delete", cmd_models_delete, "delete a downloaded or imported model", "name")
    s = command(models, "import", cmd_models_import, "bring in a torchvision ImageNet .pth or a zipped Hugging Face model folder", "file")
    s.add_argument("--name", default=None, help=".pth: the architecture (default: found from the tensors); .zip: the model id (default: the file name)")
