"""The pipeline through the same CLI a user types (in-process for speed, one real subprocess)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import main
from conftest import DEMO_CONFIG, REPO_ROOT
from checkpoint import load_checkpoint

REPORT_KEYS = {"recall@1", "map@r", "r_precision", "mrr", "num_queries"}


def run_cli(*argv):
    return main.main([str(a) for a in argv])


def brute_force_metrics(embeddings, labels):
    """Per-query loops over a full similarity matrix: ties broken by smaller index, self excluded."""
    n = len(labels)
    similarity = embeddings @ embeddings.T
    sums = {"recall@1": 0.0, "recall@10": 0.0, "map@r": 0.0, "r_precision": 0.0, "mrr": 0.0}
    counted = 0
    for q in range(n):
        order = sorted((j for j in range(n) if j != q), key=lambda j: (-similarity[q, j], j))
        hits = [labels[j] == labels[q] for j in order]
        r = sum(hits)
        if r == 0:
            continue
        counted += 1
        sums["recall@1"] += float(any(hits[:1]))
        sums["recall@10"] += float(any(hits[:10]))
        sums["r_precision"] += sum(hits[:r]) / r
        sums["map@r"] += sum(sum(hits[:i + 1]) / (i + 1) for i in range(r) if hits[i]) / r
        sums["mrr"] += 1.0 / (hits.index(True) + 1)
    return {key: value / counted for key, value in sums.items()}, counted


def test_eval_of_precomputed_embeddings_matches_brute_force_with_ties_and_duplicates(tmp_path):
    generator = np.random.default_rng(0)
    # Unit vectors with four entries of +-1/2 and two zeros: every similarity is an exact multiple of 1/4,
    # so float32 and float64 agree and exact ties abound (including at the top-k boundary).
    signs = generator.choice([-0.5, 0.5], size=(60, 6))
    zeros = np.argsort(generator.random((60, 6)), axis=1)[:, :2]
    np.put_along_axis(signs, zeros, 0.0, axis=1)
    embeddings = signs.astype(np.float32)
    embeddings[10] = embeddings[11] = embeddings[12]  # exact duplicates
    labels = generator.integers(0, 12, size=60)
    labels[59] = 99  # a class of one: no relevant item, excluded from every metric
    np.save(tmp_path / "e.npy", embeddings)
    np.save(tmp_path / "l.npy", labels)
    code = run_cli("--mode", "eval", "--embeddings", tmp_path / "e.npy", "--labels", tmp_path / "l.npy",
                   "--output", tmp_path / "report.json", "eval.backend=torch", "eval.recall_ks=[1,10,59]",
                   "eval.map_ks=[]")
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert REPORT_KEYS | {"recall@10", "recall@59"} <= set(report)
    expected, counted = brute_force_metrics(embeddings.astype(np.float64), labels)
    assert report["num_queries"] == counted < 60
    assert report["num_queries_without_relevant"] == 60 - counted
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-6), key
    assert report["recall@59"] == 1.0  # k = N - 1 retrieves everything


def test_train_writes_run_folder_then_resume_continues_optimiser_and_epoch(trained_demo_run, tmp_path):
    run = trained_demo_run.copy(tmp_path / "run")
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    steps_per_epoch = trained_demo_run.batches_per_epoch()  # printed from the sampler, before training
    first = load_checkpoint(run / "last.pt")
    assert first["epoch"] == 1 and first["global_step"] == steps_per_epoch > 0
    assert "recall@1" in first["metrics"]
    assert {"model", "optimizer", "scheduler", "scaler", "config"} <= set(first)

    # Resume with more epochs: the optimiser's moments continue from the saved ones, and the epoch count too.
    assert run_cli("--mode", "train", "--config", DEMO_CONFIG, "--resume",
                   *trained_demo_run.overrides(run, **{"train.epochs": 2})) == 0
    second = load_checkpoint(run / "last.pt")
    assert second["epoch"] == 2
    assert second["global_step"] == first["global_step"] + steps_per_epoch
    first_state, second_state = first["optimizer"]["state"], second["optimizer"]["state"]
    assert second_state[0]["step"].item() == first_state[0]["step"].item() + steps_per_epoch
    assert len(second["history"]) == 2


def test_resume_restores_exact_state_into_the_trainer(trained_demo_run, tmp_path):
    last = trained_demo_run.run_dir / "last.pt"
    saved = load_checkpoint(last)
    from config import load_config
    from model import build_embedder
    from objective import objective_from_config
    from optimization import build_optimizer, warmup_cosine_schedule
    from trainer import Trainer

    config = load_config(trained_demo_run.run_dir / "config.yaml")
    model = build_embedder("tiny", 32, 64)
    objective = objective_from_config(config.train, config.data.repeat_positives, np.arange(3), 64)
    optimizer = build_optimizer(model, 1e-3, 1.0, 0.05, torch.device("cpu"), objective.parameters())
    trainer = Trainer(model, objective, optimizer, warmup_cosine_schedule(optimizer, 10, 1), None, None,
                      torch.device("cpu"), "fp32", 1.0, 1, 0, tmp_path, None, 0, {})
    trainer.resume(saved, last)
    assert trainer.epoch == saved["epoch"] == 1
    assert trainer.global_step == saved["global_step"] > 0
    assert trainer.scheduler.last_epoch == saved["scheduler"]["last_epoch"]
    for key, tensor in saved["optimizer"]["state"][0].items():
        assert torch.equal(optimizer.state_dict()["state"][0][key], tensor), key
    for name, tensor in saved["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_existing_run_is_not_overwritten_silently(trained_demo_run, tmp_path, capsys):
    run = trained_demo_run.copy(tmp_path / "run")
    before = (run / "last.pt").stat().st_mtime_ns
    assert run_cli("--mode", "train", "--config", DEMO_CONFIG, *trained_demo_run.overrides(run)) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "last.pt").stat().st_mtime_ns == before


def test_eval_of_checkpoint_and_of_untrained_model_write_reports(trained_demo_run, tmp_path):
    run = trained_demo_run.copy(tmp_path / "run")
    overrides = trained_demo_run.overrides(run)
    assert run_cli("--mode", "eval", "--config", DEMO_CONFIG, "--visualize", "3", *overrides) == 0
    assert run_cli("--mode", "eval", "--config", DEMO_CONFIG, "--checkpoint", "none", *overrides) == 0
    trained = json.loads((run / "report.json").read_text())
    untrained = json.loads((run / "untrained_report.json").read_text())
    for report in (trained, untrained):
        assert REPORT_KEYS | {"recall@2", "recall@4", "map@4"} <= set(report)
        assert all(0.0 <= report[key] <= 1.0 for key in REPORT_KEYS - {"num_queries"})
        assert report["num_images_listed"] == 16 and report["num_images_skipped"] == 0
        assert report["num_queries"] == 16  # 4 test classes x 4 images
        # the timings that tell a slow start from a slow embedding loop
        assert report["seconds_setup"] > 0 and report["seconds_embed"] > 0
        parts = report["seconds_setup_parts"]
        assert set(parts) == {"imports", "image_list", "model_and_loader"} and min(parts.values()) >= 0
        assert abs(sum(parts.values()) - report["seconds_setup"]) < 0.01
        assert 0 <= report["seconds_embed_to_first_batch"] <= report["seconds_embed_waiting_for_images"]
        assert report["seconds_embed_waiting_for_images"] <= report["seconds_embed"]
        assert report["seconds_embed_on_device"] is None  # measured on CUDA only
    assert np.load(run / "test_embeddings.npy").shape == (16, 64)
    paths = (run / "test_paths.txt").read_text().splitlines()
    assert len(paths) == 16 and all((trained_demo_run.data_root / path).is_file() for path in paths)
    assert set(trained["recall@1_by_super_class"]) <= {str(s) for s in range(1, 9)}  # demo super class = shape
    from PIL import Image

    with Image.open(run / "retrieval_examples.png") as grid:
        assert grid.height > grid.width / 9 * 2.5  # three query rows of 1 + 8 tiles
    for name in ("recall_at_k.png", "validation_curve.png", "untrained_recall_at_k.png"):
        assert (run / name).is_file(), name
    assert not (run / "untrained_retrieval_examples.png").exists()  # no --visualize there


def test_bad_override_is_a_one_line_error_before_any_work(tmp_path):
    completed = subprocess.run(
        [sys.executable, "main.py", "--mode", "train", "train.epohcs=3", f"output.dir={tmp_path / 'x'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0
    assert "train.epohcs" in completed.stderr and "train.epochs" in completed.stderr
    assert not (tmp_path / "x").exists()


def test_malformed_list_line_is_a_one_line_error_naming_file_and_line(tmp_path, capsys):
    root = tmp_path / "sop"
    root.mkdir()
    (root / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 1 a/1.jpg\n2 one 1 a/2.jpg\n")
    code = run_cli("--mode", "train", "data.format=sop", f"data.root={root}", f"output.dir={tmp_path / 'run'}",
                   "model.backbone=tiny", "wandb.mode=disabled")
    error = capsys.readouterr().err.strip()
    assert code != 0
    assert error.count("\n") == 0
    assert "Ebay_train.txt:3" in error


def test_missing_sop_root_is_an_error_and_generates_nothing(tmp_path, capsys):
    root = tmp_path / "nowhere"
    code = run_cli("--mode", "train", f"data.root={root}", f"output.dir={tmp_path / 'run'}", "wandb.mode=disabled")
    assert code == 2
    assert "data.root" in capsys.readouterr().err
    assert not root.exists()


def test_checkpoint_from_another_model_definition_is_refused_with_the_difference(trained_demo_run, tmp_path, capsys):
    run = trained_demo_run.copy(tmp_path / "run")
    overrides = trained_demo_run.overrides(run)
    before = (run / "last.pt").read_bytes()
    changed = [*overrides, "model.embedding_dim=32"]
    assert run_cli("--mode", "train", "--config", DEMO_CONFIG, "--resume", *changed) == 2
    assert "model.embedding_dim: 64 in the checkpoint, 32 now" in capsys.readouterr().err
    assert "embedding_dim: 64" in (run / "config.yaml").read_text()  # the run's config untouched
    assert run_cli("--mode", "eval", "--config", DEMO_CONFIG, *overrides, "data.image_size=48") == 2
    assert "data.image_size=48 was asked for, but checkpoint" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == before
