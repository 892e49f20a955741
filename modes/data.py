"""The data modes: `--mode check` (every image of every split) and `--mode cache` (a downsized copy),
and the same check run by training before it builds a model."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dataloaders.checks import check_image_lists, format_check_report
from dataloaders.loaders import has_test_split, resolve_image_lists, worker_count
from errors import DataCheckFailed, Interrupted, UsageError
from evaluation import write_report
from run_folder import prepare_output_dir


class _StopSignal(BaseException):
    """Raised by the handler: a BaseException, so no `except Exception` around a decoder takes it for a bad image."""


@contextmanager
def stopped_by_signals(what: str, outcome: str) -> Iterator[None]:
    """SIGTERM/SIGINT inside the block raise `Interrupted("<what> stopped by SIGTERM; <outcome>")` (exit code 3).

    The exception unwinds through the code that started worker processes or temporary files, which stops
    and removes them on its way out (`map_in_worker_processes`, `build_cache`); a second signal during
    that clean-up is ignored, so the clean-up finishes. Outside the main thread, signals are left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received, previous = [], {}

    def stop(signum, frame):
        if not received:
            received.append(signal.Signals(signum).name)
            raise _StopSignal

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, stop)
        yield
    except _StopSignal:
        raise Interrupted(f"{what} stopped by {received[0]}; {outcome}") from None
    finally:
        received.append(None)  # a signal from here on is ignored, not raised outside the block
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_check(config) -> dict:
    """Open and decode every image of every split; report counts, class sizes and every bad item."""
    train, validation, test = resolve_image_lists(config.data, config.train.seed, need_train=True,
                                                  need_test=has_test_split(config.data))
    splits = {name: image_list for name, image_list in (("train", train), ("validation", validation), ("test", test))
              if image_list is not None and len(image_list) > 0}
    run_dir = prepare_output_dir(Path(config.output.dir))
    with stopped_by_signals("data check", "no report written"):
        report = check_image_lists(splits, workers=max(1, worker_count(config.data.num_workers)),
                                   allow_outside_root=config.data.allow_outside_root,
                                   max_image_bytes=config.data.max_image_bytes)
    print(format_check_report(report))
    report_path = run_dir / "data_check.json"
    write_report(report, report_path)
    print(f"report written to {report_path}")
    return report


def run_cache(config) -> dict:
    """Build data.cache_dir: every train and test image once, short side = the evaluation resize."""
    from dataloaders.cache import build_cache
    from dataloaders.transforms import eval_resize_size

    if not config.data.cache_dir:
        raise UsageError("set data.cache_dir=FOLDER to say where the cache goes")
    lists = [image_list for image_list in resolve_image_lists(config.data, config.train.seed, need_train=True,
                                                              need_test=has_test_split(config.data),
                                                              ignore_cache=True)
             if image_list is not None]
    short_side = eval_resize_size(config.data.image_size)
    started = time.perf_counter()
    with stopped_by_signals("cache build", "the images written so far are kept for the next --mode cache, "
                                           "and the cache is not marked complete"):
        summary = build_cache(lists, Path(config.data.cache_dir), short_side,
                              workers=worker_count(config.data.num_workers),
                              allow_outside_root=config.data.allow_outside_root,
                              max_image_bytes=config.data.max_image_bytes)
    print(f"cache {config.data.cache_dir}: {summary['written']} images written, {summary['reused']} reused, "
          f"{len(summary['failed'])} failed, short side {short_side} px, {time.perf_counter() - started:.1f} s")
    if summary["failed"]:
        for message in summary["failed"][:20]:
            print(f"  {message}", file=sys.stderr)
        raise UsageError(f"{len(summary['failed'])} images could not be cached (listed above); "
                         f"the cache is not marked complete")
    return summary


def check_before_training(data, splits: dict, run_dir: Path, skip_log) -> dict:
    """Before training: check every train/validation image (data.startup_check), so damage shows now, not in hour three.

    Bad images stop the run (data.on_bad_image=error: DataCheckFailed, each named in data_check.json) or
    are left out of the lists and recorded in the skip log (skip). Returns the splits, without the bad
    images when skipping.
    """
    mode = data.startup_check
    if mode == "none":
        return splits
    started = time.perf_counter()
    checked = {name: image_list for name, image_list in splits.items() if len(image_list) > 0}
    with stopped_by_signals("data check before training", "nothing trained"):
        report = check_image_lists(checked, workers=max(1, worker_count(data.num_workers)), decode=mode == "full",
                                   allow_outside_root=data.allow_outside_root, max_image_bytes=data.max_image_bytes)
    total = sum(len(image_list) for image_list in checked.values())
    print(f"data check ({'every image decoded' if mode == 'full' else 'headers only'}; data.startup_check={mode}): "
          f"{total} images, {report['num_bad_images']} bad, {time.perf_counter() - started:.1f} s")
    if report["ok"]:
        return splits
    write_report(report, run_dir / "data_check.json")
    bad = [(name, item) for name, split in report["splits"].items() for item in split["bad_images"]]
    if data.on_bad_image == "error":
        name, first = bad[0]
        raise DataCheckFailed(f"{len(bad)} unreadable image(s) in the training data, first: "
                              f"{Path(report['splits'][name]['root']) / first['path']}: {first['reason']}; all listed "
                              f"in {run_dir / 'data_check.json'}. Fix or remove them, or set data.on_bad_image=skip")
    kept_splits = {}
    for name, image_list in splits.items():
        bad_by_path = {item["path"]: item for item in report["splits"].get(name, {}).get("bad_images", [])}
        skipped = [(index, bad_by_path[path]["reason"], bad_by_path[path]["detail"])
                   for index, path in enumerate(image_list.paths) if path in bad_by_path]
        skip_log.record(name, image_list, skipped, "startup check")
        keep = np.ones(len(image_list), dtype=bool)
        keep[[index for index, _, _ in skipped]] = False
        kept_splits[name] = image_list.subset(np.flatnonzero(keep))
    print(f"warning: skipping {len(bad)} unreadable image(s) (data.on_bad_image=skip), listed in {skip_log.path}")
    return kept_splits


def run_check_from_arguments(config, arguments) -> int:
    return 0 if run_check(config)["ok"] else 1


def run_cache_from_arguments(config, arguments) -> None:
    run_cache(config)
