"""``clipcl serve``: a workspace answering over HTTP while it keeps learning.

A ``clipcl predict`` process pays seconds of loading before its first answer; a server loads the model once and
answers in milliseconds. Three parts make it safe to leave running beside ``add-task``:

- **One model thread.** Requests are decoded in a small pool of threads, then queued; a single worker thread owns
  the model and runs whatever is queued together (up to ``max_batch`` images, after waiting ``batch_wait_ms`` for
  more), so concurrent clients share forward passes instead of queueing behind each other.
- **Live reload.** A watcher polls the manifest (the file every commit replaces last, atomically). When another
  process commits, the new state is loaded *beside* the running one (:meth:`Workspace.open`,
  :meth:`Workspace.build_method`, every stored file checked against its checksum); the worker switches to it between
  two batches. A batch, and so every request, is answered wholly by one state, named in the ``X-Clipcl-State`` and
  ``X-Clipcl-Tasks`` headers. A state that fails to load (half-written, damaged, other base weights) never replaces
  the one being served: one line is logged and the server goes on.
- **Bounds.** A request body is refused past ``max_request_mb`` (413, before it is all read), an image file past
  ``max_image_mb`` or over Pillow's decompression-bomb limit likewise (413); an image that cannot be decoded gets its
  own error object in the answer, as in ``clipcl predict --json``. The server only reads the workspace: killing it
  at any moment loses nothing.

Endpoints: ``POST /predict``, ``GET /tasks`` (what ``clipcl tasks --json`` prints), ``GET /health``, ``GET /`` (a
page to try it in a browser) and ``GET /plot.svg`` (the stored accuracy matrix and curve). FastAPI, uvicorn and
python-multipart are the optional extra ``clipcl[serve]``; they are imported only when a server is built.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at run time

import asyncio
import contextlib
import hashlib
import logging
import os
import queue
import re
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data import load_image_checked, why_unreadable
from .errors import ClipclError
from .inference import ClassScore, ImagePrediction, check_route, class_owners, stored_matrix, top_classes
from .methods import Method, Route, build_config, check_inference_overrides, get_method_class
from .metrics import ContinualMetrics, continual_metrics
from .reading import MAX_JSON_BYTES, MIB, format_size, read_bounded
from .runtime import PRECISIONS, make_accelerator, require_single_process
from .summary import task_rows, tasks_summary
from .workspace import MANIFEST, Workspace

log = logging.getLogger("clipcl.serve")

SERVER_PACKAGES = "fastapi, uvicorn and python-multipart"
INSTALL_HINT = "pip install 'clipcl[serve]'"
FILE_FIELDS = ("files", "file")
STATE_HEADER = "X-Clipcl-State"
TASKS_HEADER = "X-Clipcl-Tasks"
DEFAULT_TOP_K = 5
NO_TASK = "the workspace has learned no task yet: run `clipcl add-task`; the server picks it up by itself"
REHASH_EVERY_S = 5.0  # a manifest replaced within one mtime tick with the same size is still noticed
_IN_MEMORY = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")  # Pillow names the buffer; the user knows a name


@dataclass(frozen=True)
class ServeSettings:
    """What ``clipcl serve`` was told; checked by :func:`check_settings` before anything is loaded."""

    workspace: Path
    host: str = "127.0.0.1"
    port: int = 8000
    route: int | str | None = None
    options: dict[str, str] = field(default_factory=dict)
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    max_request_mb: float = 64.0
    max_image_mb: float = 32.0
    max_files: int = 256
    precision: str = "fp32"
    watch_interval: float = 0.5  # seconds between looks at the manifest; 0: never reload
    decode_threads: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MIB)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * MIB)


def check_settings(settings: ServeSettings) -> None:
    """Refuse settings that cannot work, in one line, before the model is loaded or the port taken."""
    if settings.max_batch < 1:
        raise ClipclError(f"--max-batch must be at least 1, got {settings.max_batch}")
    if settings.batch_wait_ms < 0 or settings.watch_interval < 0:
        raise ClipclError("--batch-wait-ms and --watch-interval cannot be negative")
    if not settings.max_request_mb > 0 or not settings.max_image_mb > 0:
        raise ClipclError("--max-request-mb and --max-image-mb must be positive")
    if settings.max_files < 1:
        raise ClipclError(f"--max-files must be at least 1, got {settings.max_files}")
    if not 0 <= settings.port <= 65535:
        raise ClipclError(f"--port must be between 0 and 65535, got {settings.port}")
    if settings.precision not in PRECISIONS:
        raise ClipclError(f"--precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")


def require_server_packages() -> None:
    """The optional extra is installed, or one line that says how to install it."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ClipclError(f"clipcl serve needs {SERVER_PACKAGES} ({exc.name} is missing): {INSTALL_HINT}") from None
    try:  # starlette imports it only when the first form is parsed: find out now
        import python_multipart  # noqa: F401
    except ModuleNotFoundError:
        try:
            import multipart  # noqa: F401  (python-multipart before 0.0.13)
        except ModuleNotFoundError:
            raise ClipclError(f"clipcl serve needs {SERVER_PACKAGES} (python-multipart is missing): "
                              f"{INSTALL_HINT}") from None


