"""Several processes (torch.distributed, gloo on the CPU): the ranks' shares of the epoch plan, and one torchrun
launch of 2 processes that trains with cross-rank mining, evaluates, is stopped by SIGTERM to one rank and resumed,
compared with the single-process program run here.

Equality with one process needs what each process draws from its own random stream to be left out: the crops
and flips of training images and the tiny backbone's stochastic depth draw per image, so a process holding half
the batch draws other numbers (docs/distributed.md). `deterministic_draws` turns both off, here and in the
workers (which run this file as a script: `__main__` below). The SIGTERM is a real signal to one process, sent by
that process to itself during step 2, so that no test waits on timing.
"""

import contextlib
import io
import json
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for the torchrun workers, which run this file as a script

from conftest import DEMO_CONFIG, tiny_demo_overrides  # noqa: E402
from dataloaders.samplers import PKBatchSampler, RandomTripletBatchSampler, ShuffleBatchSampler  # noqa: E402
from distributed import Processes, shard_of_batches  # noqa: E402

STEPS_PER_EPOCH, EPOCHS = 3, 1  # 3 training classes x 4 images, P x K = 2 x 2: 6 chunks, 3 batches of 4
STOP_AFTER_STEP = 2  # rank 1 sends itself SIGTERM during this step


def overrides(data_root, run_dir) -> list[str]:
    # eval.batch_size=4: the 16 test images are 4 batches, 2 per process; the 4 validation images one batch,
    # so rank 1's validation shard is empty (uneven shards).
    return tiny_demo_overrides(data_root, run_dir, **{"train.epochs": EPOCHS, "data.classes_per_batch": 2,
                                                      "data.images_per_class": 2, "eval.batch_size": 4})


@contextlib.contextmanager
def deterministic_draws(losses: list):
    """No random crop or flip, no stochastic depth; every step appended to `losses` as (step, loss, gradient norm)."""
    import model
    from dataloaders import transforms
    from trainer import Trainer

    with pytest.MonkeyPatch.context() as patch:
        tiny = model.tiny_backbone_config

        def without_stochastic_depth(image_size: int):
            config = tiny(image_size)
            config.drop_path_rate = 0.0
            return config

        patch.setattr(model, "tiny_backbone_config", without_stochastic_depth)
        patch.setattr(transforms.TrainCropAndFlip, "__call__",
                      lambda self, picture: transforms.EvalResizeAndCentreCrop(self.image_size)(picture))
        step = Trainer.train_step

        def recorded_step(self, *args, **kwargs):
            loss, signals = step(self, *args, **kwargs)
            losses.append((self.global_step, loss, float(signals["grad_norm"])))
            if os.environ.get("STOP_RANK") == str(self.processes.rank) and self.global_step == STOP_AFTER_STEP:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal to this one process, mid-run
            return loss, signals

        patch.setattr(Trainer, "train_step", recorded_step)
        yield


# ---- the ranks' shares (no processes) ----------------------------------------------------------------------

def rank_batches(make_sampler, world_size: int, epoch: int, start: int = 0) -> list[list[list[int]]]:
    """[rank][batch] -> item indices, each rank's sampler built and set as its process would."""
    shares = []
    for rank in range(world_size):
        sampler = make_sampler()
        sampler.set_rank_share(rank, world_size)
        sampler.set_epoch(epoch)
        sampler.set_start_batch(start)
        shares.append(list(sampler))
    return shares


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shares_of_a_pk_epoch_union_to_the_single_process_plan(world_size):
    labels = np.repeat(np.arange(13), [2, 3, 5, 4, 4, 7, 2, 6, 3, 3, 9, 4, 5])

    def make():
        return PKBatchSampler(labels, classes_per_batch=4, images_per_class=3, seed=7)

    single = make()
    for epoch, start in ((0, 0), (3, 2)):  # also from the middle of an epoch, as a resumed run starts
        single.set_epoch(epoch)
        single.set_start_batch(start)
        plan = list(single)
        shares = rank_batches(make, world_size, epoch, start)
        assert all(len(share) == len(plan) for share in shares)
        for step, batch in enumerate(plan):
            joined = [item for share in shares for item in share[step]]
            assert joined == batch  # rank order is the batch's order: the gathered batch is the same
            # whole classes per rank: each share is (P / world) classes x K images
            for share in shares:
                share_labels = labels[share[step]]
                assert len(set(share_labels)) == 4 // world_size
                assert all((share_labels == label).sum() == 3 for label in set(share_labels))


