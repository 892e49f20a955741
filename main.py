"""Command line: parse the arguments, resolve the configuration once, and hand over to one mode (modes/).

    python main.py --mode train [--config FILE] [--resume | --overwrite] [key=value ...]
    python main.py --mode eval  [--config FILE] [--checkpoint PATH|none] [--output FILE] [--visualize N] [key=value ...]
    python main.py --mode eval  --embeddings E.npy --labels L.npy [--output report.json] [key=value ...]
    python main.py --mode demo  [key=value ...]
    python main.py --mode cache [--config FILE] data.cache_dir=FOLDER [key=value ...]
    python main.py --mode check [--config FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError, exit_code_and_message  # noqa: F401 (EXIT_* for callers)

REPO_ROOT = Path(__file__).resolve().parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
MODES = {
    "train": "fine-tune on the training classes; best.pt is chosen on held-out validation classes",
    "eval": "embed the test split with a checkpoint and report Recall@k, MAP@R, R-Precision and MRR",
    "demo": "generate a small dataset, train the tiny model on the CPU, evaluate it untrained and trained",
    "check": "open and decode every listed image and report what is broken, before a long run",
    "cache": "write a downsized copy of every image to data.cache_dir, for faster loading",
}


def build_parser() -> argparse.ArgumentParser:
    modes = "\n".join(f"  {name:<6} {purpose}" for name, purpose in MODES.items())
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
                        help="eval: checkpoint to evaluate (default: best.pt in output.dir); 'none' = backbone as loaded")
    parser.add_argument("--embeddings", type=Path, help="eval: precomputed (N, D) float .npy; no model, no images")
    parser.add_argument("--labels", type=Path, help="eval: (N,) integer .npy labels for --embeddings")
    parser.add_argument("--output", type=Path, help="eval: where to write the report JSON (default: output.dir/report.json)")
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="eval: also draw N test queries (picked by train.seed) with their top results")
    parser.add_argument("--resume", action="store_true", help="train: continue from last.pt in output.dir")
    parser.add_argument("--overwrite", action="store_true", help="train: start afresh even if output.dir holds a run")
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
    return arguments


def resolve_config(arguments: argparse.Namespace):
    """Defaults <- --config file <- overrides. Evaluation without --config starts from the run's own config.yaml."""
    from config import load_config

    config_path = arguments.config or (DEMO_CONFIG if arguments.mode == "demo" else None)
    config = load_config(config_path, arguments.overrides)
    if arguments.mode == "eval" and arguments.config is None and not arguments.embeddings:
        checkpoint = arguments.checkpoint
        run_dir = Path(checkpoint).parent if checkpoint and checkpoint != "none" else Path(config.output.dir)
        if (run_dir / "config.yaml").is_file():
            config = load_config(run_dir / "config.yaml", arguments.overrides, file_is_explicit=False)
    return config


def run_mode(arguments: argparse.Namespace, config) -> int:
    if arguments.mode == "train":
        from modes.train import run_train

        run_train(config, arguments.resume, arguments.overwrite)
    elif arguments.mode == "demo":
        from modes.demo import run_demo

        run_demo(config)
    elif arguments.mode == "cache":
        from modes.data import run_cache

        run_cache(config)
    elif arguments.mode == "check":
        from modes.data import run_check

        return 0 if run_check(config)["ok"] else 1
    elif arguments.embeddings or arguments.labels:
        from modes.evaluate import run_eval_embeddings

        if not (arguments.embeddings and arguments.labels):
            raise UsageError("--embeddings and --labels go together")
        run_eval_embeddings(config, arguments.embeddings, arguments.labels, arguments.output, arguments.visualize)
    else:
        from modes.evaluate import run_eval

        run_eval(config, arguments.checkpoint, arguments.output, arguments.visualize)
    return 0


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
