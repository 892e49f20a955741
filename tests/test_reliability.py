"""Failures that must never pass silently: damaged checkpoints, odd embedding files, two writers on one run
folder, resumes that would not do what they record, --overwrite leftovers, divergence, huge configs."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import main
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint_atomically, weights_digest
from config import ConfigError, load_config
from conftest import REPO_ROOT
from errors import UsageError
from run_folder import LOCK_FILE, run_folder_lock

TINY = ["model.backbone=tiny", "model.embedding_dim=8", "data.image_size=32", "data.num_workers=0",
        "train.precision=fp32", "train.device=cpu", "wandb.mode=disabled", "data.startup_check=none",
        "data.demo_classes=6", "data.demo_images_per_class=4", "data.classes_per_batch=3", "data.images_per_class=2",
        "data.val_fraction=0", "eval.recall_ks=[1,2]", "eval.map_ks=[2]"]


def run_cli(*argv):
    return main.main([str(a) for a in argv])


def train(tmp_path, *extra, run="run"):
    return run_cli("--mode", "train", "--config", REPO_ROOT / "configs/demo.yaml", f"data.root={tmp_path}/demo",
                   f"output.dir={tmp_path / run}", "train.epochs=1", *TINY, *extra)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    assert train(tmp_path) == 0
    return tmp_path


def test_a_checkpoint_with_flipped_bytes_in_its_weights_is_refused(trained_run, tmp_path, capsys):
    checkpoint = load_checkpoint(trained_run / "run" / "best.pt")
    assert checkpoint["weights_sha256"] == weights_digest(checkpoint["model"])
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name].view(-1)[:16] += 1.0  # what flipped bytes on disk turn into
    damaged = tmp_path / "damaged.pt"
    save_checkpoint_atomically(checkpoint, damaged)
    with pytest.raises(CheckpointError, match="differ from the content hash"):
        load_checkpoint(damaged)
    assert run_cli("--mode", "eval", "--checkpoint", damaged, f"output.dir={tmp_path}/eval",
                   f"data.root={trained_run}/demo", *TINY) == 1
    assert "damaged.pt" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable checkpoint"),
    (b"not a checkpoint at all", "not a readable checkpoint"),
])
def test_truncated_or_foreign_files_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_truncated_checkpoint_and_a_plain_state_dict_are_named_for_what_they_are(trained_run, tmp_path):
    whole = (trained_run / "run" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save(load_checkpoint(trained_run / "run" / "best.pt")["model"], tmp_path / "state_dict.pt")
    with pytest.raises(CheckpointError, match="plain state_dict"):
        load_checkpoint(tmp_path / "state_dict.pt")


def write_embeddings(tmp_path, embeddings, labels):
    np.save(tmp_path / "e.npy", embeddings)
    np.save(tmp_path / "l.npy", labels)
    return ["--mode", "eval", "--embeddings", tmp_path / "e.npy", "--labels", tmp_path / "l.npy",
            "eval.recall_ks=[1,5]", "eval.map_ks=[]", f"output.dir={tmp_path}/out"]


def test_float16_embeddings_give_the_float32_numbers(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    embeddings = (rng.normal(size=(50, 16)) * 300 + labels[:, None] * 40).astype(np.float16)  # norms overflow fp16
    reports = []
    for dtype in (np.float16, np.float32):
        assert run_cli(*write_embeddings(tmp_path, embeddings.astype(dtype), labels), "--output",
                       tmp_path / f"{np.dtype(dtype).name}.json") == 0
        reports.append(json.loads((tmp_path / f"{np.dtype(dtype).name}.json").read_text()))
    assert reports[0]["recall@1"] == reports[1]["recall@1"] and reports[0]["recall@5"] == reports[1]["recall@5"]


@pytest.mark.parametrize("make, message", [
    (lambda: np.zeros((5, 0), np.float32), "D >= 1"),
    (lambda: np.full((5, 3), np.nan, np.float32), "NaN or infinite"),
    (lambda: np.array([["a", "b"]] * 5), "real numbers"),
    (lambda: np.zeros((5, 3), np.float32), "all-zero rows"),
])
def test_embedding_files_that_cannot_be_scored_are_refused_in_one_line(tmp_path, capsys, make, message):
    assert run_cli(*write_embeddings(tmp_path, make(), np.arange(5) % 2)) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_npz_and_pickled_arrays_get_one_line(tmp_path, capsys):
    np.savez(tmp_path / "e.npz", e=np.ones((4, 2)))
    np.save(tmp_path / "l.npy", np.arange(4))
    np.save(tmp_path / "o.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    for name, message in (("e.npz", ".npz archive"), ("o.npy", "pickled objects")):
        assert run_cli("--mode", "eval", "--embeddings", tmp_path / name, "--labels", tmp_path / "l.npy",
                       f"output.dir={tmp_path}/out") == 2
        assert message in capsys.readouterr().err


def test_each_evaluation_names_its_own_outputs(trained_run, tmp_path):
    run = trained_run / "run"
    common = [f"data.root={trained_run}/demo", *TINY]
    assert run_cli("--mode", "eval", f"output.dir={run}", *common) == 0
    best_embeddings = np.load(run / "test_embeddings.npy")
    assert run_cli("--mode", "eval", "--checkpoint", run / "last.pt", "--output", tmp_path / "other.json",
                   f"output.dir={run}", *common) == 0
    assert np.array_equal(np.load(run / "test_embeddings.npy"), best_embeddings)  # best.pt's stay best.pt's
    assert (tmp_path / "other_test_embeddings.npy").is_file() and (tmp_path / "other.json").is_file()
    assert run_cli("--mode", "eval", "--checkpoint", run / "last.pt", f"output.dir={run}", *common) == 0
    assert json.loads((run / "last_report.json").read_text())["model"].startswith(str(run / "last.pt"))
    assert json.loads((run / "report.json").read_text())["model"].startswith(str(run / "best.pt"))


def test_an_unwritable_output_is_refused_before_any_work(trained_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_cli("--mode", "eval", "--output", blocker / "r.json", f"output.dir={trained_run}/run",
                   f"data.root={trained_run}/demo", *TINY) == 2
    error = capsys.readouterr().err
    assert "--output" in error and "cannot be written" in error


def test_a_second_writer_is_stopped_with_the_holders_pid_and_host(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from run_folder import run_folder_lock\n"
        "with run_folder_lock(sys.argv[2], 'train'):\n    print('held', flush=True); time.sleep(60)"),
        str(REPO_ROOT), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"in use by PID {holder.pid} on "):
            with run_folder_lock(tmp_path / "run", "train"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock is stale on this host and is taken over.
    assert (tmp_path / "run" / LOCK_FILE).exists()
    with run_folder_lock(tmp_path / "run", "train"):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_lock_from_another_host_says_how_to_clear_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "gpu-node-17", "mode": "train"}))
    with pytest.raises(UsageError, match=r"locked by PID 1 on gpu-node-17.*delete .*\.run\.lock"):
        with run_folder_lock(tmp_path / "run", "eval"):
            pass


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "gpu-node-17", "slurm_job_id": "4242"}))
    with run_folder_lock(tmp_path / "run", "train"):
        pass


def test_resume_refuses_keys_that_cannot_change_and_accepts_the_others(trained_run, tmp_path, capsys):
    import shutil

    shutil.copytree(trained_run / "run", tmp_path / "run")
    base = ["--mode", "train", "--config", REPO_ROOT / "configs/demo.yaml", "--resume", f"data.root={trained_run}/demo",
            f"output.dir={tmp_path / 'run'}", *TINY]
    before = (tmp_path / "run" / "last.pt").read_bytes()
    for change in ("train.lr=0.01", "train.weight_decay=0.5", "data.classes_per_batch=2", "train.seed=5"):
        assert run_cli(*base, "train.epochs=2", change) == 2
        assert f"--resume cannot change {change.split('=')[0]}" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert run_cli(*base, "--overwrite") == 2
    assert "pass one of them" in capsys.readouterr().err
    assert run_cli(*base, "train.epochs=2", "train.patience=3") == 0  # allowed: it takes effect
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_overwrite_removes_every_output_of_the_previous_run_first(trained_run, tmp_path):
    import shutil

    shutil.copytree(trained_run / "run", tmp_path / "run")
    (tmp_path / "run" / "report.json").write_text("{}")
    (tmp_path / "run" / "test_embeddings.npy").write_bytes(b"old")
    (tmp_path / "run" / ".last.pt.999999.tmp").write_bytes(b"torn")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    # An overwrite that stops at once (a batch too large) must not leave the old outputs beside the new run.
    assert train(trained_run, "--overwrite", "data.classes_per_batch=50", run=tmp_path / "run") == 2
    left = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert left == ["notes.txt"], left


def test_divergence_stops_in_one_line_and_never_saves_non_finite_weights(tmp_path, capsys):
    assert train(tmp_path, "train.lr=1e30", "train.head_lr_multiplier=1", "train.epochs=2",
                 "train.grad_clip=0", "train.warmup_fraction=0") == 1
    error = capsys.readouterr().err
    assert "diverged" in error or "NaN or infinite" in error
    last = tmp_path / "run" / "last.pt"
    if last.exists():
        checkpoint = load_checkpoint(last)
        assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


@pytest.mark.parametrize("override", ["train.lr=inf", "eval.memory_gb=inf", "train.margin=nan"])
def test_non_finite_numbers_are_refused_for_float_keys(override):
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, [override])


def test_a_billion_laughs_config_fails_fast_with_a_short_message(tmp_path):
    lines = ["a: &a [1,1,1,1,1,1,1,1,1]"] + [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]"
                                              for i in range(8)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\neval:\n  recall_ks: *i\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "bomb.yaml")
    assert time.perf_counter() - started < 5 and len(str(raised.value)) < 400
