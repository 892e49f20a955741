"""`--mode eval`: embed the test split with a checkpoint (or the backbone as loaded), search, score, report.

Also `--mode eval --embeddings E.npy --labels L.npy`: the metrics of saved embeddings, no model, no images.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from errors import UsageError

GRID_NEIGHBOURS = 8  # results per query in the --visualize grid


def run_from_arguments(config, arguments) -> None:
    if arguments.embeddings or arguments.labels:
        if not (arguments.embeddings and arguments.labels):
            raise UsageError("--embeddings and --labels go together")
        run_eval_embeddings(config, arguments.embeddings, arguments.labels, arguments.output, arguments.visualize)
    else:
        from distributed import launched_processes

        with launched_processes(config.eval.device) as processes:  # one, or those torchrun started
            run_eval(config, arguments.checkpoint, arguments.output, arguments.visualize, processes)


def ks_that_fit(config, num_items: int, what: str) -> tuple[list[int], list[int]]:
    """(recall ks, mAP ks) for a set of `num_items`: a query's gallery holds the other num_items - 1.

    A k the user asked for (in the YAML file or an override) that does not fit is an error, raised
    before any heavy work; a default k that does not fit is left out with one warning line.
    """
    gallery = num_items - 1
    fitting = {}
    for key in ("recall_ks", "map_ks"):
        requested = list(getattr(config.eval, key))
        too_large = [k for k in requested if k > gallery]
        if too_large and config.is_explicit(f"eval.{key}"):
            fits = ",".join(str(k) for k in requested if k <= gallery) or "1"
            raise UsageError(f"eval.{key} asks for k = {max(too_large)}, but the {what} has {num_items} images, "
                             f"so each query's gallery holds {gallery}: use k <= {gallery}, e.g. eval.{key}=[{fits}]")
        fitting[key] = [k for k in requested if k <= gallery]
        if too_large:
            print(f"note: the {what} has {num_items} images; leaving out the default k = "
                  f"{', '.join(map(str, too_large))} of eval.{key} (each query's gallery holds {gallery})")
    return fitting["recall_ks"] or [1], fitting["map_ks"]


def embedding_cuda_graph(cuda_graph: bool, compiled: bool) -> bool:
    """eval.cuda_graph, except for a compiled backbone: its forward is a few fused kernels already, and
    capturing it would mix torch.compile's own machinery into the capture."""
    return cuda_graph and not compiled


def checkpoint_path(config, checkpoint_arg: str | None) -> Path:
    path = Path(checkpoint_arg) if checkpoint_arg else Path(config.output.dir) / "best.pt"
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' does not exist (train first, or pass --checkpoint PATH or none)")
    return path


def config_of_checkpoint(config, checkpoint: dict, path: Path, purpose: str = "evaluate the checkpoint as trained"):
    """The configuration with the model-defining keys the checkpoint was trained with.

    The checkpoint decides its own model: a key set explicitly to another value is refused, one left
    at its default (or taken from another run's config) quietly follows the checkpoint.
    """
    from config import MODEL_DEFINING_KEYS

    saved = checkpoint["config"]
    values = {}
    for key in MODEL_DEFINING_KEYS:
        section, name = key.split(".")
        value = saved[section][name]
        if value != getattr(getattr(config, section), name) and config.is_explicit(key):
            raise UsageError(f"{key}={getattr(getattr(config, section), name)!r} was asked for, but checkpoint {path} "
                             f"was trained with {value!r}: leave {key} out to {purpose}")
        values[key] = value
    return config.updated(values)


def checkpoint_to_evaluate(config, checkpoint_arg: str | None):
    """(config with the checkpoint's model keys, checkpoint dict or None for `none`, description)."""
    from checkpoint import load_checkpoint

    if checkpoint_arg == "none":
        return config, None, f"{config.model.backbone} (not fine-tuned)"
    path = checkpoint_path(config, checkpoint_arg)
    checkpoint = load_checkpoint(path)
    return config_of_checkpoint(config, checkpoint, path), checkpoint, f"{path} (epoch {checkpoint['epoch']})"


