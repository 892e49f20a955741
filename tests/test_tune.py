"""--mode tune (an Optuna search, each trial a normal run) and configs/sweep.yaml (wandb sweep's command line)."""

import csv
import json

import optuna
import pytest
import yaml

import main
from conftest import REPO_ROOT
from errors import EXIT_USAGE
from modes import tune
from modes.tune import SearchDimension, split_search_space


def test_search_space_is_told_from_overrides_by_the_keys_type():
    fixed, space = split_search_space([
        "train.lr=1e-5:1e-3:log", "train.margin=0.05:0.3", "train.epochs=2:6", "train.miner=[all, semihard]",
        "train.epochs_typo=1:2", "output.dir=/runs/a:b", "data.root=[x]", "eval.recall_ks=[1,10]", "train.seed=3",
        "train.loss_params.alpha=1:4", "train.loss_params.beta=10:6e1:log",
    ])
    assert space == [SearchDimension("train.lr", 1e-5, 1e-3, log=True), SearchDimension("train.margin", 0.05, 0.3),
                     SearchDimension("train.epochs", 2, 6), SearchDimension("train.miner", choices=("all", "semihard")),
                     SearchDimension("data.root", choices=("x",)), SearchDimension("train.loss_params.alpha", 1, 4),
                     SearchDimension("train.loss_params.beta", 10.0, 60.0, log=True)]
    assert isinstance(space[-2].low, int) and isinstance(space[-1].low, float)
    # an unknown key, a string with a colon, a list-valued key and a plain value stay overrides
    assert fixed == ["train.epochs_typo=1:2", "output.dir=/runs/a:b", "eval.recall_ks=[1,10]", "train.seed=3"]


@pytest.mark.parametrize("words, message", [
    (["train.lr=1e-3:1e-5"], "needs low < high"),
    (["train.margin=0:0.3:log"], "a log range needs low > 0"),
    (["train.miner=[all,hardest]"], "train.miner='hardest' cannot be tried"),
    (["train.epochs=1.5:3"], "write the range of train.epochs as two integers"),
    (["train.lr=1.2.3:4"], "write the range of train.lr as two numbers"),
    (["train.loss=multi_similarity", "train.loss_params.alfa=1:4"], "has no parameter 'alfa'"),
    ([], "needs at least one key to search"),
])
def test_a_search_no_trial_could_run_is_refused_before_training(tmp_path, capsys, words, message):
    code = main.main(["--mode", "tune", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--trials", "2",
                      f"output.dir={tmp_path}", *words])
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "trial_000").exists()


class PruneTheSecondTrial(optuna.pruners.BasePruner):
    """Stands in for the median pruner, whose verdict on three tiny runs would be a coin toss."""

    def prune(self, study, trial) -> bool:
        return trial.number == 1


def test_a_three_trial_search_on_the_demo_writes_runs_results_and_a_picture(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tune, "build_pruner", PruneTheSecondTrial)
    out = tmp_path / "search"
    code = main.main(["--mode", "tune", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--trials", "3",
                      "train.lr=1e-4:1e-3:log", "train.warmup_fraction=[0.0,0.1]",
                      f"data.root={tmp_path / 'demo_data'}", "data.demo_classes=8", "data.demo_images_per_class=4",
                      "data.image_size=32", "data.val_fraction=0.25", "data.classes_per_batch=3",
                      "data.images_per_class=2", "data.startup_check=none", "train.epochs=2", "model.embedding_dim=16",
                      "eval.recall_ks=[1,2]", "eval.map_ks=[2]", "wandb.mode=disabled", f"output.dir={out}"])
    assert code == 0
    rows = list(csv.DictReader((out / "tune_results.csv").open()))
    assert [row["state"] for row in rows] == ["complete", "pruned", "complete"]
    assert [row["epochs"] for row in rows] == ["2", "1", "2"]
    assert len({row["train.lr"] for row in rows}) == 3
    assert all(1e-4 <= float(row["train.lr"]) <= 1e-3 for row in rows)
    assert all(row["train.warmup_fraction"] in ("0.0", "0.1") for row in rows)
    for number, row in enumerate(rows):
        run = out / f"trial_{number:03d}"
        assert row["run_dir"] == str(run) and (run / "best.pt").is_file()
        trial_config = yaml.safe_load((run / "config.yaml").read_text())
        assert trial_config["train"]["lr"] == pytest.approx(float(row["train.lr"]))
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                  if '"val/recall@1"' in line]
        assert float(row["val_recall@1"]) == pytest.approx(max(e["val/recall@1"] for e in epochs))
    assert (out / "tune_best.png").stat().st_size > 0
    assert "best: trial_00" in capsys.readouterr().out
    # A second search into the same folder would mix two searches' trials: refused unless --overwrite.
    assert main.main(["--mode", "tune", "--trials", "1", "train.lr=1e-4:1e-3", f"output.dir={out}"]) == EXIT_USAGE


def test_wandb_sweep_command_line_is_accepted_by_main():
    """The command `wandb agent` runs for a trial of configs/sweep.yaml, built by wandb's own code, parses and
    resolves to the trial's values."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load((REPO_ROOT / "configs" / "sweep.yaml").read_text())
    values = {name: spec["values"][0] if "values" in spec else spec["min"]
              for name, spec in sweep["parameters"].items()}
    macros = create_sweep_command_args({"args": {name: {"value": value} for name, value in values.items()}})
    macros.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    command = [word for chunk in sweep["command"]
               for word in (macros[chunk[2:-1]] if chunk.startswith("${") else [chunk])]  # as wandb_agent.py does
    assert command[:3] == ["/usr/bin/env", "python", "main.py"]
    assert "train.lr=5e-06" in command  # Python's spelling of a float: no dot, which YAML reads as a string
    argv = [word.replace("configs/", f"{REPO_ROOT}/configs/") for word in command[3:]]
    config = main.resolve_config(main.parse_arguments(argv))
    for name, value in values.items():
        section, key = name.split(".")
        assert getattr(getattr(config, section), key) == pytest.approx(value), name
    assert sweep["metric"] == {"name": "val/recall@1", "goal": "maximize"}  # the key the trainer logs per epoch
