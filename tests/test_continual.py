"""Fine-tuning on new classes: --init-from (a new run from a checkpoint's weights) and data.replay_list."""

import json

import numpy as np
import pytest
import torch

import main
from checkpoint import load_checkpoint
from config import load_config
from conftest import REPO_ROOT
from dataloaders import write_sop_list
from dataloaders.loaders import resolve_image_lists
from dataloaders.replay import replay_indices
from errors import EXIT_USAGE


def tiny_run(tmp_path, name, *extra):
    return ["--config", REPO_ROOT / "configs" / "demo.yaml", f"data.root={tmp_path / 'demo_data'}",
            "data.demo_classes=8", "data.demo_images_per_class=4", "data.image_size=32", "data.val_fraction=0.25",
            "data.classes_per_batch=3", "data.images_per_class=2", "data.startup_check=none", "train.epochs=1",
            "model.embedding_dim=16", "eval.recall_ks=[1,2]", "eval.map_ks=[2]", "wandb.mode=disabled",
            f"output.dir={tmp_path / name}", *extra]


def cli(*words):
    return main.main([str(word) for word in words])


def test_replay_keeps_a_fraction_of_every_class_and_at_least_a_pair():
    labels = np.array([1] * 10 + [2] * 3 + [3] * 1 + [4] * 40)
    chosen = replay_indices(labels, 0.25, seed=0)
    kept = {label: int((labels[chosen] == label).sum()) for label in (1, 2, 3, 4)}
    assert kept == {1: 2, 2: 2, 3: 1, 4: 10}  # round(2.5) = 2; at least 2; a lone image stays alone
    assert np.array_equal(chosen, replay_indices(labels, 0.25, seed=0))
    assert not np.array_equal(chosen, replay_indices(labels, 0.25, seed=1))
    assert len(replay_indices(labels, 1.0, seed=0)) == len(labels)


def test_replay_list_joins_the_training_split_only(tmp_path):
    new = [f"new/{i}.jpg" for i in range(24)]  # lists only: no image is opened
    write_sop_list(tmp_path / "new.txt", new, np.repeat(np.arange(1, 5), 6))
    write_sop_list(tmp_path / "old.txt", [f"old/{i}.jpg" for i in range(40)], np.repeat(np.arange(11, 15), 10))
    base = ["data.format=sop", f"data.root={tmp_path}", "data.train_list=new.txt", "data.val_fraction=0.25"]
    train, validation, _ = resolve_image_lists(load_config(None, base).data, 0, need_train=True, need_test=False)
    replayed, validation_now, _ = resolve_image_lists(
        load_config(None, [*base, "data.replay_list=old.txt", "data.replay_fraction=0.3"]).data, 0,
        need_train=True, need_test=False)
    assert validation_now.paths == validation.paths  # replayed classes never judge the model
    assert replayed.paths[:len(train)] == train.paths
    assert len(replayed) == len(train) + 4 * 3 and all(p.startswith("old/") for p in replayed.paths[len(train):])

    write_sop_list(tmp_path / "clash.txt", ["old/a.jpg", "old/b.jpg"], [int(validation.labels[0])] * 2)
    with pytest.raises(Exception, match="also validation classes"):
        resolve_image_lists(load_config(None, [*base, "data.replay_list=clash.txt"]).data, 0, True, False)


def test_init_from_starts_a_new_run_from_the_checkpoint_weights(tmp_path, capsys):
    assert cli("--mode", "train", *tiny_run(tmp_path, "first")) == 0
    first = load_checkpoint(tmp_path / "first" / "best.pt")
    # A learning rate of 1e-12 leaves the weights where they started: they must be the first run's.
    assert cli("--mode", "train", *tiny_run(tmp_path, "second", "train.lr=1e-12", "train.loss_lr=1e-12"),
               "--init-from", tmp_path / "first" / "best.pt") == 0
    second = load_checkpoint(tmp_path / "second" / "last.pt")
    assert second["epoch"] == 1  # a new run: its own first epoch, not the first run's second
    for name, tensor in first["model"].items():
        torch.testing.assert_close(second["model"][name], tensor, rtol=0, atol=1e-6)
    source = {"path": str((tmp_path / "first" / "best.pt").resolve()), "epoch": 1,
              "weights_sha256": first["weights_sha256"]}
    assert second["init_from"] == source
    assert load_checkpoint(tmp_path / "second" / "best.pt")["init_from"] == source
    logged = json.loads((tmp_path / "second" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["init_from_weights_sha256"] == first["weights_sha256"]
    capsys.readouterr()

    # The checkpoint decides the model: another explicit embedding size is refused, before any training.
    assert cli("--mode", "train", *tiny_run(tmp_path, "third", "model.embedding_dim=32"),
               "--init-from", tmp_path / "first" / "best.pt") == EXIT_USAGE
    assert "model.embedding_dim=32 was asked for" in capsys.readouterr().err
    assert cli("--mode", "train", *tiny_run(tmp_path, "second"), "--resume",
               "--init-from", tmp_path / "first" / "best.pt") == EXIT_USAGE
    assert "pass one of them" in capsys.readouterr().err