def model_to_evaluate(config, checkpoint: dict | None):
    """The checkpoint's model, or for `none` the backbone as loaded (pretrained or random init); on the CPU."""
    from checkpoint import embedder_from_checkpoint
    from model import build_embedder
    from runtime import seed_everything

    if checkpoint is not None:
        return embedder_from_checkpoint(checkpoint)
    seed_everything(config.train.seed)  # `tiny` then starts from the same random weights as training did
    return build_embedder(config.model.backbone, config.data.image_size, config.model.embedding_dim)


def output_place(run_dir: Path, checkpoint_arg: str | None, output: Path | None) -> tuple[Path, str, Path]:
    """(folder, file-name prefix, report path) for one evaluation's outputs.

    Every file of one evaluation carries its name, so a run folder never holds files of two models under
    names that suggest one: with --output DIR/NAME.json they all go to DIR as NAME_*; otherwise into the run
    folder, unprefixed for its best.pt, `untrained_` for --checkpoint none, `<checkpoint stem>_` for another.
    """
    if output is not None:
        return output.parent, f"{output.stem}_", output
    if checkpoint_arg == "none":
        prefix = "untrained_"
    elif checkpoint_arg is None or Path(checkpoint_arg).resolve() == (run_dir / "best.pt").resolve():
        prefix = ""
    else:
        prefix = f"{Path(checkpoint_arg).stem}_"
    return run_dir, prefix, run_dir / f"{prefix}report.json"


def print_report(title: str, report: dict) -> None:
    from evaluation import markdown_table

    print(f"\n{title} ({report['num_queries']} queries)\n")
    print(markdown_table({title: report}))
    print()


def save_pictures(run_dir: Path, prefix: str, title: str, report: dict, embeddings, labels, image_paths,
                  num_queries: int, seed: int, class_names=()) -> list[Path]:
    """The Recall@k curve and, when num_queries > 0, a grid of that many queries with their top results.

    (Training draws the validation curve: it has the whole history.)
    """
    from retrieval import query_neighbours
    from visualize import choose_queries, plot_recall_curve, retrieval_grid

    pictures = [plot_recall_curve(report, run_dir / f"{prefix}recall_at_k.png", title)]
    if num_queries > 0:
        queries = choose_queries(len(labels), num_queries, seed)
        scores, neighbours = query_neighbours(embeddings, queries, GRID_NEIGHBOURS)
        pictures.append(retrieval_grid(queries, neighbours.numpy(), scores.numpy(), labels.numpy(), image_paths,
                                       run_dir / f"{prefix}retrieval_examples.png", class_names=class_names))
    for picture in pictures:
        print(f"picture written to {picture}")
    return pictures


