"""What real folders and tampered workspaces contain never hangs clipcl or exhausts the machine.

Each case is built in a temporary folder and run through ``python -m clipcl`` in a child process with a wall-clock
timeout and an address-space limit (``RLIMIT_AS``), so a regression fails the test instead of the machine: reading
``/dev/zero`` would hit the memory limit, opening a FIFO would hit the timeout. Every run must end in seconds with
exit 0 and a warning per skipped entry, or exit 2 and one error line, without a traceback, and a refusal must leave
the workspace byte-for-byte as it was.

The default set runs every entry case in one ``add-task`` and one ``predict``; ``-m slow`` runs each on its own.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import make_task, snapshot

ADDRESS_SPACE = 8 << 30  # the interpreter with torch maps about 4 GiB; reading /dev/zero would pass this in seconds
TIMEOUT = 120  # seconds; a hang (a FIFO opened for reading) would end here and fail
TRAIN = ("--epochs", "1", "--batch-size", "8", "--workers", "0", "--lr", "5e-3", "--no-eval")
AS_ROOT = os.geteuid() == 0


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_bounded(*args: str | Path) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m clipcl ARGS`` under the memory limit and timeout; its result and wall time."""
    env = {**os.environ, "COLUMNS": "250", "CLIPCL_DEBUG": ""}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "clipcl", *map(str, args)], capture_output=True, text=True,
                            timeout=TIMEOUT, env=env, preexec_fn=_limit_memory)
    return result, time.perf_counter() - started


def assert_one_line_refusal(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- hostile entries of a task folder -------------------------------------------------------------------------------
def _zero_link(folder: Path) -> None:
    (folder / "zero.jpg").symlink_to("/dev/zero")


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe.jpg")


def _socket(folder: Path) -> None:
    # a UNIX socket path must be short: bind it in a short folder, then move the inode into the class folder
    with tempfile.TemporaryDirectory(dir="/tmp") as short:
        server = socket.socket(socket.AF_UNIX)
        server.bind(f"{short}/s")
        os.rename(f"{short}/s", folder / "sock.png")
        server.close()


def _oversized(folder: Path) -> None:
    with open(folder / "huge.png", "wb") as handle:  # sparse: 300 MiB on paper, nothing on the disk
        handle.truncate(300 << 20)


def _link_loop(folder: Path) -> None:
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")


def _unreadable(folder: Path) -> None:
    shutil.copy(next(folder.glob("*.png")), folder / "locked.png")
    (folder / "locked.png").chmod(0)


ENTRIES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # case: (how to make it, its file name, what the warning says)
    "link to /dev/zero": (_zero_link, "zero.jpg", "a character device, not a regular file"),
    "FIFO": (_fifo, "pipe.jpg", "a FIFO, not a regular file"),
    "socket": (_socket, "sock.png", "a socket, not a regular file"),
    "oversized file": (_oversized, "huge.png", "300.0 MiB, over the limit of 256.0 MiB"),
    "link loop": (_link_loop, "loop.jpg", "a symbolic link loop"),
    "unreadable file": (_unreadable, "locked.png", "Permission denied"),
}
CASES = [name for name in ENTRIES if not (name == "unreadable file" and AS_ROOT)]  # root reads mode 000 files


class GrowingFile:
    """A valid PNG that another thread keeps appending to while clipcl reads it (capped, to spare the disk)."""

    def __init__(self, path: Path, source: Path, cap: int = 64 << 20) -> None:
        self.path, self.cap = path, cap
        shutil.copy(source, path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._grow, daemon=True)

    def _grow(self) -> None:
        chunk = b"\0" * (256 << 10)
        with open(self.path, "ab") as handle:
            while not self._stop.is_set() and handle.tell() < self.cap:
                handle.write(chunk)
                handle.flush()
                time.sleep(0.002)

    def __enter__(self) -> GrowingFile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_weights: Path) -> Path:
    """A workspace that learned one task, through the CLI in this process."""
    from conftest import FAST, invoke
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("hostile")
    ws = root / "ws"
    runner = CliRunner()
    assert invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights).exit_code == 0
    result = invoke(runner, "add-task", "-w", ws, make_task(root / "first", ["red", "green"], per_class=6), *FAST)
    assert result.exit_code == 0, result.output
    return ws


@pytest.fixture
def fresh(learned: Path, tmp_path: Path) -> Path:
    """A copy of the learned workspace that a test may write to."""
    return Path(shutil.copytree(learned, tmp_path / "ws"))