def test_rank_shares_of_triplet_and_shuffle_epochs_union_to_the_plan():
    labels = np.repeat(np.arange(10), 4)
    triplets = rank_batches(lambda: RandomTripletBatchSampler(labels, 4, seed=1), 2, epoch=1)
    plan = RandomTripletBatchSampler(labels, 4, seed=1).epoch_plan(1)
    for step, batch in enumerate(plan):
        rank0, rank1 = triplets[0][step], triplets[1][step]
        # each rank keeps whole triplets laid out as a batch: its anchors, then their positives, negatives
        assert rank0 == [*batch[0:2], *batch[4:6], *batch[8:10]]
        assert rank1 == [*batch[2:4], *batch[6:8], *batch[10:12]]
    shuffled = rank_batches(lambda: ShuffleBatchSampler(40, 6, seed=3), 3, epoch=0)
    plan = ShuffleBatchSampler(40, 6, seed=3).epoch_plan(0)
    assert [sum((share[step] for share in shuffled), []) for step in range(len(plan))] == plan.tolist()


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    sampler = PKBatchSampler(np.repeat(np.arange(6), 4), classes_per_batch=3, images_per_class=2, seed=0)
    with pytest.raises(ValueError, match=r"classes_per_batch \(P.*= 3 does not split evenly over 2"):
        sampler.set_rank_share(0, 2)


def test_evaluation_shards_are_whole_batches_in_list_order():
    for num_items, batch_size, world_size in ((16, 4, 2), (4, 4, 2), (103, 10, 4), (5, 2, 8)):
        shards = [shard_of_batches(num_items, batch_size, Processes(rank, world_size)) for rank in range(world_size)]
        assert [i for shard in shards for i in shard] == list(range(num_items))
        assert all(shard.start % batch_size == 0 for shard in shards if len(shard))
    assert [len(shard_of_batches(4, 4, Processes(rank, 2))) for rank in range(2)] == [4, 0]


# ---- 2 processes by torchrun against 1 process ---------------------------------------------------------------