def read_array(path: Path, option: str):
    """A .npy array, or UsageError in one line: missing, .npz, pickled (object) arrays, unreadable files."""
    import numpy as np

    if not path.is_file():
        raise UsageError(f"{option} '{path}' does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:  # object arrays need pickle, which could run code: never allowed
        raise UsageError(f"{option} '{path}' holds pickled objects ({str(error).splitlines()[0]}); save a numeric "
                         f"array with numpy.save") from None
    except (OSError, EOFError) as error:
        raise UsageError(f"{option} '{path}' is not a readable .npy file ({error})") from None
    if not isinstance(array, np.ndarray):  # np.load gives an NpzFile for .npz archives
        array.close()
        raise UsageError(f"{option} '{path}' is a .npz archive; pass the one .npy array (numpy.save)")
    return array


def unit_embeddings(embeddings):
    """(N, D) numeric array -> float32 unit rows, normalised in float64 whatever the input dtype (float16 values
    of a few hundred overflow a float16 norm); refuses empty, non-numeric and non-finite input in one line."""
    import numpy as np

    if embeddings.ndim != 2 or embeddings.shape[0] < 2 or embeddings.shape[1] < 1:
        raise UsageError(f"--embeddings must be a 2-D (N, D) array with N >= 2 and D >= 1; got shape {embeddings.shape}")
    if embeddings.dtype == np.bool_ or not np.issubdtype(embeddings.dtype, np.number) or np.iscomplexobj(embeddings):
        raise UsageError(f"--embeddings must hold real numbers; got dtype {embeddings.dtype}")
    wide = embeddings.astype(np.float64)
    if not np.isfinite(wide).all():
        raise UsageError(f"--embeddings holds {int((~np.isfinite(wide)).any(axis=1).sum())} rows with NaN or "
                         f"infinite values")
    norms = np.linalg.norm(wide, axis=1, keepdims=True)
    if (norms == 0).any():
        raise UsageError(f"--embeddings holds {int((norms == 0).sum())} all-zero rows, which have no direction")
    return (wide / norms).astype(np.float32)


def run_eval_embeddings(config, embeddings_path: Path, labels_path: Path, output: Path | None,
                        visualize: int = 0) -> dict:
    import numpy as np

    from evaluation import evaluate_embeddings, write_report
    from run_folder import require_writable_file
    from runtime import select_device

    if visualize:
        raise UsageError("--visualize draws the test images: it needs a model evaluation, not --embeddings")
    output = require_writable_file(output or Path(config.output.dir) / "report.json", "--output")
    embeddings = unit_embeddings(read_array(embeddings_path, "--embeddings"))
    labels = read_array(labels_path, "--labels")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(embeddings):
        raise UsageError(f"--labels must be a 1-D integer array of length {len(embeddings)}; "
                         f"got shape {labels.shape}, dtype {labels.dtype}")
    recall_ks, map_ks = ks_that_fit(config, len(labels), "embedding set")
    device = select_device(config.eval.device, "eval.device")
    report = evaluate_embeddings(embeddings, labels.astype(np.int64), recall_ks, config.eval.backend,
                                 str(device), config.eval.memory_gb, map_ks)
    report["source"] = str(embeddings_path)
    write_report(report, output)
    print_report(str(embeddings_path), report)
    print(f"report written to {output}")
    return report


def run_eval(config, checkpoint_arg: str | None, output: Path | None, visualize: int = 0, processes=None) -> dict:
    """Evaluate while holding the folder its outputs go to (see `output_place`); with several processes
    (torchrun), rank 0 holds it and writes, and returns the report ({} on the other ranks)."""
    from contextlib import nullcontext

    from distributed import SINGLE_PROCESS
    from run_folder import require_writable_file, run_folder_lock

    processes = processes or SINGLE_PROCESS
    if output is not None and processes.is_main:
        require_writable_file(output, "--output")
    folder, prefix, report_path = output_place(Path(config.output.dir), checkpoint_arg, output)
    with run_folder_lock(folder, "eval") if processes.is_main else nullcontext():
        return evaluate_test_split(config, checkpoint_arg, folder, prefix, report_path, visualize, processes)


def evaluate_test_split(config, checkpoint_arg: str | None, run_dir: Path, prefix: str, report_path: Path,
                        visualize: int, processes=None) -> dict:
    entered = time.perf_counter()  # before the imports below: on a first call they are much of the setup
    import numpy as np

    from dataloaders import SkippedImageLog, stop_loader_workers
    from dataloaders.loaders import evaluation_loader, resolve_image_lists
    from dataloaders.skipped_images import SKIPPED_IMAGES_FILE
    from distributed import SINGLE_PROCESS, main_process_first, shard_of_batches
    from evaluation import evaluate_embeddings, extract_embeddings, gather_embedded, require_queries, write_report
    from model import apply_speed_options
    from runtime import configure_matmul_precision, select_device
    from tracking import Tracker

    imported = time.perf_counter()
    processes = processes or SINGLE_PROCESS
    device = processes.device(select_device(config.eval.device, "eval.device"))
    config, checkpoint, description = checkpoint_to_evaluate(config, checkpoint_arg)
    with main_process_first():  # rank 0 generates the demo data, if any, before the others read it
        _, _, test_list = resolve_image_lists(config.data, config.train.seed, need_train=False, need_test=True)
    recall_ks, map_ks = ks_that_fit(config, len(test_list), "test split")
    configure_matmul_precision(device, config.train.tf32)
    listed = time.perf_counter()
    model = model_to_evaluate(config, checkpoint)
    del checkpoint  # its weights now live in the model
    apply_speed_options(model, config.model.attention, compile_backbone=config.eval.compile)
    model = model.to(device)  # the device starts here
    # Each process embeds its shard of whole batches; rank 0 gets them all back in list order.
    shard = shard_of_batches(len(test_list), config.eval.batch_size, processes)
    loader = evaluation_loader(test_list, config.data, config.eval.batch_size, device, shard)
    started = time.perf_counter()
    setup_parts = {"imports": imported - entered, "image_list": listed - imported, "model_and_loader": started - listed}
    try:
        embedded = extract_embeddings(model, loader, device, config.eval.precision, "embed test set",
                                      embedding_cuda_graph(config.eval.cuda_graph, config.eval.compile))
    finally:
        stop_loader_workers(loader)
    embedded = gather_embedded(embedded)
    seconds_embed = time.perf_counter() - started
    if not processes.is_main:
        return {}
    # Skipped images (data.on_bad_image=skip) are left out of the gallery and the queries: every row below
    # is one image that was read, and `evaluated` maps the rows back to the test list.
    evaluated = embedded.indices.numpy()
    embeddings, labels = embedded.embeddings, embedded.labels
    skip_log = SkippedImageLog(run_dir / SKIPPED_IMAGES_FILE)
    if embedded.skipped:
        skip_log.record("test", test_list, embedded.skipped, f"{prefix}eval")
    require_queries(embedded, "test", len(test_list), skip_log.path)
    if embedded.skipped:
        beyond_gallery = sorted(k for k in {*recall_ks, *map_ks} if k > len(labels) - 1)
        whole_gallery_note = (f"; k = {', '.join(map(str, beyond_gallery))} now reach past the {len(labels) - 1} "
                              f"other images, so those metrics cover the whole gallery" if beyond_gallery else "")
        print(f"warning: {len(embedded.skipped)} of {len(test_list)} test images could not be read and were left out "
              f"(data.on_bad_image=skip; listed in {skip_log.path}): the metrics cover the other {len(labels)}"
              f"{whole_gallery_note}", file=sys.stderr)
    super_labels = test_list.super_labels[evaluated] if config.data.format != "folder" else None
    report = evaluate_embeddings(embeddings, labels, recall_ks, config.eval.backend, str(device),
                                 config.eval.memory_gb, map_ks, super_labels)
    # seconds_setup: imports, device start, model load, image list; for telling a slow start from a slow loop.
    report.update(seconds_setup=round(started - entered, 3),
                  seconds_setup_parts={part: round(seconds, 3) for part, seconds in setup_parts.items()},
                  seconds_embed=round(seconds_embed, 3),
                  seconds_embed_waiting_for_images=round(embedded.seconds_waiting_for_images, 3),
                  seconds_embed_to_first_batch=round(embedded.seconds_to_first_batch, 3),
                  seconds_embed_on_device=(None if embedded.seconds_on_device is None
                                           else round(embedded.seconds_on_device, 3)),
                  model=description, split="test",
                  num_images_listed=len(test_list), num_images_skipped=len(embedded.skipped))

    # Row i of the embeddings is image i of test_paths.txt: kept together so the index can be served later.
    np.save(run_dir / f"{prefix}test_embeddings.npy", embeddings.numpy())
    np.save(run_dir / f"{prefix}test_labels.npy", labels.numpy())
    evaluated_paths = [test_list.paths[index] for index in evaluated]
    (run_dir / f"{prefix}test_paths.txt").write_text("".join(f"{path}\n" for path in evaluated_paths))
    write_report(report, report_path)
    print_report(f"test: {description}", report)
    print(f"report written to {report_path}")
    pictures = save_pictures(run_dir, prefix, f"test: {description}", report, embeddings, labels,
                             [test_list.root / path for path in evaluated_paths], visualize, config.train.seed,
                             test_list.class_names)
    tracker = Tracker(run_dir, config.wandb.mode, config.wandb.project, config.wandb.entity, config.wandb.run_name,
                      config.to_dict(), job_type="eval")
    scalars = {f"test/{k}": v for k, v in report.items() if isinstance(v, (int, float))}
    tracker.log(scalars, step=0)
    tracker.summary(scalars)
    for picture in pictures:
        tracker.log_image(f"test/{picture.stem}", picture, step=0)
    tracker.finish()
    return report
