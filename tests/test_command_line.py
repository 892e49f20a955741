"""The command line as a newcomer meets it: argument order, help, hints, defaults that fit small data,
evaluating a run without repeating its settings, a quiet run, what best.pt holds, and one wandb run per run."""

import json

import numpy as np
import pytest
from PIL import Image

import main
from checkpoint import MODEL_ONLY_KEYS, load_checkpoint
from config import load_config
from conftest import REPO_ROOT


def run_cli(*argv):
    return main.main([str(a) for a in argv])


def write_folder_catalogue(root, classes: int, images: int, seed: int) -> None:
    """root/<class name>/<n>.png: flat colours per class with noise, enough to train on for a step."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"species_{chr(97 + c)}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 255, 3)
        for i in range(images):
            pixels = np.clip(colour + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


FAST = ["model.backbone=tiny", "model.embedding_dim=16", "data.image_size=32", "data.num_workers=0",
        "train.epochs=1", "train.precision=fp32", "train.device=cpu", "wandb.mode=disabled", "data.startup_check=none"]


@pytest.mark.parametrize("argv", [
    ["--mode", "eval", "output.dir=RUN", "--output", "r.json"],
    ["output.dir=RUN", "--mode", "eval", "--output", "r.json"],
    ["--output", "r.json", "output.dir=RUN", "--mode", "eval"],
    ["--mode", "eval", "output.dir=RUN", "--output", "r.json", "train.seed=3"],
])
def test_options_and_overrides_mix_in_any_order(argv):
    arguments = main.parse_arguments(argv)
    assert arguments.mode == "eval" and str(arguments.output) == "r.json"
    assert arguments.overrides[0] == "output.dir=RUN"


def test_an_unknown_option_that_is_a_config_key_says_how_to_write_it(capsys):
    with pytest.raises(SystemExit) as exited:
        main.parse_arguments(["--mode", "train", "--epochs", "3"])
    assert exited.value.code == 2
    assert "write train.epochs=3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main.parse_arguments(["--mode", "train", "--no-such-thing"])
    assert "docs/configuration.md" in capsys.readouterr().err


def test_help_names_every_mode_with_its_purpose_and_where_keys_are_documented(capsys):
    with pytest.raises(SystemExit):
        main.parse_arguments(["--help"])
    text = capsys.readouterr().out
    for mode, (purpose, _) in main.MODES.items():
        assert f"{mode}  " in text and purpose in text
    assert "docs/configuration.md" in text


def test_type_errors_read_as_english():
    from config import ConfigError

    with pytest.raises(ConfigError, match="expects an int, got 'three'"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="expects a list of ints"):
        load_config(None, ["eval.recall_ks=[a]"])


def test_evaluation_keys_follow_training_unless_set():
    inherited = load_config(None, ["train.precision=fp32", "train.device=cpu", "train.compile=true"])
    assert (inherited.eval.precision, inherited.eval.device, inherited.eval.compile) == ("fp32", "cpu", True)
    own = load_config(None, ["train.precision=fp32", "eval.precision=bf16"])
    assert own.eval.precision == "bf16" and own.train.precision == "fp32"


def test_default_run_folders_are_named_after_the_config_or_the_data(tmp_path):
    recipe = tmp_path / "shoes_triplet.yaml"
    recipe.write_text("train:\n  epochs: 3\n")
    assert load_config(recipe).output.dir == "models_ckpt/shoes_triplet"
    assert load_config(None, [f"data.root={tmp_path}/catalogue/train"]).output.dir == "models_ckpt/catalogue"
    assert load_config(None, [f"data.root={tmp_path}/shoes"]).output.dir == "models_ckpt/shoes"
    assert load_config(None, ["output.dir=elsewhere"]).output.dir == "elsewhere"


def test_a_newcomers_folder_catalogue_trains_and_evaluates_without_repeating_the_model(tmp_path, monkeypatch, capsys):
    """12 small classes: the default P x K is refused with values that fit, default k that do not fit are left
    out, the run folder is named after the catalogue, and eval needs neither the model keys nor output.dir."""
    monkeypatch.chdir(tmp_path)
    write_folder_catalogue(tmp_path / "catalogue" / "train", classes=8, images=5, seed=0)
    write_folder_catalogue(tmp_path / "catalogue" / "test", classes=4, images=5, seed=1)
    data = [f"data.format=folder", f"data.root={tmp_path}/catalogue/train", f"data.test_root={tmp_path}/catalogue/test",
            "data.val_fraction=0.25"]
    assert run_cli("--mode", "train", *data, *FAST) == 2
    error = capsys.readouterr().err
    assert "with data.images_per_class=4, use data.classes_per_batch <= 6" in error  # 30 images, 6 classes

    assert run_cli("--mode", "train", *data, *FAST, "data.classes_per_batch=3", "data.images_per_class=2") == 0
    run_dir = tmp_path / "models_ckpt" / "catalogue"
    assert (run_dir / "best.pt").is_file()
    capsys.readouterr()
    # Only the data: the model (tiny, 16-d, 32 px) comes from the run's config.yaml and the checkpoint.
    assert run_cli("--mode", "eval", *data, "--visualize", "2") == 0
    out = capsys.readouterr().out
    assert "leaving out the default k = 100, 1000 of eval.recall_ks" in out
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) >= {"recall@1", "recall@10", "map@r"} and "recall@100" not in report
    assert report["embedding_dim"] == 16
    # An explicitly requested k that cannot fit is still an error.
    assert run_cli("--mode", "eval", *data, "eval.recall_ks=[1,50]") == 2
    assert "eval.recall_ks asks for k = 50" in capsys.readouterr().err


def test_a_training_run_prints_progress_not_log_noise_and_best_pt_holds_only_the_model(trained_demo_run, tmp_path):
    """The session's one-epoch demo run (conftest.trained_demo_run): what it printed, and what it saved."""
    run = trained_demo_run.copy(tmp_path / "run")
    demo = trained_demo_run.overrides(run)
    assert "retrieval:" not in trained_demo_run.printed  # the search's choices are --debug detail
    assert "best validation recall@1" in trained_demo_run.printed

    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert set(best) <= set(MODEL_ONLY_KEYS) and {"model", "config", "epoch", "metrics"} <= set(best)
    assert {"optimizer", "scheduler", "rng"} <= set(last)
    reports = {}
    for name in ("best.pt", "last.pt"):  # after one epoch they hold the same weights: the same metrics
        assert run_cli("--mode", "eval", "--checkpoint", run / name, "--output", tmp_path / f"{name}.json", *demo) == 0
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert reports["best.pt"]["recall@1"] == reports["last.pt"]["recall@1"]


