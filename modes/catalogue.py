"""`--mode index | search | add | remove | export`: the catalogue package (catalogue/) from the command line.

    index   embed a catalogue with a checkpoint (or take saved eval outputs) into an index folder
    search  query images -> JSON lines on stdout: query, rank, id, path, label, score
    add     image files (or a list) into an index; content already there is refused
    remove  items by id
    export  a checkpoint as a Hugging Face style folder with a model card
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from errors import UsageError

SEARCH_OVERRIDES = {"index.nprobe": "nprobe", "index.hnsw_ef_search": "hnsw_ef_search"}


def index_folder(arguments) -> Path:
    if not arguments.index:
        raise UsageError(f"--mode {arguments.mode} needs --index DIR")
    return Path(arguments.index)


def device_name(config) -> str:
    from runtime import select_device

    return str(select_device(config.eval.device, "eval.device"))


def open_catalogue(config, arguments):
    from catalogue import Catalogue

    search_parameters = {name: getattr(config.index, key.split(".")[1]) for key, name in SEARCH_OVERRIDES.items()
                         if config.is_explicit(key)}
    return Catalogue.load(index_folder(arguments), checkpoint=arguments.checkpoint, device=device_name(config),
                          search_parameters=search_parameters, attention=config.model.attention,
                          max_image_bytes=config.data.max_image_bytes)


def run_index(config, arguments) -> None:
    from catalogue.build import build_from_eval_outputs, build_from_images, partial_folder
    from catalogue.index_types import index_parameters
    from catalogue.sources import images_to_index
    from modes.data import stopped_by_signals
    from modes.evaluate import checkpoint_path

    target = index_folder(arguments)
    if arguments.checkpoint == "none":
        raise UsageError("--mode index needs a trained checkpoint (the index records its weights hash), not none")
    parameters = index_parameters(config.index)
    common = dict(index_type=config.index.type, parameters=parameters, device=device_name(config),
                  precision=config.eval.precision, attention=config.model.attention)
    if arguments.from_eval:
        from dataloaders.loaders import resolve_image_lists
        from modes.evaluate import output_place

        run_dir = Path(arguments.from_eval)
        checkpoint = checkpoint_path(config, arguments.checkpoint or str(run_dir / "best.pt"))
        prefix = output_place(run_dir, arguments.checkpoint, None)[1]
        image_root = resolve_image_lists(config.data, config.train.seed, need_train=False, need_test=True)[2].root
        manifest = build_from_eval_outputs(target, run_dir, prefix, image_root, checkpoint, **common)
    else:
        checkpoint = checkpoint_path(config, arguments.checkpoint)
        image_list = images_to_index(arguments.images, arguments.list, config)
        with stopped_by_signals("index build", f"the chunks embedded so far stay in {partial_folder(target)}: run the "
                                               f"same command again to continue"):
            manifest = build_from_images(target, image_list, checkpoint, data_config=config.data,
                                         batch_size=config.eval.batch_size, **common)
    print(f"index written to {target}: {manifest['count']} items, {manifest['embedding_dim']}-d, "
          f"{manifest['index']['type']} ({manifest['index']['factory']})")


def run_search(config, arguments) -> None:
    if not arguments.query:
        raise UsageError("--mode search needs --query IMAGE [IMAGE ...]")
    catalogue = open_catalogue(config, arguments)
    results = catalogue.search([Path(query) for query in arguments.query], arguments.top_k)
    for query, rows in zip(arguments.query, results):
        for row in rows:
            print(json.dumps({"query": query, "rank": row["rank"], "id": row["id"], "path": row["path"],
                              "label": row["label"], "score": round(row["score"], 6)}))
    if arguments.visualize:
        from catalogue.pictures import search_grid

        picture = search_grid(arguments.query, [rows[:arguments.visualize] for rows in results],
                              arguments.output or Path("search_results.png"))
        print(f"picture written to {picture}", file=sys.stderr)


def run_add(config, arguments) -> None:
    from catalogue.sources import read_list_file, unlabelled

    if arguments.images and any(Path(image).is_dir() for image in arguments.images):
        raise UsageError("--mode add takes image files (--images A.jpg B.jpg) or --list FILE, not folders")
    if bool(arguments.images) == bool(arguments.list):
        raise UsageError("--mode add needs --images IMAGE [IMAGE ...] or --list FILE")
    image_list = read_list_file(Path(arguments.list)) if arguments.list else unlabelled(arguments.images)
    catalogue = open_catalogue(config, arguments)
    outcome = catalogue.add([image_list.root / path for path in image_list.paths],
                            [None if label < 0 else int(label) for label in image_list.labels.tolist()])
    for duplicate in outcome["duplicates"]:
        print(f"refused {duplicate['path']}: the same content as item {duplicate['same_as']}", file=sys.stderr)
    for item in outcome["added"]:
        print(json.dumps(item))
    print(f"added {len(outcome['added'])}, refused {len(outcome['duplicates'])} duplicates; {arguments.index} "
          f"holds {len(catalogue)} items", file=sys.stderr)


def run_remove(config, arguments) -> None:
    from catalogue import Catalogue

    if not arguments.ids:
        raise UsageError("--mode remove needs --ids ID [ID ...]")
    catalogue = Catalogue.load(index_folder(arguments))
    removed = catalogue.remove(arguments.ids)
    print(f"removed {len(removed)} items; {arguments.index} holds {len(catalogue)}", file=sys.stderr)


def run_export(config, arguments) -> None:
    from catalogue.export import export_checkpoint
    from modes.evaluate import checkpoint_path

    if not arguments.output:
        raise UsageError("--mode export needs --output DIR")
    folder = export_checkpoint(checkpoint_path(config, arguments.checkpoint), arguments.output)
    print(f"model exported to {folder} (model card: {folder / 'README.md'})")
