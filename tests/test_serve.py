"""``clipcl serve`` through a real HTTP client against a real uvicorn server, started as its own process on loopback.

The server answers what ``clipcl predict --json`` and ``clipcl tasks --json`` print, batches concurrent requests,
refuses requests and images over its limits in one line, picks up a task that a separate ``add-task`` process
commits while clients are asking (each answer wholly from one state, named in its headers), never swaps to a damaged
state, and loses nothing when killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import COLOURS, FAST, PYTHON, draw, invoke, make_task, snapshot
from typer.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

START_TIMEOUT_S = 180  # importing torch and loading the model on a busy 2-core machine
ADDRESS = re.compile(r"at (http://127\.0\.0\.1:\d+)")


class ServerProcess:
    """``python -m clipcl serve -w WS --port 0 ARGS`` in its own process, its output in files (a full pipe would
    stall it), ready when it answers ``GET /health``."""

    def __init__(self, workspace: Path, logs: Path, *args: str) -> None:
        self.workspace = workspace
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "serve.out", logs / "serve.err"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "clipcl", "serve", "-w", str(workspace), "--port", "0", *args],
                stdout=stdout, stderr=stderr, env={**os.environ, "COLUMNS": "200"})
        self.url = self._wait_for_address()
        self.client = httpx.Client(base_url=self.url, timeout=120)
        self._wait_healthy()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = ADDRESS.search(self.log())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                pytest.fail(f"clipcl serve exited with {self.process.returncode}: {self.log()[-3000:]}")
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"clipcl serve did not start in {START_TIMEOUT_S} s: {self.log()[-3000:]}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def health(self) -> dict[str, Any]:
        response = self.client.get("/health")
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "client"):
            self.client.close()


def trained_workspace(root: Path, tiny_config: Path, tiny_weights: Path) -> Path:
    """A dma workspace of the tiny model that has learned red/green (task 1, "a")."""
    runner = CliRunner()
    ws = root / "ws"
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights)
    assert result.exit_code == 0, result.output
    result = invoke(runner, "add-task", "-w", ws, make_task(root / "data" / "a", ["red", "green"]), *FAST)
    assert result.exit_code == 0, result.output
    return ws


def image_files(folder: Path, colours: list[str], per_colour: int = 2, seed: int = 7) -> list[Path]:
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for colour in colours:
        for i in range(per_colour):
            path = folder / f"{colour}-{i}.png"
            draw(COLOURS[colour], rng).save(path)
            paths.append(path)
    return paths


def post_images(client: Any, paths: list[Path], top_k: int | None = None, field: str = "files") -> Any:
    files = [(field, (path.name, path.read_bytes(), "image/png")) for path in paths]
    return client.post("/predict", files=files, params={} if top_k is None else {"top_k": top_k})


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grey pixels: what Pillow's decompression-bomb check reads."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_weights: Path) -> Path:
    """A workspace that has learned one task; tests that change it work on a copy."""
    return trained_workspace(tmp_path_factory.mktemp("trained"), tiny_config, tiny_weights)


@pytest.fixture(scope="module")
def served(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(trained, tmp_path_factory.mktemp("logs"), "--max-request-mb", "1", "--max-image-mb", "0.5")
    yield server
    server.stop()


def cli_predictions(ws: Path, paths: list[Path], top_k: int) -> list[dict[str, Any]]:
    result = invoke(CliRunner(), "predict", "-w", ws, "--json", "--top-k", str(top_k), *paths)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def assert_same_predictions(served_answer: list[dict], cli_answer: list[dict]) -> None:
    assert len(served_answer) == len(cli_answer)
    for ours, theirs in zip(served_answer, cli_answer, strict=True):
        assert ours["path"] == Path(theirs["path"]).name
        assert [(s["class"], s["task"], s["task_name"]) for s in ours["top"]] == \
               [(s["class"], s["task"], s["task_name"]) for s in theirs["top"]]
        for a, b in zip(ours["top"], theirs["top"], strict=True):
            assert a["prob"] == pytest.approx(b["prob"], abs=1e-5)


def test_predictions_equal_clipcl_predict(served: ServerProcess, tmp_path: Path) -> None:
    paths = image_files(tmp_path / "images", ["red", "green", "blue"])  # blue: a class the workspace never saw
    expected = cli_predictions(served.workspace, paths, top_k=2)

    together = post_images(served.client, paths, top_k=2)
    assert together.status_code == 200, together.text
    assert together.headers["X-Clipcl-Tasks"] == "1"
    assert together.headers["X-Clipcl-State"] == served.health()["state"]
    assert_same_predictions(together.json(), expected)

    one_by_one = [post_images(served.client, [path], field="file").json()[0] for path in paths]  # top_k 5: all 2
    assert_same_predictions(one_by_one, cli_predictions(served.workspace, paths, top_k=5))


def test_an_unreadable_image_gets_its_own_error(served: ServerProcess, tmp_path: Path) -> None:
    good = image_files(tmp_path, ["red"], per_colour=1)[0]
    truncated = good.read_bytes()[: len(good.read_bytes()) // 2]
    files = [("files", ("notes.png", b"not an image at all", "image/png")), ("files", (good.name, good.read_bytes())),
             ("files", ("cut.png", truncated, "image/png"))]
    response = served.client.post("/predict", files=files, data={"top_k": "1"})
    assert response.status_code == 200, response.text
    first, second, third = response.json()
    assert first["path"] == "notes.png" and first["error"].startswith("cannot read the image: ")
    assert "'notes.png'" in first["error"] and "BytesIO" not in first["error"]
    assert second == {"path": good.name, "top": [second["top"][0]]} and second["top"][0]["class"] == "red"
    assert third["path"] == "cut.png" and "error" in third

    only_bad = served.client.post("/predict", files=[("files", ("x.png", b"garbage"))])
    assert only_bad.status_code == 200 and "error" in only_bad.json()[0]


def assert_refused(response: Any, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    for word in words:
        assert word in detail, detail


def test_requests_and_images_over_the_limits_are_refused_in_one_line(served: ServerProcess) -> None:
    big = os.urandom(1536 * 1024)  # over --max-request-mb 1
    assert_refused(served.client.post("/predict", files=[("files", ("big.png", big))]), 413, "--max-request-mb")

    boundary = "clipcl-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while it streams in
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    streamed = served.client.post("/predict", content=chunks(),
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_refused(streamed, 413, "--max-request-mb")

    image = os.urandom(600 * 1024)  # under the request limit, over --max-image-mb 0.5
    assert_refused(served.client.post("/predict", files=[("files", ("large.png", image))]), 413, "large.png",
                   "--max-image-mb")

    for width, height in ((20000, 20000), (10000, 10000)):  # over twice Pillow's limit (error), and over it (warning)
        bomb = served.client.post("/predict", files=[("files", ("bomb.png", png_header(width, height)))])
        assert_refused(bomb, 413, "bomb.png", "decompression bomb")

    assert_refused(served.client.post("/predict", files=[("files", ("a.png", b"x"))], params={"top_k": "0"}), 422,
                   "top_k")
    assert_refused(served.client.post("/predict", data={"top_k": "3"}), 422, "no image")
    assert served.health()["status"] == "ok"


def test_concurrent_requests_are_batched(served: ServerProcess, tmp_path: Path) -> None:
    paths = image_files(tmp_path, ["red", "green"], per_colour=4)
    before = served.health()["served"]

    def ask(i: int) -> tuple[int, str]:
        with httpx.Client(base_url=served.url, timeout=120) as client:
            answers = []
            for j in range(i, 200, 16):
                response = post_images(client, [paths[j % len(paths)]], top_k=1)
                answers.append((response.status_code, response.json()[0]["top"][0]["class"]))
            return answers

    with ThreadPoolExecutor(16) as pool:
        answers = [a for chunk in pool.map(ask, range(16)) for a in chunk]
    after = served.health()["served"]
    assert len(answers) == 200 and all(status == 200 for status, _ in answers)
    assert after["requests"] - before["requests"] == 200
    batches = after["batches"] - before["batches"]
    assert batches <= 100, f"200 concurrent requests ran in {batches} batches"
    assert after["largest_batch"] > 1


def test_tasks_health_page_and_plot(served: ServerProcess) -> None:
    listed = served.client.get("/tasks")
    assert listed.status_code == 200
    result = invoke(CliRunner(), "tasks", "-w", served.workspace, "--json")
    assert listed.json() == json.loads(result.stdout)

    health = served.health()
    assert health["tasks"] == 1 and health["classes"] == 2 and health["method"] == "dma"
    assert Path(health["workspace"]) == served.workspace
    assert served.url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
    page = served.client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text and "http" not in page.text.split("<script>")[0]
    plot = served.client.get("/plot.svg")
    assert plot.status_code == 200 and plot.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in plot.content


def test_new_tasks_go_live_states_never_mix_and_a_kill_loses_nothing(trained: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    server = ServerProcess(ws, tmp_path / "logs", "--watch-interval", "0.2")
    red, blue = image_files(tmp_path / "images", ["red", "blue"], per_colour=1)
    try:
        stop = threading.Event()
        answers: list[list[tuple[str, str, frozenset[str]]]] = [[] for _ in range(4)]

        def keep_asking(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                deadline = time.monotonic() + 300
                while not stop.is_set() and time.monotonic() < deadline:
                    response = post_images(client, [red, blue], top_k=10)
                    assert response.status_code == 200, response.text
                    classes = {frozenset(s["class"] for s in result["top"]) for result in response.json()}
                    assert len(classes) == 1  # both images of a request over the same classes
                    answers[i].append((response.headers["X-Clipcl-Tasks"], response.headers["X-Clipcl-State"],
                                       classes.pop()))
                    time.sleep(0.02)

        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(keep_asking, i) for i in range(4)]
            try:
                wait_for(lambda: all(answers), 120, "the clients got no answer", clients)
                folder = make_task(tmp_path / "data" / "b", ["blue", "yellow"])
                adding = subprocess.run([PYTHON, "-m", "clipcl", "add-task", "-w", str(ws), "--name", "b", str(folder),
                                         *FAST, "--no-eval"], capture_output=True, text=True, timeout=600)
                assert adding.returncode == 0, adding.stderr[-3000:]
                wait_for(lambda: server.health()["tasks"] == 2, 120, server.log()[-3000:], clients)
                seen = sum(map(len, answers))
                wait_for(lambda: sum(map(len, answers)) >= seen + 8, 120, "no answers after the switch", clients)
            finally:
                stop.set()
            for client in clients:
                client.result()

        classes_of = {"1": frozenset({"red", "green"}), "2": frozenset({"red", "green", "blue", "yellow"})}
        states: dict[str, str] = {}
        for thread in answers:
            tasks_seen = [n for n, _, _ in thread]
            assert tasks_seen == sorted(tasks_seen)  # one switch, never back
            for n_tasks, state, classes in thread:
                assert classes == classes_of[n_tasks]  # wholly the old or wholly the new state
                assert states.setdefault(state, n_tasks) == n_tasks
        assert sorted(states.values()) == ["1", "2"]
        assert any(n == "2" for thread in answers for n, _, _ in thread)
        blue_now = post_images(server.client, [blue], top_k=1).json()[0]["top"][0]
        assert (blue_now["class"], blue_now["task"], blue_now["task_name"]) == ("blue", 2, "b")
        listed = server.client.get("/tasks").json()
        assert listed == json.loads(invoke(CliRunner(), "tasks", "-w", ws, "--json").stdout)
        assert [t["name"] for t in listed["tasks"]] == ["a", "b"]
        health = server.health()
        assert health["served"]["reloads"] == 1 and health["served"]["failed_reloads"] == 0

        # a half-written manifest and a damaged task file never replace the state being served
        manifest_path = ws / "manifest.json"
        good = manifest_path.read_bytes()
        manifest = json.loads(good)
        manifest["tasks"][1]["files"]["tensors.safetensors"] = "0" * 64
        for bad in (good[: len(good) // 2], json.dumps(manifest).encode()):
            failed = server.health()["served"]["failed_reloads"]
            replace_atomically(manifest_path, bad)
            deadline = time.monotonic() + 30
            while server.health()["served"]["failed_reloads"] == failed:
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.1)
            time.sleep(0.5)  # it must not retry (and log again) while the manifest stays the same
            assert server.health()["served"]["failed_reloads"] == failed + 1
            response = post_images(server.client, [blue], top_k=1)
            assert response.status_code == 200 and response.headers["X-Clipcl-Tasks"] == "2"
        kept = [line for line in server.log().splitlines() if "kept serving" in line]
        assert len(kept) == 2, kept
        assert "checksum" in kept[1] or "sha256" in kept[1] or "damaged" in kept[1], kept[1]
        replace_atomically(manifest_path, good)
        time.sleep(0.5)
        assert server.health()["state"] == health["state"]

        # SIGKILL while clients are asking: the workspace is as it was, and loads
        before = snapshot(ws)
        with ThreadPoolExecutor(4) as pool:
            asking = [pool.submit(swallow_errors, post_images, server.client, [red, blue]) for _ in range(16)]
            time.sleep(0.2)
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(timeout=30)
            for future in asking:
                future.result()
        assert snapshot(ws) == before
        from clipcl.workspace import Workspace

        method = Workspace.open(ws).build_method()
        assert sorted(method.classes) == ["blue", "green", "red", "yellow"]
    finally:
        server.stop()


def wait_for(condition: Any, seconds: float, what: str, clients: list[Any]) -> None:
    """Wait until ``condition()``; fail with ``what`` after ``seconds``, or at once with a client thread's failure."""
    deadline = time.monotonic() + seconds
    while not condition():
        for client in clients:
            if client.done():
                client.result()
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def replace_atomically(path: Path, data: bytes) -> None:
    temp = path.with_name(".test-manifest")
    temp.write_bytes(data)
    os.replace(temp, path)


