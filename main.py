"""Command line: parse the arguments, resolve the configuration once, and hand over to one mode (modes/).

`python main.py --help` lists the modes (MODES below); the README's "Command line" shows each with its options.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from pathlib import Path

from errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, exit_code_and_message  # noqa: F401 (EXIT_* for callers)

REPO_ROOT = Path(__file__).resolve().parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
# mode: (what it does, "module:function" called with (config, arguments); it returns the exit code or None for 0)
MODES = {
    "train": ("fine-tune on the training classes; best.pt is chosen on held-out validation classes",
              "modes.train:run_from_arguments"),
    "eval": ("embed the test split with a checkpoint and report Recall@k, MAP@R, R-Precision and MRR",
             "modes.evaluate:run_from_arguments"),
    "demo": ("generate a small dataset, train the tiny model on the CPU, evaluate it untrained and trained",
             "modes.demo:run_from_arguments"),
    "check": ("open and decode every listed image and report what is broken, before a long run",
              "modes.data:run_check_from_arguments"),
    "cache": ("write a downsized copy of every image to data.cache_dir, for faster loading",
              "modes.data:run_cache_from_arguments"),
    "tune": ("search config keys with Optuna (key=low:high[:log], key=[a,b]) for the best validation Recall@1",
             "modes.tune:run_from_arguments"),
    "index": ("embed a catalogue (or saved eval outputs) with a checkpoint into a searchable index folder",
              "modes.catalogue:run_index"),
    "search": ("find the indexed images nearest to query images: JSON lines on stdout", "modes.catalogue:run_search"),
    "add": ("add image files to an index; content already there is refused", "modes.catalogue:run_add"),
    "remove": ("remove items from an index by id", "modes.catalogue:run_remove"),
    "export": ("write a checkpoint as a Hugging Face style folder with a model card", "modes.catalogue:run_export"),
    "serve": ("serve an index over HTTP: a search page at /, POST /search with an image, JSON results",
              "catalogue.service:run_from_arguments"),
}
OVERRIDE = re.compile(r"[a-z_]+\.[a-z0-9_]+=.*")  # section.key=value


def build_parser() -> argparse.ArgumentParser:
    modes = "\n".join(f"  {name:<7} {purpose}" for name, (purpose, _) in MODES.items())
    parser = argparse.ArgumentParser(
        description="Fine-tune and evaluate a Swinv2 image-retrieval model (deep metric learning).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"modes:\n{modes}\n\nConfiguration: section.key=value pairs, anywhere on the line, override the "
               f"--config file,\ne.g. train.epochs=3 data.root=/data/sop. Every key, its default and meaning: "
               f"docs/configuration.md",
    )
    parser.add_argument("--mode", required=True, choices=tuple(MODES), help="what to do (see 'modes' below)")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: built-in SOP defaults; demo: configs/demo.yaml; eval: the run "
                             "folder's config.yaml when there is one)")
    parser.add_argument("--checkpoint", default=None,
                        help="eval, index, export: checkpoint (default: best.pt in output.dir); eval: 'none' = backbone "
                             "as loaded; search, add: a copy of the index's checkpoint")
    parser.add_argument("--embeddings", type=Path, help="eval: precomputed (N, D) float .npy; no model, no images")
    parser.add_argument("--labels", type=Path, help="eval: (N,) integer .npy labels for --embeddings")
    parser.add_argument("--output", type=Path, help="eval: the report JSON (default: output.dir/report.json); "
                                                    "search: the --visualize picture; export: the folder")
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="eval: also draw N test queries (picked by train.seed) with their top results; "
                             "search: draw each query with its first N results")
    parser.add_argument("--index", type=Path, metavar="DIR", help="index, search, add, remove: the index folder")
    parser.add_argument("--images", nargs="+", metavar="IMG", help="index, add: image files (index: or a class tree)")
    parser.add_argument("--list", type=Path, metavar="FILE", help="index, add: a SOP list or a file of image paths")
    parser.add_argument("--from-eval", type=Path, metavar="RUN_DIR", help="index: a run's saved test embeddings")
    parser.add_argument("--query", nargs="+", metavar="IMG", help="search: query images")
    parser.add_argument("--top-k", type=int, default=10, metavar="K", help="search: results per query (default 10)")
    parser.add_argument("--ids", nargs="+", type=int, metavar="ID", help="remove: item ids")
    parser.add_argument("--host", default="127.0.0.1", help="serve: address to listen on (default 127.0.0.1: this "
                                                             "machine only; the page has no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="serve: port (default 8000)")
    parser.add_argument("--resume", action="store_true", help="train: continue from last.pt in output.dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="train, tune: start afresh even if output.dir holds a run (or a search)")
    parser.add_argument("--init-from", type=Path, metavar="CKPT",
                        help="train: start a new run from this checkpoint's model weights (new optimiser, schedule "
                             "and classes; not a resume)")
    parser.add_argument("--trials", type=int, default=20, metavar="N", help="tune: number of training runs (default 20)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and the search's log lines")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def unknown_option_hint(option: str, value: str | None) -> str:
    """'--epochs' -> 'write train.epochs=VALUE': options are few, configuration keys are many."""
    from config import DEFAULTS

    name = option.lstrip("-").split("=", 1)[0].replace("-", "_")
    keys = [f"{section}.{key}" for section, entries in DEFAULTS.items() for key in entries if key == name]
    if not keys:
        return "see --help; configuration keys are set as section.key=value (docs/configuration.md)"
    value = option.split("=", 1)[1] if "=" in option else (value or "VALUE")
    return f"configuration keys are set as section.key=value: write {' or '.join(f'{k}={value}' for k in keys)}"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Options and section.key=value overrides in any order."""
    parser = build_parser()
    arguments, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        position = argv.index(unknown[0])
        following = argv[position + 1] if position + 1 < len(argv) else None
        value = following if following is not None and not following.startswith("-") and "=" not in following else None
        parser.error(f"unrecognized option {unknown[0]}: {unknown_option_hint(unknown[0], value)}")
    for name in ("images", "query"):  # a list option takes the overrides after it too: give them back
        values = getattr(arguments, name) or []
        arguments.overrides += [value for value in values if OVERRIDE.fullmatch(value)]
        setattr(arguments, name, [value for value in values if not OVERRIDE.fullmatch(value)] or None)
    return arguments


