"""The ``clipcl`` command line: a thin layer over the library (:mod:`clipcl.engine`, :mod:`clipcl.workspace`).

Every failure the user can fix prints one line, ``error: ...``, on stderr and exits with code 2; a wrong flag is a
usage error (also code 2). Anything else is a bug: one line naming it, exit code 1, and the traceback only with
``CLIPCL_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from . import __version__
from .engine import PRECISIONS, TaskReport, TrainOptions, add_task, default_workers
from .engine import Progress as EngineProgress
from .errors import ClipclError
from .methods import available_methods
from .workspace import DEFAULT_WORKSPACE, WORKSPACE_ENV, Workspace

DEBUG_ENV = "CLIPCL_DEBUG"


def out() -> Console:
    """A console for results, made per use so it follows the current terminal (and ``COLUMNS``)."""
    return Console()


def err() -> Console:
    """A console for progress and warnings, on stderr."""
    return Console(stderr=True)


def _one_line(message: str) -> str:
    """One line of a message; for an error re-raised from a DataLoader worker, its own last line."""
    message = str(message)
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return " ".join(message.split())


class OneLineErrors(TyperGroup):
    """Run commands so that every error reaches the user as one line and a meaningful exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except typer.TyperException as exc:  # usage errors: unknown flag, bad value, missing argument
            typer.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(130)
        except ClipclError as exc:
            typer.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            typer.echo(f"internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                       f"(set {DEBUG_ENV}=1 for the traceback)", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="clipcl",
    help="Teach a CLIP model new classes from image folders, task after task, without forgetting the old ones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

WorkspaceOption = Annotated[
    Path,
    typer.Option("--workspace", "-w", envvar=WORKSPACE_ENV, show_envvar=True,
                 help=f"Workspace folder (default ./{DEFAULT_WORKSPACE})."),
]


def _version_callback(value: bool) -> None:
    if value:
        out().print(f"clipcl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Teach a CLIP model new classes from image folders, task after task, without forgetting the old ones."""


def _parse_sets(values: list[str]) -> dict[str, str]:
    options = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            raise ClipclError(f"--set takes KEY=VALUE, got {value!r}")
        options[key.strip().replace("-", "_")] = val.strip()
    return options


def _methods_help() -> str:
    return "Continual-learning method: " + "; ".join(
        f"{name} ({cls.summary})" if cls.summary else name for name, cls in available_methods().items()
    )


@app.command()
def init(
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    model: Annotated[str, typer.Option(help="open_clip model name (ViT-B-16), hf-hub:ORG/NAME, or the path of "
                                             "a model-config JSON.")] = ...,
    pretrained: Annotated[str | None, typer.Option(help="Pretrained tag (openai, laion2b_s34b_b88k, ...) or a "
                                                        "weights file (.safetensors, .pt, .bin).")] = None,
    method: Annotated[str, typer.Option(help=_methods_help())] = "dma",
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                   help="A method option, e.g. --set lora_rank=16 (repeatable).")
                    ] = None,
) -> None:
    """Create a workspace for a base CLIP model and a method."""
    from .backbone import resolve_model_spec

    spec = resolve_model_spec(model, pretrained)
    ws = Workspace.create(workspace, spec, method, _parse_sets(set_ or []))
    options = ", ".join(f"{k}={v}" for k, v in ws.method_config.items())
    out().print(f"Created workspace [bold]{ws.path}[/]: model {spec.describe()}, method {method}"
                  + (f" ({options})" if options else ""))
    out().print(f"Next: clipcl add-task -w {ws.path} PATH/TO/FOLDER")