def swallow_errors(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except httpx.HTTPError:
        return None


def test_startup_errors_are_one_line(served: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()

    def serve(*args: Any) -> Any:
        result = invoke(runner, "serve", *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return result.exit_code, lines

    code, lines = serve("-w", tmp_path / "missing", "--port", "0")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: no workspace at"), lines

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = serve("-w", served.workspace, "--port", port)
    assert code == 2 and lines == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"], lines

    code, lines = serve("-w", served.workspace, "--route", "0", "--port", "0")
    assert code == 2 and len(lines) == 1, lines

    monkeypatch.setitem(sys.modules, "fastapi", None)
    code, lines = serve("-w", served.workspace, "--port", "0")
    assert code == 2 and len(lines) == 1 and "pip install 'clipcl[serve]'" in lines[0], lines



def test_a_workspace_that_has_learned_nothing_is_served_until_it_learns(workspace: Path) -> None:
    """In process (no model is loaded for an empty workspace): every endpoint answers, /predict with 503."""
    import warnings

    from fastapi.testclient import TestClient

    from clipcl.serve import ServeSettings, create_app, prepare

    with warnings.catch_warnings():  # prepare() makes Pillow's bomb warning an error process-wide
        server, sock = prepare(ServeSettings(workspace=workspace, port=0))
        sock.close()
        with TestClient(create_app(server)) as client:
            assert client.get("/health").json()["tasks"] == 0
            assert client.get("/tasks").json()["tasks"] == []
            assert_refused(client.post("/predict", files=[("files", ("a.png", b"x"))]), 503, "no task yet")
            assert client.get("/plot.svg").status_code == 404
            assert client.get("/").status_code == 200
