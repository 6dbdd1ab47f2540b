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
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from .errors import ClipclError
from .methods import method_summaries
from .reading import DEFAULT_MAX_IMAGE_BYTES, MIB
from .runtime import PRECISIONS, default_workers
from .runtime import Progress as EngineProgress
from .version import __version__
from .workspace import DEFAULT_WORKSPACE, WORKSPACE_ENV, Workspace

if TYPE_CHECKING:
    from .engine import TaskReport

# Nothing above imports torch, open_clip or peft: `--help`, `--version`, `tasks` and usage errors answer in a fraction
# of a second. Each command imports the library code that runs a model inside its own body.

DEBUG_ENV = "CLIPCL_DEBUG"
DEFAULT_WORKERS = default_workers()


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
        except OSError as exc:  # the machine, not the input: a full disk, a read-only folder, a vanished file
            if os.environ.get(DEBUG_ENV):
                raise
            where = f": {exc.filename}" if exc.filename else ""
            typer.echo(f"error: {exc.strerror or _one_line(str(exc))}{where}", err=True)
            sys.exit(1)
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


RouteOption = Annotated[
    str | None,
    typer.Option(help="Run only the K best-matching tasks' adapters per image, or 'all' for every task's (methods "
                      "that route by task, e.g. dma); default: the method's own K, recorded in the workspace.",
                 metavar="K|all", show_default=False),
]
PrecisionOption = Annotated[str, typer.Option(help=f"One of {', '.join(PRECISIONS)}.")]
InferenceSetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE",
                 help="Use another value of an inference option for this command only, e.g. --set router=mahalanobis "
                      "(dma: router, router_shrinkage, text_weight, adapted_weight, fit_weight, route); nothing is "
                      "stored."),
]
WorkersOption = Annotated[int, typer.Option(help="Data-loading worker processes.", min=0)]
DEFAULT_MAX_IMAGE_MB = DEFAULT_MAX_IMAGE_BYTES // MIB
MaxImageOption = Annotated[float, typer.Option("--max-image-mb", metavar="MIB",
                                               help="Skip image files larger than this, without reading them.")]


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
        f"{name} ({summary})" if summary else name for name, summary in method_summaries().items()
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
    from .modelspec import resolve_model_spec

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

    def info(self, message: str) -> None:
        err().print(f"[bold cyan]{escape(message)}[/]", highlight=False, soft_wrap=True)

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
    record = report.record
    table = Table(title=f"task {record.id}: {record.name}", show_header=True)
    for column in ("classes", "train images", "held-out", "epochs", "wall time", "images/s", "acc (this task)",
                   "acc (all tasks)"):
        table.add_column(column, justify="right")
    accuracy = record.accuracy
    table.add_row(
        str(len(record.classes)),
        str(record.train_images),
        str(record.heldout_images),
        str(record.training.epochs),
        f"{record.timings.train_s:.1f}s",
        f"{record.timings.images_per_s:.1f}",
        _percent(accuracy.task if accuracy else None),
        _percent(accuracy.all if accuracy else None),
    )
    return table


@app.command("add-task")
def add_task_command(
    ctx: typer.Context,
    folder: Annotated[Path | None, typer.Argument(help="Folder of class sub-folders (or train/ and test/ splits); "
                                                       "optional with --resume.", show_default=False)] = None,
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    name: Annotated[str | None, typer.Option(help="Task name (default: the folder's name).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: the method's); for methods that "
                                                    "train in two stages, epochs of each.", min=0)] = None,
    epochs_stage2: Annotated[int | None, typer.Option("--epochs-stage2", help="Epochs of the second stage, for "
                                                      "methods that train in two (dmc, dmc-ot).", min=0,
                                                      show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.", min=1)] = 32,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the method's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and shuffling.")] = 0,
    holdout: Annotated[float, typer.Option(help="Share of each class held out for evaluation when the folder "
                                                "has no test/ split.", min=0.0, max=0.95)] = 0.2,
    precision: PrecisionOption = "fp32",
    workers: WorkersOption = DEFAULT_WORKERS,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate every task after training.")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted add-task from its last finished "
                                                          "epoch, with its folder and settings.")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for another clipcl process writing the workspace "
                                             "(default: fail at once).", min=0.0)] = 0.0,
    max_image_mb: MaxImageOption = DEFAULT_MAX_IMAGE_MB,
) -> None:
    """Learn a folder of classes as the workspace's next task, then evaluate and store it."""
    values = {"name": name, "epochs": epochs, "epochs_stage2": epochs_stage2, "batch_size": batch_size, "lr": lr,
              "seed": seed, "holdout": holdout, "precision": precision, "workers": workers,
              "max_image_mb": max_image_mb}
    # what the command line gave; the rest stays unset (the library's defaults, or a resumed run's settings)
    given = {key: value for key, value in values.items()
             if getattr(ctx.get_parameter_source(key), "name", None) == "COMMANDLINE"}
    from .engine import TrainOptions, add_task

    options = TrainOptions(**given, evaluate=evaluate, lock_wait=wait)
    report = add_task(workspace, folder, options, RichProgress(), resume=resume)
    if not report.is_main_process:
        return
    out().print(_report_table(report))
    out().print(f"Stored task {report.record.id} in {Path(workspace) / report.task.dir}")