class RichProgress(EngineProgress):
    """Draws each stage of the engine as its own rich progress bar with the running loss and throughput."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.current: Any = None

    def warn(self, message: str) -> None:
        err().print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    def stage_start(self, description: str, total: int) -> None:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), console=err(),
        )
        self.bar.start()
        self.current = self.bar.add_task(description, total=total, metrics="")

    def stage_advance(self, steps: int = 1, **metrics: float) -> None:
        if self.bar is None:
            return
        text = "  ".join(f"{k.replace('_per_s', '/s').replace('images', 'img')} {v:.3g}" for k, v in metrics.items())
        self.bar.update(self.current, advance=steps, **({"metrics": text} if text else {}))

    def stage_end(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _report_table(report: TaskReport) -> Table:
    d = report.details
    table = Table(title=f"task {d['id']}: {d['name']}", show_header=True)
    for column in ("classes", "train images", "held-out", "epochs", "wall time", "images/s", "acc (this task)",
                   "acc (all tasks)"):
        table.add_column(column, justify="right")
    acc = report.accuracy
    table.add_row(
        str(len(d["classes"])),
        str(sum(d["counts"]["train"].values())),
        str(sum(d["counts"]["heldout"].values())),
        str(d["training"]["epochs"]),
        f"{d['timings']['train_s']:.1f}s",
        f"{d['timings']['images_per_s']:.1f}",
        _percent(acc.get("task")),
        _percent(acc.get("all")),
    )
    return table


@app.command("add-task")
def add_task_command(
    folder: Annotated[Path, typer.Argument(help="Folder of class sub-folders (or train/ and test/ splits).",
                                           show_default=False)],
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    name: Annotated[str | None, typer.Option(help="Task name (default: the folder's name).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the method's).", min=0)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.", min=1)] = 32,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the method's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and shuffling.")] = 0,
    holdout: Annotated[float, typer.Option(help="Share of each class held out for evaluation when the folder "
                                                "has no test/ split.", min=0.0, max=0.95)] = 0.2,
    precision: Annotated[str, typer.Option(help=f"One of {', '.join(PRECISIONS)}.")] = "fp32",
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.", min=0)] = default_workers(),
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate every task after training.")] = True,
) -> None:
    """Learn a folder of classes as the workspace's next task, then evaluate and store it."""
    options = TrainOptions(name=name, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, holdout=holdout,
                           precision=precision, workers=workers, evaluate=evaluate)
    report = add_task(workspace, folder, options, RichProgress())
    if not report.is_main_process:
        return
    out().print(_report_table(report))
    out().print(f"Stored task {report.details['id']} in {Path(workspace) / report.task.dir}")


@app.command()
def tasks(
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List what the workspace has learned: tasks, classes, sizes, when, and how well."""
    ws = Workspace.open(workspace)
    rows = []
    for task in ws.tasks:
        details = ws.task_json(task)
        rows.append({
            "id": task.info.index,
            "name": task.name,
            "classes": list(task.info.classes),
            "train_images": sum(details["counts"]["train"].values()),
            "heldout_images": sum(details["counts"]["heldout"].values()),
            "tensor_bytes": details["tensors"]["bytes"],
            "created_at": task.created_at,
            "epochs": details["training"]["epochs"],
            "accuracy": details.get("accuracy"),
        })
    if as_json:
        summary = {"workspace": str(ws.path), "model": ws.model_spec.describe(), "method": ws.method_name,
                   "method_config": ws.method_config, "classes": ws.classes, "tasks": rows}
        print(json.dumps(summary, indent=2))
        return
    out().print(f"[bold]{ws.path}[/]: model {ws.model_spec.describe()}, method {ws.method_name}, "
                  f"{len(ws.classes)} classes in {len(rows)} tasks")
    table = Table(show_header=True)
    for column, justify in (("task", "right"), ("name", "left"), ("classes", "left"), ("train", "right"),
                            ("held-out", "right"), ("stored", "right"), ("added", "left"),
                            ("acc (task)", "right"), ("acc (all)", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        accuracy = row["accuracy"] or {}
        names = ", ".join(row["classes"])
        table.add_row(str(row["id"]), row["name"], names if len(names) <= 60 else names[:57] + "...",
                      str(row["train_images"]), str(row["heldout_images"]), _size(row["tensor_bytes"]),
                      row["created_at"].replace("T", " ")[:16], _percent(accuracy.get("task")),
                      _percent(accuracy.get("all")))
    out().print(table)


def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return str(n_bytes)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