# --- a loaded state ------------------------------------------------------------------------------------------------
def manifest_sha256(workspace: Path) -> str:
    """The sha256 of the manifest's bytes: the id of a committed state (every commit rewrites the manifest)."""
    return hashlib.sha256(read_bounded(workspace / MANIFEST, MAX_JSON_BYTES)).hexdigest()


class StateMoved(Exception):
    """Another commit replaced the manifest while a state was being opened: look again."""


@dataclass
class ServedState:
    """One committed state of the workspace, loaded: the model with every task, and what the endpoints report.

    Everything read from disk is read when the state is loaded, so a state keeps answering after a later commit
    (or a ``remove-task``) changed or removed the files it came from."""

    workspace: Workspace
    sha256: str
    method: Method | None  # None while the workspace has learned nothing
    owners: list[tuple[int, str]]  # per class: (task number, task name)
    rows: list[dict[str, Any]]  # clipcl tasks --json's "tasks"
    matrix: list[list[float | None]]
    metrics: ContinualMetrics
    loaded_at: float = field(default_factory=time.time)
    _plot: bytes | None = field(default=None, repr=False)
    _plot_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def id(self) -> str:
        return self.sha256[:16]

    @property
    def n_tasks(self) -> int:
        return len(self.rows)

    @property
    def classes(self) -> list[str]:
        return self.method.classes if self.method is not None else []

    def headers(self) -> dict[str, str]:
        return {STATE_HEADER: self.id, TASKS_HEADER: str(self.n_tasks)}

    def describe(self) -> str:
        return f"{_count(self.n_tasks, 'task')}, {_count(len(self.classes), 'class')}, state {self.id}"

    def plot_svg(self) -> bytes | None:
        """The accuracy-matrix heatmap and curve (:func:`clipcl.plot.plot_accuracy`) as SVG, drawn once per state;
        ``None`` when there is nothing to draw or matplotlib is missing."""
        if not self.rows:
            return None
        with self._plot_lock:
            if self._plot is None:
                try:
                    from .plot import plot_accuracy
                except ImportError:
                    return None
                with tempfile.TemporaryDirectory(prefix="clipcl-plot-") as folder:
                    path = Path(folder) / "accuracy.svg"
                    names = [row["name"] for row in self.rows]
                    plot_accuracy(path, self.matrix, self.metrics.accuracy_after_task, names,
                                  title=f"{self.workspace.path.name}: {self.workspace.method_name}")
                    self._plot = path.read_bytes()
            return self._plot


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def load_state(path: Path, options: dict[str, str], device: Any) -> ServedState:
    """Load the workspace's committed state: the manifest, every task's record and tensors (checksums verified) and
    the model. Raises :class:`StateMoved` when a commit replaced the manifest meanwhile, any error when it cannot
    be used."""
    before = manifest_sha256(path)
    ws = Workspace.open(path)
    if manifest_sha256(path) != before:
        raise StateMoved()
    records = [ws.task_record(task) for task in ws.tasks]
    rows = task_rows(ws)
    matrix, sizes = stored_matrix(records)
    method = ws.build_method(device=device, overrides=options) if ws.tasks else None
    owners = [] if method is None else class_owners(method, {task.info.index: task.name for task in ws.tasks})
    return ServedState(ws, before, method, owners, rows, matrix, continual_metrics(matrix, sizes))


# --- the model thread ----------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """What the model thread gives a request: the state that answered and each image's top classes."""

    state: ServedState
    top: list[list[ClassScore]]