def test_without_validation_classes_the_summary_says_so_and_a_resumed_run_continues_its_wandb_run(tmp_path, capfd):
    run = tmp_path / "run"
    demo = [f"data.root={tmp_path}/demo", "data.demo_classes=6", "data.demo_images_per_class=4",
            "data.classes_per_batch=3", "data.images_per_class=2", "data.val_fraction=0", f"output.dir={run}"]
    offline = [*FAST, "wandb.mode=offline"]
    assert run_cli("--mode", "train", "--config", REPO_ROOT / "configs/demo.yaml", *demo, *offline) == 0
    first = capfd.readouterr()
    # no validation classes: the summary says so instead of a best recall of minus infinity
    assert "inf" not in first.out and "no validation split (best.pt is the last epoch)" in first.out
    first_id = load_checkpoint(run / "last.pt")["wandb_run_id"]
    assert first_id
    assert run_cli("--mode", "train", "--config", REPO_ROOT / "configs/demo.yaml", "--resume", *demo, *offline,
                   "train.epochs=2") == 0
    assert load_checkpoint(run / "last.pt")["wandb_run_id"] == first_id
    run_folders = {path.name.rsplit("-", 1)[-1] for path in (run / "wandb").glob("offline-run-*")}
    assert run_folders == {first_id}
    printed = capfd.readouterr()
    wandb_lines = [line for line in (first.out + first.err + printed.out + printed.err).splitlines()
                   if line.startswith("wandb:")]
    assert len(wandb_lines) == 2, wandb_lines  # one line of ours per run, not wandb's banner and summary