@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One torchrun launch (2 gloo processes, `__main__` below) and the single-process runs it is compared with."""
    import main

    folder = tmp_path_factory.mktemp("distributed")
    data_root = folder / "demo_data"
    single_losses: list = []
    printed = io.StringIO()
    with deterministic_draws(single_losses), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        # also generates the data, before the processes read them
        assert main.main(["--mode", "train", "--config", str(DEMO_CONFIG),
                          *overrides(data_root, folder / "single_run")]) == 0, printed.getvalue()[-3000:]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                   "STOP_RANK": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
         __file__, str(folder), str(data_root)],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=240)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-5000:]
    ranks = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):  # the same checkpoint, 1 process
        assert main.main(["--mode", "eval", "--config", str(DEMO_CONFIG), "--checkpoint",
                          str(folder / "ddp_run" / "best.pt"), "--output", str(folder / "single_eval" / "report.json"),
                          *overrides(data_root, folder / "ddp_run")]) == 0, printed.getvalue()[-3000:]
    return folder, single_losses, ranks, launched.stdout + launched.stderr


def model_weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_two_processes_with_cross_rank_mining_train_as_one_process_does(two_processes):
    folder, single_losses, ranks, _ = two_processes
    steps = STEPS_PER_EPOCH * EPOCHS
    single = np.array(single_losses)  # (steps, 3): step, loss, gradient norm before clipping
    assert single[:, 0].tolist() == list(range(1, steps + 1))
    for rank in ranks:
        assert rank["codes"]["train"] == 0
        distributed = np.array(rank["losses"]["train"])
        assert distributed[:, 0].tolist() == single[:, 0].tolist()
        # Step 1 starts from the same weights: only the float summation order differs (each process's half-batch
        # forward, 2 gradients summed), ~1e-7 relative in fp32. A mean over the processes instead of the sum
        # would halve the gradient norm.
        np.testing.assert_allclose(distributed[0, 1:], single[0, 1:], rtol=1e-5)
        # Later steps: Adam divides each gradient by its own running size, so summation noise (~1e-10) on a
        # weight whose exact gradient is 0 becomes an update of up to lr * 1e-10 / eps(1e-8) = 1e-2 lr: the
        # weights drift apart by ~1e-5 (measured 1.3e-5 after 3 steps) and the losses by ~3e-6 relative.
        np.testing.assert_allclose(distributed[:, 1:], single[:, 1:], rtol=1e-3, atol=1e-6)
    assert ranks[0]["losses"]["train"] == ranks[1]["losses"]["train"]  # the same global batch's loss, bit for bit
    one, two = model_weights(folder / "single_run" / "last.pt"), model_weights(folder / "ddp_run" / "last.pt")
    assert one.keys() == two.keys()
    # 1e-4: a third of lr (3e-4); one step in a wrong direction moves a weight by up to 2 lr.
    assert max(float((one[name] - two[name]).abs().max()) for name in one) < 1e-4


def test_distributed_eval_writes_the_single_process_report_and_embeddings(two_processes):
    folder, _, ranks, _ = two_processes
    assert [rank["codes"]["eval"] for rank in ranks] == [0, 0]
    one = json.loads((folder / "single_eval" / "report.json").read_text())
    two = json.loads((folder / "ddp_eval" / "report.json").read_text())
    timings = {key for key in one if key.startswith("seconds_")}
    assert {k: v for k, v in one.items() if k not in timings} == {k: v for k, v in two.items() if k not in timings}
    assert one["num_items"] == 16
    np.testing.assert_array_equal(np.load(folder / "single_eval" / "report_test_embeddings.npy"),
                                  np.load(folder / "ddp_eval" / "report_test_embeddings.npy"))
    np.testing.assert_array_equal(np.load(folder / "single_eval" / "report_test_labels.npy"),
                                  np.load(folder / "ddp_eval" / "report_test_labels.npy"))
    assert (folder / "single_eval" / "report_test_paths.txt").read_text() == \
        (folder / "ddp_eval" / "report_test_paths.txt").read_text()


def test_sigterm_to_one_rank_stops_every_rank_after_one_step_and_resume_continues(two_processes):
    folder, _, ranks, printed = two_processes
    from errors import EXIT_INTERRUPTED

    assert [rank["codes"]["stopped"] for rank in ranks] == [EXIT_INTERRUPTED, EXIT_INTERRUPTED]
    # Rank 1 was signalled during step 2; rank 0 was not, and still stopped after the same step.
    assert [[step for step, *_ in rank["losses"]["stopped"]] for rank in ranks] == [[1, 2], [1, 2]]
    # rank 1 names its own signal; rank 0 that another process had one
    assert "interrupted: stopped by SIGTERM after epoch 1, batch 2, step 2" in printed
    assert "interrupted: stopped by a stop signal to another process after epoch 1, batch 2, step 2" in printed
    assert ranks[0]["stopped_checkpoint"] == {"global_step": 2, "batches_done_in_epoch": 2, "epoch": 0}
    assert [rank["codes"]["resumed"] for rank in ranks] == [0, 0]
    total = STEPS_PER_EPOCH * EPOCHS
    assert [[step for step, *_ in rank["losses"]["resumed"]] for rank in ranks] == [list(range(3, total + 1))] * 2
    # The resumed run is the uninterrupted one: same losses, same weights.
    assert ranks[0]["losses"]["stopped"] + ranks[0]["losses"]["resumed"] == ranks[0]["losses"]["train"]
    resumed, uninterrupted = model_weights(folder / "stop_run" / "last.pt"), model_weights(folder / "ddp_run" / "last.pt")
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
    assert not (folder / "stop_run" / "interrupted.txt").exists()  # the finished resume cleared the marker


def test_a_run_stopped_under_two_processes_resumes_in_one(two_processes):
    """The plan and the position in it are global: another number of processes continues the same batches."""
    import main

    folder, single_losses, _, _ = two_processes
    losses: list = []
    printed = io.StringIO()
    with deterministic_draws(losses), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main.main(["--mode", "train", "--config", str(DEMO_CONFIG), "--resume",
                          *overrides(folder / "demo_data", folder / "stop_run_for_one")])
    assert code == 0, printed.getvalue()[-3000:]
    assert [step for step, *_ in losses] == [3]
    np.testing.assert_allclose(losses[0][1:], single_losses[2][1:], rtol=1e-3, atol=1e-6)  # tolerance: see above
    resumed, single = model_weights(folder / "stop_run_for_one" / "last.pt"), model_weights(folder / "single_run" / "last.pt")
    assert max(float((resumed[name] - single[name]).abs().max()) for name in single) < 1e-4


def test_a_share_with_no_readable_image_makes_every_rank_skip_that_step(two_processes):
    """Rank 1's share of step 2 is all unreadable: both ranks skip the step together (no rank waits in a
    collective the other never joins), finish the run, and train the same steps."""
    folder, _, ranks, _ = two_processes
    assert [rank["codes"]["empty_share"] for rank in ranks] == [0, 0]
    steps = [[step for step, _, _ in rank["losses"]["empty_share"]] for rank in ranks]
    assert steps[0] == steps[1] == list(range(1, STEPS_PER_EPOCH * EPOCHS))  # one step fewer: 3 batches, 2 steps
    assert torch.load(folder / "empty_share_run" / "last.pt", map_location="cpu",
                      weights_only=True)["global_step"] == STEPS_PER_EPOCH * EPOCHS - 1


def test_a_global_batch_that_does_not_split_over_the_processes_stops_the_run_in_one_line():
    from types import SimpleNamespace

    from dataloaders.loaders import training_loader
    from errors import UsageError

    image_list = type("Listed", (), {"labels": np.repeat(np.arange(6), 4), "__len__": lambda self: 24})()
    data = SimpleNamespace(sampler="pk", classes_per_batch=3, images_per_class=2, triplets_per_batch=1)
    with pytest.raises(UsageError, match=r"data.classes_per_batch .*= 3 does not split evenly over 2 processes"):
        training_loader(image_list, data, 0, torch.device("cpu"), rank=1, world_size=2)


@contextlib.contextmanager
def rank_1_reads_nothing_in_step_2():
    """Rank 1's whole share of the second training batch comes out unreadable (as data.on_bad_image=skip leaves
    a share whose every image is damaged): the loader gives no images for it."""
    import torch.distributed as dist

    from dataloaders import loaders

    collate, batches = loaders.collate_skipping_bad_images, []

    def collate_training_batches(items):
        images, labels, indices, skipped = collate(items)
        batches.append(len(items))
        if dist.get_rank() == 1 and len(batches) == 2:
            return None, labels[:0], indices[:0], []
        return images, labels, indices, skipped

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loaders, "collate_skipping_bad_images", collate_training_batches)
        yield


def run_scenario(folder: Path, data_root: Path) -> None:
    """One rank of the torchrun launch: train, evaluate, train again until SIGTERM to rank 1, resume."""
    import torch.distributed as dist

    import main

    dist.init_process_group("gloo")  # once: each main() below finds it set up, as under launched_processes
    rank = dist.get_rank()
    stop_rank = os.environ.pop("STOP_RANK", "")
    losses, codes, report = {}, {}, {}
    for phase, arguments in (
            ("train", ["--mode", "train", *overrides(data_root, folder / "ddp_run")]),
            ("eval", ["--mode", "eval", "--checkpoint", str(folder / "ddp_run" / "best.pt"),
                      "--output", str(folder / "ddp_eval" / "report.json"), *overrides(data_root, folder / "ddp_run")]),
            ("stopped", ["--mode", "train", *overrides(data_root, folder / "stop_run")]),
            ("resumed", ["--mode", "train", "--resume", *overrides(data_root, folder / "stop_run")]),
            ("empty_share", ["--mode", "train", *overrides(data_root, folder / "empty_share_run")])):
        losses[phase] = []
        os.environ["STOP_RANK"] = stop_rank if phase == "stopped" else ""
        with deterministic_draws(losses[phase]), (rank_1_reads_nothing_in_step_2() if phase == "empty_share"
                                                  else contextlib.nullcontext()):
            codes[phase] = main.main(["--config", str(DEMO_CONFIG), *arguments])
        if phase == "stopped" and rank == 0:
            saved = torch.load(folder / "stop_run" / "last.pt", map_location="cpu", weights_only=True)
            report["stopped_checkpoint"] = {key: saved[key] for key in ("global_step", "batches_done_in_epoch", "epoch")}
            shutil.copytree(folder / "stop_run", folder / "stop_run_for_one")  # resumed by one process, in the test
    (folder / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "codes": codes, **report}))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_scenario(Path(sys.argv[1]), Path(sys.argv[2]))