def hostile_task(root: Path, cases: list[str]) -> Path:
    """A task of two good classes whose ``blue`` folder also holds the entries of ``cases``."""
    folder = make_task(root, ["blue", "yellow"], per_class=6)
    for case in cases:
        ENTRIES[case][0](folder / "blue")
    return folder


@pytest.fixture
def cleanup_modes(tmp_path: Path) -> Iterator[None]:
    yield
    for path in tmp_path.rglob("locked.png"):  # let pytest remove what a case locked
        path.chmod(0o644)


def _learns_the_rest(result: subprocess.CompletedProcess, workspace: Path, cases: list[str], images: int = 12
                     ) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for case in cases:
        _, name, reason = ENTRIES[case]
        assert f"skipped blue/{name}: {reason}" in result.stderr, (case, result.stderr)
    manifest = json.loads((workspace / "manifest.json").read_text())
    assert len(manifest["tasks"]) == 2
    details = json.loads((workspace / manifest["tasks"][1]["dir"] / "task.json").read_text())
    assert details["counts"]["skipped"] == len(cases)
    assert sum(details["counts"]["train"].values()) + sum(details["counts"]["heldout"].values()) == images


def test_add_task_skips_every_entry_that_is_not_a_readable_regular_file(fresh: Path, tmp_path: Path,
                                                                        cleanup_modes: None) -> None:
    folder = hostile_task(tmp_path / "second", CASES)
    with GrowingFile(folder / "yellow" / "growing.png", next((folder / "yellow").glob("*.png"))):
        result, seconds = run_bounded("add-task", "-w", fresh, folder, *TRAIN)
    _learns_the_rest(result, fresh, CASES, images=13)  # the growing PNG is read at the size it had when opened
    assert seconds < TIMEOUT


def test_predict_skips_them_in_a_folder_and_refuses_them_named_alone(learned: Path, tmp_path: Path,
                                                                     cleanup_modes: None) -> None:
    folder = hostile_task(tmp_path / "photos", CASES) / "blue"
    before = snapshot(learned)
    result, _ = run_bounded("predict", "-w", learned, folder, "--json", "--workers", "0")
    not_regular = [c for c in CASES if c in ("link to /dev/zero", "FIFO", "socket", "link loop")]
    for case in not_regular:
        _, name, reason = ENTRIES[case]
        assert f"skipped {folder / name}: {reason}" in result.stderr, (case, result.stderr)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    predicted = {Path(line["path"]).name for line in lines if "top" in line}
    assert len(predicted) == 6
    refused = {Path(line["path"]).name: line["error"] for line in lines if "error" in line}
    for case in set(CASES) - set(not_regular):  # regular files that cannot be read: an error line each, exit 1
        _, name, reason = ENTRIES[case]
        assert reason in refused.pop(name)
    assert not refused and result.returncode == (1 if set(CASES) - set(not_regular) else 0), result.stderr
    named = [folder / ENTRIES[case][1] for case in not_regular]
    alone, seconds = run_bounded("predict", "-w", learned, *named)
    assert_one_line_refusal(alone, "no image found at")
    assert "a FIFO, not a regular file" in alone.stderr and seconds < TIMEOUT
    assert snapshot(learned) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_each_entry_alone(case: str, fresh: Path, tmp_path: Path, cleanup_modes: None) -> None:
    """Each case on its own (for the timings in the issue note): add-task learns the rest, predict skips it."""
    folder = hostile_task(tmp_path / "second", [case])
    result, seconds = run_bounded("add-task", "-w", fresh, folder, *TRAIN)
    _learns_the_rest(result, fresh, [case])
    predicted, predict_seconds = run_bounded("predict", "-w", fresh, folder / "blue", "--json", "--workers", "0")
    assert predicted.returncode in (0, 1) and "Traceback" not in predicted.stderr, predicted.stderr
    print(f"\n{case}: add-task exit {result.returncode} in {seconds:.1f} s, predict exit {predicted.returncode} "
          f"in {predict_seconds:.1f} s")


# --- tampered workspace files ---------------------------------------------------------------------------------------
def _huge_manifest(workspace: Path) -> None:
    with open(workspace / "manifest.json", "r+b") as handle:  # sparse: 1 GiB on paper
        handle.truncate(1 << 30)