@app.command()
def tasks(
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List what the workspace has learned: tasks, classes, sizes, when, and how well."""
    from .summary import tasks_summary

    ws = Workspace.open(workspace)
    summary = tasks_summary(ws)  # the same dict `clipcl serve` answers at GET /tasks
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    rows, removed, resumable = summary["tasks"], ws.removed_tasks, summary["interrupted"]
    out().print(f"[bold]{ws.path}[/]: model {ws.model_spec.describe()}, method {ws.method_name}, "
                  f"{len(ws.classes)} classes in {len(rows)} tasks" + (f", {len(removed)} removed" if removed else ""))
    table = Table(show_header=True)
    for column, justify in (("task", "right"), ("name", "left"), ("classes", "left"), ("train", "right"),
                            ("held-out", "right"), ("stored", "right"), ("added", "left"),
                            ("acc (task)", "right"), ("acc (all)", "right")):
        table.add_column(column, justify=justify)
    with_notes = any(row["method"] for row in rows)
    if with_notes:
        table.add_column(ws.method_name, justify="left")
    gone = [{"id": r.id, "removed": r} for r in removed]
    for row in sorted([*rows, *gone], key=lambda row: row["id"]):
        if "removed" in row:  # kept in the list, by its number, so the history reads in order
            r = row["removed"]
            classes = ", ".join(r.classes)
            table.add_row(str(r.id), f"{escape(r.name)} (removed {r.removed_at.replace('T', ' ')[:16]})",
                          classes if len(classes) <= 60 else classes[:57] + "...", "-", "-", "-",
                          r.created_at.replace("T", " ")[:16], "-", "-", *(("",) if with_notes else ()), style="dim")
            continue
        accuracy = row["accuracy"] or {}
        names = ", ".join(row["classes"])
        table.add_row(str(row["id"]), row["name"], names if len(names) <= 60 else names[:57] + "...",
                      str(row["train_images"]), str(row["heldout_images"]), _size(row["tensor_bytes"]),
                      row["created_at"].replace("T", " ")[:16], _percent(accuracy.get("task")),
                      _percent(accuracy.get("all")), *((_method_notes(row["method"]),) if with_notes else ()))
    out().print(table)
    if resumable is not None:
        out().print(f"Interrupted: task {resumable['task']} ({escape(resumable['name'])}) stopped after epoch "
                    f"{resumable['epochs_done']} of stage {resumable['stage']}; continue it with "
                    "`clipcl add-task --resume`")


@app.command("remove-task")
def remove_task_command(
    task: Annotated[str, typer.Argument(help="The task's number or name (`clipcl tasks` lists them).",
                                        show_default=False)],
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    wait: Annotated[float, typer.Option(help="Seconds to wait for another clipcl process writing the workspace "
                                             "(default: fail at once).", min=0.0)] = 0.0,
) -> None:
    """Take a task and its classes out of the workspace, as if it had never been learned.

    Only for methods whose tasks are independent of each other (dma, lda, ncm, zeroshot): the workspace then predicts
    as one that learned the other tasks alone. The task's files are deleted; later tasks keep their numbers, and the
    accuracy matrix keeps its row and column, marked as removed.
    """
    from .workspace import remove_task

    removal = remove_task(workspace, task, wait=wait, on_wait=RichProgress().warn)
    removed = removal.removed
    if removal.discarded_checkpoint:
        RichProgress().warn("dropped the checkpoint of an interrupted add-task: it trained with the removed task "
                            "present, so it cannot be resumed; run that add-task again")
    out().print(f"Removed task {removed.id} ({escape(removed.name)}) and its {len(removed.classes)} classes "
                f"({escape(', '.join(removed.classes))}); {len(removal.tasks)} task(s) left")


def _shown_path(path: str) -> str:
    """A path as the user would type it: relative to the current folder where it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns "
                                                    "(quote them: 'photos/**/*.jpg').", show_default=False)],
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes to show per image.", min=1)] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image and line.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 32,
    route: RouteOption = None,
    set_: InferenceSetOption = None,
    workers: WorkersOption = DEFAULT_WORKERS,
    precision: PrecisionOption = "fp32",
    max_image_mb: MaxImageOption = DEFAULT_MAX_IMAGE_MB,
) -> None:
    """Predict the classes of images over everything the workspace has learned.

    An image that cannot be read gets an error line of its own; the others are still predicted, and the exit code
    is 1 at the end. Entries of a folder that are not regular files (a FIFO, a socket, a device) are skipped with a
    warning and never opened.
    """
    from .inference import expand_image_paths, predict_images

    not_files: dict[str, str] = {}

    def skipped(path: Path, why: str) -> None:
        not_files[str(path)] = why

    files, unmatched = expand_image_paths(paths, on_skip=skipped)
    named = {str(Path(pattern).expanduser()) for pattern in unmatched}
    for path, why in not_files.items():
        if path not in named:
            RichProgress().warn(f"skipped {path}: {why}")

    def why_unmatched(pattern: str) -> str:
        return not_files.get(str(Path(pattern).expanduser()), "no such file, folder or matching image")

    if not files:
        raise ClipclError(f"no image found at {'; '.join(f'{p} ({why_unmatched(p)})' for p in paths)}")
    predictions = predict_images(workspace, files, top_k=top_k, route=route, batch_size=batch_size, workers=workers,
                                 precision=precision, options=_parse_sets(set_ or []), max_image_mb=max_image_mb)
    failures = 0

    def report_error(path: str, message: str) -> None:
        nonlocal failures
        failures += 1
        if as_json:
            print(json.dumps({"path": path, "error": message}), flush=True)
        else:
            err().print(f"error: {escape(path)}: {escape(message)}", highlight=False, soft_wrap=True)

    for pattern in unmatched:
        report_error(pattern, why_unmatched(pattern))
    table = Table(show_header=True)
    for column, justify in (("image", "left"), ("class", "left"), ("task", "left"), ("prob", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for result in predictions:
        if result.error is not None:
            report_error(result.path, f"cannot read the image: {result.error}")
        elif as_json:
            print(json.dumps(result.to_json()), flush=True)
        else:
            for rank, score in enumerate(result.top):
                table.add_row(escape(_shown_path(result.path)) if rank == 0 else "", escape(score.class_name),
                              escape(f"{score.task} ({score.task_name})"), f"{100 * score.prob:.2f}%",
                              end_section=rank == len(result.top) - 1)
    if not as_json and table.row_count:
        out().print(table)
    if failures:
        raise typer.Exit(1)


def _metric(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


@app.command("eval")
def eval_command(
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    tasks_: Annotated[str, typer.Option("--tasks", help="'all', or task numbers or names: --tasks 1,3.")] = "all",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the accuracy-matrix heatmap and the accuracy-after-each-"
                                                   "task curve to this image (.png, .svg, .pdf).",
                                              show_default=False)] = None,
    route: RouteOption = None,
    set_: InferenceSetOption = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.", min=1)] = 64,
    workers: WorkersOption = DEFAULT_WORKERS,
    precision: PrecisionOption = "fp32",
) -> None:
    """Evaluate every learned task on its held-out images, and show the accuracy matrix and its metrics.

    Predictions range over every class learned so far. The matrix is the one add-task stored after each task
    (row i: after task i); Avg, Last, Forgetting and BWT are computed from it.
    """
    from .inference import evaluate
    from .plot import check_plot_path, plot_accuracy

    if plot is not None:
        check_plot_path(plot)
    report = evaluate(workspace, tasks_, route=route, batch_size=batch_size, workers=workers, precision=precision,
                      progress=RichProgress(), options=_parse_sets(set_ or []))
    if not report.is_main_process:
        return
    if plot is not None:
        names = [t.name for t in report.workspace.tasks]
        plot_accuracy(plot, report.matrix, report.metrics.accuracy_after_task, names,
                      title=f"{report.workspace.path.name}: {report.workspace.method_name}")
        err().print(f"Wrote {escape(str(plot))}", highlight=False)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    ev = report.evaluation
    routed = ev.task_id_accuracy is not None
    route_text = f", route {report.route}" if report.route is not None else ""
    table = Table(title=f"held-out accuracy now ({len(report.workspace.classes)} classes{route_text})")
    for column, justify in (("task", "right"), ("name", "left"), ("classes", "right"), ("images", "right"),
                            ("accuracy", "right"), (("task-id", "right") if routed else ("task given", "right"))):
        table.add_column(column, justify=justify)
    for task, acc, n, within, tid in zip(report.tasks, ev.per_task, ev.images, ev.within_task_per_task,
                                         ev.task_id_per_task, strict=True):
        table.add_row(str(task.info.index), escape(task.name), str(len(task.info.classes)), str(n), _percent(acc),
                      _percent(tid if routed else within))
    table.add_row("all", "", str(sum(len(t.info.classes) for t in report.tasks)), str(sum(ev.images)),
                  _percent(ev.accuracy), _percent(ev.task_id_accuracy if routed else report.within_task_accuracy),
                  style="bold")
    out().print(table)
    # every task ever learned, by number; a removed task's row and column stay, marked, out of the metrics
    history = report.history
    numbers = history.tasks if history is not None else [t.info.index for t in report.workspace.tasks]
    gone = set(history.removed) if history is not None else set()
    rows = history.matrix if history is not None else report.matrix
    caption = "row: after task i; column: task j" + ("; removed tasks: as stored, left out of the metrics"
                                                       if gone else "")
    matrix = Table(title="stored accuracy matrix (%)", caption=caption)
    matrix.add_column("after", justify="right")
    for number in numbers:
        matrix.add_column(f"task {number}" + (" (removed)" if number in gone else ""), justify="right")
    matrix.add_column("acc", justify="right", style="bold")
    after = iter(report.metrics.accuracy_after_task)
    for number, row in zip(numbers, rows, strict=True):
        cells = [_metric(row[j]) if j < len(row) else "" for j in range(len(numbers))]
        if number in gone:
            matrix.add_row(f"{number} (removed)", *cells, "-", style="dim")
        else:
            matrix.add_row(str(number), *cells, _metric(next(after)))
    out().print(matrix)
    m = report.metrics
    out().print(f"Avg {_metric(m.avg)}  Last {_metric(m.last)}  Forgetting {_metric(m.forgetting)}  "
                f"BWT {_metric(m.bwt, signed=True)}  (percent)")
    if ev.encoder_passes_per_image is not None:
        out().print(f"image-encoder passes per image: {ev.encoder_passes_per_image:.2f}")


@app.command()
def bench(
    split_dir: Annotated[Path, typer.Argument(help="Folder of task-1 ... task-N, each with train/ and test/.",
                                              show_default=False)],
    methods: Annotated[str, typer.Option(help="Comma-separated methods to compare; 'joint' is finetune trained on "
                                              "all classes at once (the upper bound). NAME:KEY=VALUE sets a "
                                              "method option, e.g. cma:align_weight=0 for an ablation.")
                       ] = "dma,ncm,zeroshot,finetune,joint",
    model: Annotated[str, typer.Option(help="open_clip model name, hf-hub:ORG/NAME, or a model-config JSON.")] = ...,
    pretrained: Annotated[str | None, typer.Option(help="Pretrained tag or weights file.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per task for the methods that train (default: each "
                                                    "method's).", min=0)] = None,
    epochs_stage2: Annotated[int | None, typer.Option("--epochs-stage2", help="Epochs of the second stage of "
                                                      "two-stage methods (default: --epochs).", min=0,
                                                      show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.", min=1)] = 32,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: each method's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every method.")] = 0,
    tasks_: Annotated[int | None, typer.Option("--tasks", help="Use only the first N tasks.", min=1,
                                               show_default=False)] = None,
    validation: Annotated[float | None, typer.Option(help="Choose settings, not report: keep this seeded, "
                                                         "stratified share of each task's training images as its "
                                                         "test set (e.g. 0.2); the test/ folders are never read.",
                                                    metavar="FRACTION", show_default=False)] = None,
    precision: PrecisionOption = "fp32",
    workers: WorkersOption = DEFAULT_WORKERS,
    out_file: Annotated[Path | None, typer.Option("--out", help="Write the results as JSON to this file.",
                                                  show_default=False)] = None,
    workspaces: Annotated[Path | None, typer.Option(help="Keep each method's workspace in this folder "
                                                         "(default: temporary, removed).", show_default=False)
                          ] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw every method's accuracy after each task to this image "
                                                   "(.png, .svg, .pdf).", show_default=False)] = None,
) -> None:
    """Run methods on a class-incremental split, each in a fresh workspace, and compare Avg, Last, Forgetting."""
    from .bench import BenchSettings, run_benchmark
    from .plot import check_plot_path, plot_methods

    if plot is not None:
        check_plot_path(plot)

    settings = BenchSettings(epochs=epochs, epochs_stage2=epochs_stage2, batch_size=batch_size, lr=lr, seed=seed,
                             workers=workers, precision=precision, max_tasks=tasks_, validation=validation)
    results = run_benchmark(split_dir, methods.split(","), model, pretrained, settings, RichProgress(), workspaces,
                            out_file)
    table = Table(title=f"{Path(results['split']).name}: {len(results['tasks'])} tasks, model {model}, "
                        f"evaluated on {results['evaluated_on']}")
    for column in ("method", "Avg", "Last", "Forgetting", "BWT", "task given", "task-id", "passes/img",
                   "train time", "train img/s", "last eval"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in results["methods"]:
        passes = row.get("encoder_passes_per_image")
        table.add_row(row["method"], _metric(row["avg"]), _metric(row["last"]), _metric(row["forgetting"]),
                      _metric(row["bwt"], signed=True), _metric(row.get("within_task_last")),
                      _metric(row.get("task_id_accuracy")), "-" if passes is None else f"{passes:.2f}",
                      f"{row['train_s']:.1f}s",
                      "-" if row["train_images_per_s"] is None else f"{row['train_images_per_s']:.1f}",
                      "-" if row.get("eval_s") is None else f"{row['eval_s']:.1f}s")
    out().print(table)
    if out_file is not None:
        out().print(f"Wrote {escape(str(out_file))}")
    if plot is not None:
        curves = {row["method"]: row["accuracy_after_task"] for row in results["methods"]}
        plot_methods(plot, curves, title=f"{Path(results['split']).name} ({results['evaluated_on'].split(' (')[0]})")
        out().print(f"Wrote {escape(str(plot))}")


def _method_notes(metadata: dict[str, Any]) -> str:
    """A method's facts about a task (task_metadata), one "name: value" per line; byte counts made readable."""
    def shown(key: str, value: Any) -> str:
        if "bytes" in key and isinstance(value, int):
            return _size(value)
        if isinstance(value, dict):
            return "; ".join(f"{k}: {shown(k, v)}" for k, v in value.items())
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "none"
        return str(value)

    return escape("\n".join(f"{key.replace('_', ' ')}: {shown(key, value)}" for key, value in metadata.items()))


def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return str(n_bytes)


@app.command()
def serve(
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    host: Annotated[str, typer.Option(help="Address to listen on; the default answers this machine only (0.0.0.0: "
                                           "every network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one; the address is logged).", min=0,
                                      max=65535)] = 8000,
    route: RouteOption = None,
    set_: InferenceSetOption = None,
    max_batch: Annotated[int, typer.Option(help="Most images in one forward pass: concurrent requests are batched "
                                                "together up to this.", min=1)] = 32,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests before it runs.",
                                                 min=0.0)] = 5.0,
    max_request_mb: Annotated[float, typer.Option("--max-request-mb", metavar="MIB",
                                                  help="Refuse larger request bodies (413).")] = 64.0,
    max_image_mb: Annotated[float, typer.Option("--max-image-mb", metavar="MIB",
                                                help="Refuse larger image files (413).")] = 32.0,
    max_files: Annotated[int, typer.Option(help="Most images in one request.", min=1)] = 256,
    watch_interval: Annotated[float, typer.Option(help="Seconds between looks for a task committed by another "
                                                       "process (0: never reload).", min=0.0)] = 0.5,
    precision: PrecisionOption = "fp32",
) -> None:
    """Answer predictions over HTTP (POST /predict, GET /tasks, /health, and a page at /), batching concurrent
    requests; tasks committed meanwhile by another process go live without a restart."""
    from .serve import ServeSettings, run_server  # torch and the server packages: only when serving

    run_server(ServeSettings(workspace=workspace, host=host, port=port, route=route, options=_parse_sets(set_ or []),
                             max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_request_mb=max_request_mb,
                             max_image_mb=max_image_mb, max_files=max_files, precision=precision,
                             watch_interval=watch_interval))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