@dataclass
class _Job:
    images: list[torch.Tensor]
    top_k: int
    future: Future = field(default_factory=Future)


@dataclass
class ServeStats:
    """Counters the model thread and the watcher keep, for ``GET /health``."""

    requests: int = 0
    images: int = 0
    batches: int = 0
    largest_batch: int = 0
    forward_passes: int = 0
    reloads: int = 0
    failed_reloads: int = 0
    last_reload_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "images": self.images, "batches": self.batches,
                "largest_batch": self.largest_batch, "forward_passes": self.forward_passes,
                "reloads": self.reloads, "failed_reloads": self.failed_reloads,
                "last_reload_error": self.last_reload_error}


class Batcher:
    """The one thread that runs the model: takes queued requests together, and switches states between batches.

    A request is never split across batches, so one state answers all of its images; a request of more than
    ``max_batch`` images runs alone, in passes of ``max_batch``."""

    def __init__(self, state: ServedState, settings: ServeSettings, route: Route, autocast: Callable[[], Any],
                 stats: ServeStats) -> None:
        self.max_batch = settings.max_batch
        self.wait_s = settings.batch_wait_ms / 1000
        self.route = route
        self.autocast = autocast
        self.stats = stats
        self._state = state
        self._pending: ServedState | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._arriving = 0  # requests being read or decoded: a batch waits for them only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipcl-model", daemon=True)

    @property
    def state(self) -> ServedState:
        """The state the next batch will be answered by."""
        return self._state

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        while True:
            try:
                self._queue.get_nowait().future.cancel()
            except queue.Empty:
                break

    def offer(self, state: ServedState) -> None:
        """Serve ``state`` from the next batch on (the model thread makes the switch, never during a batch)."""
        with self._lock:
            self._pending = state

    @contextlib.contextmanager
    def arriving(self) -> Any:
        """Mark a request as on its way (being read and decoded) for the block's duration: a batch waits up to
        ``batch_wait_ms`` for such requests, and not at all when none is coming (a lone client never waits)."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def submit(self, images: list[torch.Tensor], top_k: int) -> Future:
        """Queue one request's images; the future gets an :class:`Answer`."""
        job = _Job(images, top_k)
        self._queue.put(job)
        return job.future

    def _switch(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None and pending is not self._state:
            old, self._state = self._state, pending
            log.info("now serving %s (was %s)", pending.describe(), old.describe())

    def _run(self) -> None:
        carried: _Job | None = None
        while not self._stop.is_set():
            self._switch()
            if carried is None:
                try:
                    carried = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
            jobs, carried = self._gather(carried)
            self._answer(jobs)

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first``, the requests queued behind it, and those arriving within ``wait_s``, up to ``max_batch``
        images; a request that does not fit is carried to the next batch."""
        jobs, n_images = [first], len(first.images)
        deadline = time.monotonic() + self.wait_s
        while n_images < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._arriving:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if n_images + len(job.images) > self.max_batch:
                return jobs, job
            jobs.append(job)
            n_images += len(job.images)
        return jobs, None

    def _answer(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        state = self._state
        images = [image for job in jobs for image in job.images]
        try:
            probs = self._probabilities(state, images)
        except Exception as exc:  # a bug or an exhausted device: every request of the batch says so, none hangs
            log.error("a batch of %d images failed: %s", len(images), why_unreadable(exc))
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.stats.batches += 1
        self.stats.requests += len(jobs)
        self.stats.images += len(images)
        self.stats.largest_batch = max(self.stats.largest_batch, len(images))
        classes = state.classes
        row = 0
        for job in jobs:
            rows = probs[row:row + len(job.images)]
            row += len(job.images)
            job.future.set_result(Answer(state, top_classes(rows, job.top_k, classes, state.owners)))

    def _probabilities(self, state: ServedState, images: list[torch.Tensor]) -> torch.Tensor:
        method = state.method
        if method is None:  # a state loaded after its last task was removed, switched to after the request came
            raise ClipclError(NO_TASK)
        parts = []
        for start in range(0, len(images), self.max_batch):
            batch = torch.stack(images[start:start + self.max_batch]).to(method.device)
            with torch.no_grad(), self.autocast():
                parts.append(method.predict(batch, route=self.route).probs.float().cpu())
            self.stats.forward_passes += 1
        return torch.cat(parts)


# --- the watcher ---------------------------------------------------------------------------------------------------
class Watcher:
    """Polls the manifest; loads a newly committed state beside the served one and offers it to the batcher.

    A state that fails to load is logged in one line and remembered, so it is neither retried nor logged again
    until the manifest changes."""

    def __init__(self, path: Path, settings: ServeSettings, batcher: Batcher, device: Any, stats: ServeStats) -> None:
        self.path = path
        self.interval = settings.watch_interval
        self.options = settings.options
        self.batcher = batcher
        self.device = device
        self.stats = stats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipcl-watcher", daemon=True)
        self._failed: str | None = None  # the manifest whose state failed to load: not retried until it changes
        self._offered: str | None = None  # the state loaded and handed to the batcher, maybe not switched to yet

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path / MANIFEST)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _run(self) -> None:
        seen = self._signature()
        hashed_at = time.monotonic()
        while not self._stop.wait(self.interval):
            signature = self._signature()
            if signature == seen and time.monotonic() - hashed_at < REHASH_EVERY_S:
                continue
            seen, hashed_at = signature, time.monotonic()
            if signature is not None:
                seen = None if self.check() == "moved" else seen

    def check(self) -> str:
        """Look at the manifest once; load and offer a new state. Returns what happened: ``same``, ``loaded``,
        ``failed`` (known bad, or just failed) or ``moved`` (committed again meanwhile: look again)."""
        served = self.batcher.state
        try:
            sha = manifest_sha256(self.path)
        except Exception as exc:
            return self._fail(None, exc)
        if sha in (served.sha256, self._offered):
            return "same"
        if sha == self._failed:
            return "failed"
        started = time.monotonic()
        try:
            state = load_state(self.path, self.options, self.device)
        except StateMoved:
            return "moved"
        except Exception as exc:  # anything: a damaged or half-written state must never stop the server
            return self._fail(sha, exc)
        self._failed = None
        self._offered = state.sha256
        self.stats.reloads += 1
        log.info("loaded %s in %.1f s", state.describe(), time.monotonic() - started)
        self.batcher.offer(state)
        return "loaded"

    def _fail(self, sha: str | None, exc: Exception) -> str:
        message = " ".join(str(exc).split()) or type(exc).__name__
        if sha is not None:
            self._failed = sha
        self.stats.failed_reloads += 1
        self.stats.last_reload_error = message
        log.warning("kept serving %s: the workspace's new state cannot be loaded: %s",
                    self.batcher.state.describe(), message)
        return "failed"


# --- reading requests ----------------------------------------------------------------------------------------------
class TooLarge(Exception):
    """A request or one of its images is over a limit: answered with 413 and this one-line message."""


class _BoundedReceive:
    """An ASGI ``receive`` that refuses a body past ``limit`` bytes, and can then drain (and drop) the rest so that
    the client, still sending, reads the 413 instead of a reset connection."""

    DRAIN_LIMIT = 256 * MIB

    def __init__(self, receive: Callable[[], Awaitable[dict]], limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.received = 0
        self.done = False

    async def __call__(self) -> dict:
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
            if self.received > self.limit:
                raise TooLarge(f"the request is over the limit of {format_size(self.limit)} (--max-request-mb)")
        else:
            self.done = True
        return message

    async def drain(self) -> None:
        drained = 0
        while not self.done and drained < self.DRAIN_LIMIT:
            message = await self.receive()
            drained += len(message.get("body", b""))
            self.done = message["type"] != "http.request" or not message.get("more_body", False)


def decode_upload(name: str, data: bytes, transform: Callable, max_bytes: int) -> tuple[torch.Tensor | None, str]:
    """One uploaded image as the model's input, or ``(None, why)`` when it cannot be decoded; raises
    :class:`TooLarge` for a file over ``max_bytes`` or a decompression bomb."""
    if len(data) > max_bytes:
        raise TooLarge(f"{name}: {format_size(len(data))}, over the image limit of {format_size(max_bytes)} "
                       "(--max-image-mb)")
    try:
        return transform(load_image_checked(data, max_bytes)), ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"{name}: refused as a possible decompression bomb: {' '.join(str(exc).split())}") from None
    except Exception as exc:  # any decoding failure is this image's own answer
        return None, _IN_MEMORY.sub(repr(name), why_unreadable(exc))


def parse_top_k(value: Any) -> int:
    """``top_k`` from the query or the form: an integer of at least 1 (more than the classes learned means all)."""
    if value is None or value == "":
        return DEFAULT_TOP_K
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"top_k must be an integer, got {value!r}") from None
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    return k


# --- the application -----------------------------------------------------------------------------------------------
class ModelServer:
    """Everything a running server holds: settings, the model thread, the watcher and the decoding pool."""

    def __init__(self, settings: ServeSettings, state: ServedState, route: Route, autocast: Callable[[], Any],
                 device: Any) -> None:
        self.settings = settings
        self.stats = ServeStats()
        self.batcher = Batcher(state, settings, route, autocast, self.stats)
        self.watcher = Watcher(settings.workspace, settings, self.batcher, device, self.stats)
        self.decoder = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="clipcl-decode")
        self.started_at = time.time()
        self.address = ""

    def start(self) -> None:
        self.batcher.start()
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.batcher.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict[str, Any]:
        state = self.batcher.state
        ws = state.workspace
        return {"status": "ok", "workspace": str(ws.path), "model": ws.model_spec.describe(),
                "method": ws.method_name, "tasks": state.n_tasks, "classes": len(state.classes), "state": state.id,
                "state_loaded_at": state.loaded_at, "uptime_s": time.time() - self.started_at,
                "max_batch": self.settings.max_batch, "served": self.stats.to_json()}


def create_app(server: ModelServer) -> Any:
    """The FastAPI application of a :class:`ModelServer` (started and stopped with the application's lifespan)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.datastructures import UploadFile

    settings = server.settings

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> Any:
        server.start()
        log.info("serving %s (%s) at %s", settings.workspace, server.batcher.state.describe(), server.address)
        try:
            yield
        finally:
            server.stop()

    # no /docs nor /redoc: their pages load scripts from a CDN; /openapi.json describes the endpoints
    app = FastAPI(title="clipcl", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)

    def refuse(status: int, detail: str, state: ServedState | None = None) -> JSONResponse:
        return JSONResponse({"detail": " ".join(detail.split())}, status_code=status,
                            headers=(state or server.batcher.state).headers())

    @app.get("/health")
    def health() -> JSONResponse:
        """Whether the server answers, the state it serves (tasks, classes, id) and what it has served."""
        body = server.health()
        return JSONResponse(body, headers=server.batcher.state.headers())

    @app.get("/tasks")
    def tasks() -> JSONResponse:
        """What ``clipcl tasks --json`` prints, for the state being served."""
        state = server.batcher.state
        return JSONResponse(tasks_summary(state.workspace, rows=state.rows), headers=state.headers())

    @app.get("/plot.svg")
    async def plot() -> Response:
        """The stored accuracy matrix and accuracy after each task, drawn for the state being served."""
        state = server.batcher.state
        svg = await asyncio.get_running_loop().run_in_executor(server.decoder, state.plot_svg)
        if svg is None:
            return refuse(404, "no plot: the workspace has learned nothing yet, or matplotlib is not installed",
                          state)
        return Response(svg, media_type="image/svg+xml", headers={**state.headers(), "Cache-Control": "no-cache"})

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        """A page to try the server: drop an image, see its top classes; the tasks and the accuracy plot."""
        return HTMLResponse(PAGE, headers=server.batcher.state.headers())

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """Each uploaded image's top classes (multipart field ``files`` or ``file``; ``top_k`` in the query or the
        form), as the objects ``clipcl predict --json`` prints; an image that cannot be decoded gets an error object.
        """
        limit = settings.max_request_bytes
        bounded = _BoundedReceive(request.receive, limit)
        declared = request.headers.get("content-length", "")
        try:
            if declared.isdigit() and int(declared) > limit:
                raise TooLarge(f"the request is {format_size(int(declared))}, over the limit of "
                               f"{format_size(limit)} (--max-request-mb)")
            form = await Request(request.scope, bounded).form(max_files=settings.max_files,
                                                              max_fields=settings.max_files + 16)
        except TooLarge as exc:
            if request.headers.get("expect", "").lower() != "100-continue":  # else the body was never sent
                await bounded.drain()
            return refuse(413, str(exc))
        try:
            return await _predict_form(request, form)
        finally:
            await form.close()

    async def _predict_form(request: Request, form: Any) -> JSONResponse:
        try:
            top_k = parse_top_k(request.query_params.get("top_k", form.get("top_k")))
        except ValueError as exc:
            return refuse(422, str(exc))
        uploads = [value for key, value in form.multi_items() if key in FILE_FIELDS and isinstance(value, UploadFile)]
        if not uploads:
            return refuse(422, "no image: send one or more files in the multipart field 'files' "
                               "(e.g. curl -F files=@photo.jpg)")
        state = server.batcher.state
        if state.method is None:
            return refuse(503, NO_TASK, state)
        transform = state.method.backbone.eval_transform  # one base model per workspace: every state's is the same
        names = [upload.filename or f"file-{i + 1}" for i, upload in enumerate(uploads)]
        loop = asyncio.get_running_loop()
        with server.batcher.arriving():
            contents = [await upload.read() for upload in uploads]
            try:
                decoded = await loop.run_in_executor(server.decoder, _decode_all, names, contents, transform,
                                                     settings.max_image_bytes)
            except TooLarge as exc:
                return refuse(413, str(exc))
            images = [tensor for tensor, _ in decoded if tensor is not None]
            pending = server.batcher.submit(images, top_k) if images else None
        if pending is None:  # nothing for the model: every file has its error
            answer = Answer(state, [])
        else:
            try:
                answer = await asyncio.wrap_future(pending)
            except ClipclError as exc:
                return refuse(503, str(exc))
            except Exception as exc:
                return refuse(500, f"the model failed: {why_unreadable(exc)}")
        scores = iter(answer.top)
        results = [ImagePrediction(name, next(scores)) if tensor is not None
                   else ImagePrediction(name, [], f"cannot read the image: {why}")
                   for name, (tensor, why) in zip(names, decoded, strict=True)]
        return JSONResponse([result.to_json() for result in results], headers=answer.state.headers())

    return app


def _decode_all(names: list[str], contents: list[bytes], transform: Callable, max_bytes: int
                ) -> list[tuple[torch.Tensor | None, str]]:
    return [decode_upload(name, data, transform, max_bytes) for name, data in zip(names, contents, strict=True)]


def _version() -> str:
    from .version import __version__

    return __version__


# --- running it ----------------------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), or one line saying why not, before the model is
    loaded (a port in use is found out in a second, not after the load)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ClipclError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ClipclError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is logged (a test runner swaps it), like uvicorn's own lines."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def _configure_logging() -> None:
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("clipcl serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def prepare(settings: ServeSettings) -> tuple[ModelServer, socket.socket]:
    """Check everything, take the port, load the served state: a :class:`ModelServer` ready to run, or one line."""
    require_server_packages()
    require_single_process("serve")
    check_settings(settings)
    ws = Workspace.open(settings.workspace)
    route = check_route(ws, settings.route)
    method_class = get_method_class(ws.method_name)
    check_inference_overrides(method_class, settings.options)
    build_config(method_class, settings.options, stored=ws.method_config)
    accelerator = make_accelerator(settings.precision)
    sock = bind(settings.host, settings.port)
    try:
        # Pillow only warns between its limit and twice it; the process-wide filter makes that an error in every
        # decoding thread (warnings.catch_warnings in load_image_checked is not thread-safe on its own)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        state = load_state(settings.workspace, settings.options, accelerator.device)
    except StateMoved:
        state = load_state(settings.workspace, settings.options, accelerator.device)
    except BaseException:
        sock.close()
        raise
    server = ModelServer(settings, state, route, accelerator.autocast, accelerator.device)
    server.address = url_of(sock)
    return server, sock


def run_server(settings: ServeSettings) -> None:
    """``clipcl serve``: serve until interrupted (Ctrl-C or SIGTERM finish the requests under way)."""
    import uvicorn

    _configure_logging()
    server, sock = prepare(settings)
    config = uvicorn.Config(create_app(server), log_level="info", access_log=True, lifespan="on",
                            timeout_graceful_shutdown=10)
    runner = uvicorn.Server(config)
    try:
        runner.run(sockets=[sock])
    finally:
        sock.close()
    if not runner.started:
        raise ClipclError("the server did not start (see the lines above)")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipcl</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1rem 1.5rem;
         color: #1d232a; background: #fafbfc; }
  h1 { font-size: 1.4rem; margin: 0.2rem 0; } h2 { font-size: 1.1rem; margin: 1.6rem 0 0.5rem; }
  #about { color: #57606a; margin: 0 0 1rem; }
  #drop { display: flex; gap: 1rem; align-items: center; border: 2px dashed #8c959f; border-radius: 10px;
          padding: 1rem; background: #fff; }
  #drop.over { border-color: #0969da; background: #f0f6ff; }
  #preview { max-width: 160px; max-height: 160px; border-radius: 6px; display: none; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { text-align: left; padding: 0.3rem 0.6rem; border-bottom: 1px solid #d8dee4; vertical-align: top; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  .bar { height: 0.55rem; background: #0969da; border-radius: 3px; min-width: 1px; }
  .error { color: #cf222e; }
  #plot { max-width: 100%; background: #fff; }
</style>
</head>
<body>
<h1>clipcl</h1>
<p id="about">connecting&hellip;</p>
<label id="drop" for="file">
  <img id="preview" alt="">
  <span>Drop an image here, or choose one: <input type="file" id="file" name="files" accept="image/*"></span>
</label>
<h2>Top classes</h2>
<p id="status">No image yet.</p>
<table id="result" hidden>
  <thead><tr><th>class</th><th>task</th><th class="num">probability</th><th style="width:30%"></th></tr></thead>
  <tbody></tbody>
</table>
<h2>Tasks</h2>
<table id="tasks">
  <thead><tr><th>task</th><th>name</th><th>classes</th><th class="num">train</th><th class="num">held-out</th>
  <th class="num">acc (task)</th><th class="num">acc (all)</th></tr></thead>
  <tbody></tbody>
</table>
<section id="plot-section" hidden><h2>Accuracy</h2><img id="plot" alt="accuracy matrix and curve"></section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let state = null;
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function plural(n, noun) { return `${n} ${noun}${n === 1 ? "" : noun.endsWith("s") ? "es" : "s"}`; }
function percent(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(2) + "%"; }
async function refresh() {
  try {
    const health = await (await fetch("health")).json();
    $("about").textContent = `${health.workspace}: model ${health.model}, method ${health.method}, ` +
      `${plural(health.classes, "class")} in ${plural(health.tasks, "task")} (state ${health.state})`;
    if (health.state === state) return;
    state = health.state;
    const summary = await (await fetch("tasks")).json();
    const body = $("tasks").tBodies[0]; body.replaceChildren();
    for (const t of summary.tasks) {
      const row = body.insertRow(); const acc = t.accuracy || {};
      cell(row, t.id, "num"); cell(row, t.name); cell(row, t.classes.join(", "));
      cell(row, t.train_images, "num"); cell(row, t.heldout_images, "num");
      cell(row, percent(acc.task), "num"); cell(row, percent(acc.all), "num");
    }
    const plot = $("plot");
    plot.onload = () => { $("plot-section").hidden = false; };
    plot.onerror = () => { $("plot-section").hidden = true; };
    plot.src = "plot.svg?state=" + encodeURIComponent(state);
  } catch (e) { $("about").textContent = "the server does not answer: " + e; }
}
async function ask(file) {
  $("status").textContent = "Asking about " + file.name + "…"; $("status").className = "";
  const preview = $("preview"); preview.src = URL.createObjectURL(file); preview.style.display = "block";
  const form = new FormData(); form.append("files", file, file.name);
  try {
    const response = await fetch("predict?top_k=5", { method: "POST", body: form });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.detail || response.statusText);
    const result = answer[0];
    if (result.error) throw new Error(result.error);
    const body = $("result").tBodies[0]; body.replaceChildren();
    result.top.forEach((s, i) => {
      const row = body.insertRow(); row.className = i === 0 ? "top-class" : "";
      cell(row, s.class, "class"); cell(row, `${s.task} (${s.task_name})`); cell(row, percent(s.prob), "num");
      const bar = document.createElement("div"); bar.className = "bar"; bar.style.width = (100 * s.prob) + "%";
      row.insertCell().appendChild(bar);
    });
    $("result").hidden = false;
    const tasks = Number(response.headers.get("X-Clipcl-Tasks"));
    $("status").textContent = `${result.path}: answered by the state of ${plural(tasks, "task")} ` +
      `(state ${response.headers.get("X-Clipcl-State")})`;
  } catch (e) {
    $("result").hidden = true; $("status").textContent = "Error: " + e.message; $("status").className = "error";
  }
}
$("file").addEventListener("change", (e) => { if (e.target.files.length) ask(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) ask(e.dataTransfer.files[0]);
});
refresh(); setInterval(refresh, 3000);
</script>
</body>
</html>
"""