def _nested_manifest(workspace: Path) -> None:
    (workspace / "manifest.json").write_text("[" * 1_000_000)


def _manifest_to_fifo(workspace: Path) -> None:
    (workspace / "manifest.json").unlink()
    os.mkfifo(workspace / "manifest.json")


WORKSPACE_CASES = {
    # case: (how to make it, what the error says, the command of the default set)
    "manifest of 1 GiB": (_huge_manifest, "1024.0 MiB, over the limit of 64.0 MiB", "predict"),
    "manifest nested a million deep": (_nested_manifest, "nests too deeply", "add-task"),
    "manifest replaced by a FIFO": (_manifest_to_fifo, "a FIFO, not a regular file", "predict"),
}


def _refuses_tampered_manifest(case: str, workspace: Path, tmp_path: Path, commands: tuple[str, ...]) -> None:
    make, needle, _ = WORKSPACE_CASES[case]
    make(workspace)
    before = {p: p.lstat().st_size for p in workspace.rglob("*")}
    folder = make_task(tmp_path / "next", ["blue", "yellow"], per_class=4)
    arguments = {"predict": ("predict", "-w", workspace, folder),
                 "add-task": ("add-task", "-w", workspace, folder, *TRAIN)}
    for command in commands:
        result, seconds = run_bounded(*arguments[command])
        assert_one_line_refusal(result, needle)
        assert seconds < TIMEOUT
    assert {p: p.lstat().st_size for p in workspace.rglob("*")} == before


@pytest.mark.parametrize("case", list(WORKSPACE_CASES))
def test_a_tampered_manifest_is_refused_in_one_line(case: str, fresh: Path, tmp_path: Path) -> None:
    _refuses_tampered_manifest(case, fresh, tmp_path, (WORKSPACE_CASES[case][2],))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(WORKSPACE_CASES))
def test_a_tampered_manifest_is_refused_by_every_command(case: str, fresh: Path, tmp_path: Path) -> None:
    _refuses_tampered_manifest(case, fresh, tmp_path, ("predict", "add-task"))


def test_a_nested_checkpoint_is_refused_on_resume_and_ignored_by_a_fresh_run(fresh: Path, tmp_path: Path) -> None:
    checkpoint = fresh / ".resume"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text('{"a":' * 500_000)
    result, _ = run_bounded("add-task", "-w", fresh, "--resume")
    assert_one_line_refusal(result, "nests too deeply")
    from conftest import invoke
    from typer.testing import CliRunner

    folder = make_task(tmp_path / "next", ["blue", "yellow"], per_class=4)
    fresh_run = invoke(CliRunner(), "add-task", "-w", fresh, folder, *TRAIN)  # a regular file: nothing to hang on
    assert fresh_run.exit_code == 0, fresh_run.output
    assert "ignoring a damaged checkpoint" in fresh_run.stderr and not checkpoint.exists()


def test_bounded_reads_of_the_library(tmp_path: Path) -> None:
    """The reading primitives themselves: regular files only, a size bound before reading, streamed hashes."""
    import hashlib

    from clipcl.reading import InputError, read_bounded, read_json_bounded, regular_file_problem, sha256_of_file

    data = os.urandom(3 << 20)
    (tmp_path / "file.bin").write_bytes(data)
    (tmp_path / "link.bin").symlink_to(tmp_path / "file.bin")
    assert read_bounded(tmp_path / "link.bin", len(data)) == data  # links to regular files keep working
    assert sha256_of_file(tmp_path / "link.bin") == hashlib.sha256(data).hexdigest()
    with pytest.raises(InputError, match="over the limit"):
        read_bounded(tmp_path / "file.bin", len(data) - 1)
    with pytest.raises(InputError, match="a character device"):
        sha256_of_file("/dev/zero")
    os.mkfifo(tmp_path / "fifo")
    started = time.perf_counter()
    with pytest.raises(InputError, match="a FIFO"):
        read_bounded(tmp_path / "fifo", 100)  # no writer: a blocking open would never return
    assert time.perf_counter() - started < 5
    assert regular_file_problem(tmp_path / "nothing") == "missing"
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    assert regular_file_problem(tmp_path / "dangling") == "a broken symbolic link"
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json_bounded(tmp_path / "ok.json") == {"a": [1, 2]}
    with pytest.raises(InputError, match="over the limit"):
        read_json_bounded(tmp_path / "ok.json", limit=4)