def resolve_config(arguments: argparse.Namespace):
    """Defaults <- --config file <- overrides. Evaluation without --config starts from the run's own config.yaml."""
    from config import load_config

    config_path = arguments.config or (DEMO_CONFIG if arguments.mode == "demo" else None)
    overrides = arguments.overrides
    if arguments.mode == "tune":  # key=low:high and key=[a,b] are the search space, not values
        from modes.tune import split_search_space

        overrides = split_search_space(overrides)[0]
    config = load_config(config_path, overrides)
    if arguments.mode in ("eval", "index") and arguments.config is None and not arguments.embeddings:
        checkpoint = arguments.checkpoint
        run_dir = (Path(checkpoint).parent if checkpoint and checkpoint != "none"
                   else Path(arguments.from_eval or config.output.dir))
        if (run_dir / "config.yaml").is_file():
            config = load_config(run_dir / "config.yaml", arguments.overrides, file_is_explicit=False)
    return config


def run_mode(arguments: argparse.Namespace, config) -> int:
    module_name, function_name = MODES[arguments.mode][1].split(":")
    return getattr(importlib.import_module(module_name), function_name)(config, arguments) or 0


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    # The search and loaders log their choices at INFO: useful when debugging, noise in a normal run.
    logging.basicConfig(level=logging.INFO if arguments.debug else logging.WARNING, format="%(name)s: %(message)s",
                        force=True)
    try:
        return run_mode(arguments, resolve_config(arguments))
    except Exception as error:
        known = exit_code_and_message(error)
        if arguments.debug or known is None:
            raise
        code, message = known
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
