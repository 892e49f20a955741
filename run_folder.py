"""The run folder (`output.dir`): created and proven writable before any heavy work, written by one process
at a time (`run_folder_lock`), and emptied of a previous run's outputs by --overwrite."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from errors import UsageError

LOCK_FILE = ".run.lock"
# What the program writes into a run folder; --overwrite removes these and nothing else.
RUN_OUTPUTS = ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "skipped_images.jsonl", "data_check.json",
               "demo_report.json", "validation_curve.png", "*report.json", "*test_embeddings.npy", "*test_labels.npy",
               "*test_paths.txt", "*recall_at_k.png", "*retrieval_examples.png", ".*.pt.*.tmp", "interrupted.txt")
_held: dict[Path, int] = {}  # folders this process holds, with how many nested holds


def prepare_output_dir(path: Path) -> Path:
    """Create the run folder and prove it writable now, before any data or model is loaded."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"output.dir '{path}' is not a writable folder ({error.strerror or error}); "
                         f"set output.dir to a folder you can write") from None
    return path


def require_writable_file(path: Path, option: str) -> Path:
    """Check now, not after an hour of work, that `path` can be written (its folder is created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise PermissionError(13, "not a writable file")
    except OSError as error:
        raise UsageError(f"{option} '{path}' cannot be written ({error.strerror or error}); choose another path") from None
    return path


def _this_holder(mode: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "mode": mode, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a process killed at that moment


def _stale(holder: dict) -> bool:
    """A lock left by a process that is gone: dead on this host, or an earlier run of this same SLURM job
    (a requeued job keeps its id and may start on another node)."""
    if not holder:
        return True
    slurm_job = os.environ.get("SLURM_JOB_ID", "")
    if slurm_job and holder.get("slurm_job_id") == slurm_job and holder.get("pid") != os.getpid():
        return True
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


@contextmanager
def run_folder_lock(folder: Path, mode: str):
    """Hold `folder` exclusively while the block runs: a second process stops at once with a line naming the
    holder. A lock from a dead process on this host is taken over; one from another host is reported with how
    to clear it. Nested holds by one process (the demo trains, then evaluates) are allowed.
    """
    folder = prepare_output_dir(folder).resolve()
    lock = folder / LOCK_FILE
    if folder in _held:
        _held[folder] += 1
        try:
            yield folder
        finally:
            _held[folder] -= 1
        return
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder is None:
                continue  # released meanwhile
            if _stale(holder):
                lock.unlink(missing_ok=True)
                continue
            where = f"PID {holder.get('pid')} on {holder.get('host')}"
            since = f" (--mode {holder.get('mode')}, since {holder.get('since')})"
            if holder.get("host") == socket.gethostname():
                raise UsageError(f"{folder} is in use by {where}{since}: wait for it to finish, stop it, or set "
                                 f"output.dir to another folder") from None
            raise UsageError(f"{folder} is locked by {where}{since}: if that process is gone, delete {lock} "
                             f"and start again; otherwise set output.dir to another folder") from None
        with os.fdopen(descriptor, "w") as stream:
            json.dump(_this_holder(mode), stream)
        break
    else:
        raise UsageError(f"could not lock {folder}: {lock} keeps coming back; delete it if no run uses the folder")
    _held[folder] = 1
    try:
        yield folder
    finally:
        del _held[folder]
        if (_read_holder(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


def remove_previous_outputs(folder: Path) -> list[Path]:
    """--overwrite: delete every output an earlier run left (RUN_OUTPUTS, and its wandb/ folder) before the new
    run writes anything, so no old best.pt or report can pass for the new run's."""
    removed = []
    for pattern in RUN_OUTPUTS:
        for path in Path(folder).glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path)
    if (Path(folder) / "wandb").is_dir():
        shutil.rmtree(Path(folder) / "wandb")
        removed.append(Path(folder) / "wandb")
    return removed
