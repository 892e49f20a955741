"""`--mode tune`: an Optuna search over configuration keys, maximising validation Recall@1.

    python main.py --mode tune --config configs/demo.yaml --trials 20 \\
        train.lr=1e-5:1e-3:log train.margin=0.05:0.3 train.miner=[all,semihard] train.epochs=8

`key=low:high` (add `:log` for a log scale) searches an int or float key; `key=[a,b,...]` picks among values
of any key that is not itself a list; every other `key=value` fixes the key for all trials. Each trial is a
normal training run in output.dir/trial_NNN. After every epoch its validation Recall@1 goes to Optuna's
median pruner, which stops a trial that is below the median of the earlier trials at the same epoch. The
search writes output.dir/tune_results.csv (a row per trial, written as each ends) and tune_best.png.
"""

from __future__ import annotations

import csv
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from errors import UsageError

RESULTS_FILE = "tune_results.csv"
PLOT_FILE = "tune_best.png"
# low:high or low:high:log; numbers as YAML writes them (1e-5, 0.3, 16)
_INTEGER = re.compile(r"[-+]?[0-9]+")
_UNKNOWN = object()
_NUMBER = r"\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*"
_RANGE = re.compile(rf"{_NUMBER}:{_NUMBER}(?::\s*(log)\s*)?")


@dataclass(frozen=True)
class SearchDimension:
    """One searched key: a numeric range [low, high] (log-uniform if `log`), or `choices`."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if isinstance(self.low, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices:
            return f"{self.key} in {list(self.choices)}"
        return f"{self.key} in [{self.low}, {self.high}]{' (log)' if self.log else ''}"


def split_search_space(overrides: list[str]) -> tuple[list[str], list[SearchDimension]]:
    """(plain `key=value` overrides, searched dimensions) from the command line's section.key=... words.

    Which words are ranges depends only on the key: `low:high[:log]` for an int or float key (integers for
    an int key) or for an entry of a mapping key (`train.loss_params.alpha=1:4`; ints if both ends are), a
    YAML list for a key whose default is not a list. Anything else (unknown keys included) stays an
    override, for the configuration to accept or refuse with its usual message.
    """
    from config import DEFAULTS, parse_override

    fixed, space = [], []
    for text in overrides:
        key, _, raw = text.partition("=")
        key = key.strip()
        section, _, name = key.partition(".")
        mapping, _, entry = name.partition(".")
        default = DEFAULTS.get(section, {}).get(name, _UNKNOWN)
        if default is _UNKNOWN and entry and isinstance(DEFAULTS.get(section, {}).get(mapping), dict):
            default = None  # an entry of a mapping key: a number of either kind, or a choice
        match = _RANGE.fullmatch(raw)
        if match and (default is None or isinstance(default, (int, float)) and not isinstance(default, bool)):
            ends = match.group(1, 2)
            kind = int if (isinstance(default, int) if default is not None else
                           all(_INTEGER.fullmatch(end) for end in ends)) else float
            try:
                low, high = (kind(end) for end in ends)
            except ValueError:
                what = "integers" if kind is int else "numbers"
                raise UsageError(f"{text}: write the range of {key} as two {what}, low:high[:log]") from None
            space.append(SearchDimension(key, low, high, log=match[3] == "log"))
        elif default is not _UNKNOWN and not isinstance(default, list) and isinstance(parse_override(text)[1], list):
            space.append(SearchDimension(key, choices=tuple(parse_override(text)[1])))
        else:
            fixed.append(text)
    return fixed, space


def check_search_space(config, space: list[SearchDimension]) -> None:
    """Refuse, before any training, a range or choice that no trial could run with (a one-line message)."""
    from config import ConfigError
    from objective import resolve_objective_config

    if not space:
        raise UsageError("--mode tune needs at least one key to search: key=low:high[:log] for a number "
                         "(e.g. train.lr=1e-5:1e-3:log) or key=[a,b] for choices (e.g. train.miner=[all,semihard])")
    keys = [dimension.key for dimension in space]
    if len(set(keys)) < len(keys):
        raise UsageError(f"--mode tune: a key is searched twice ({', '.join(keys)})")
    if config.data.val_fraction == 0:
        raise UsageError("--mode tune maximises validation Recall@1: set data.val_fraction above 0")
    for dimension in space:
        if not dimension.choices:
            if not dimension.low < dimension.high:
                raise UsageError(f"--mode tune: {dimension.key}={dimension.low}:{dimension.high} needs low < high")
            if dimension.log and dimension.low <= 0:
                raise UsageError(f"--mode tune: {dimension.key}: a log range needs low > 0")
        for value in dimension.choices or (dimension.low, dimension.high):
            try:
                resolve_objective_config(config.updated({dimension.key: value}, explicit=True))
            except ConfigError as error:
                raise UsageError(f"--mode tune: {dimension.key}={value!r} cannot be tried: {error}") from None


def build_pruner():
    """Stop a trial whose validation Recall@1 is below the median of the earlier trials at the same epoch,
    from the first epoch on, once 3 trials have finished (a trial's last epoch is never cut)."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def run_from_arguments(config, arguments) -> None:
    run_tune(config, split_search_space(arguments.overrides)[1], arguments.trials, arguments.overwrite)


def run_tune(config, space: list[SearchDimension], trials: int, overwrite: bool) -> list[dict]:
    """Run `trials` training runs chosen by Optuna's TPE sampler (seeded by train.seed); returns the rows
    of tune_results.csv. A trial that diverges is recorded as failed and the search goes on."""
    from run_folder import remove_previous_outputs, run_folder_lock

    if trials < 1:
        raise UsageError(f"--trials must be at least 1; got {trials}")
    check_search_space(config, space)
    tune_dir = Path(config.output.dir)
    with run_folder_lock(tune_dir, "tune"):
        earlier = [path for path in [tune_dir / RESULTS_FILE, *tune_dir.glob("trial_*/last.pt")] if path.exists()]
        if earlier and not overwrite:
            raise UsageError(f"{tune_dir} holds an earlier search ({earlier[0].name}): add --overwrite to start "
                             f"afresh, or set output.dir to a new folder")
        for path in (tune_dir / RESULTS_FILE, tune_dir / PLOT_FILE):  # nothing of the earlier search may pass
            path.unlink(missing_ok=True)                               # for this one's
        for trial_dir in (path for path in tune_dir.glob("trial_*") if path.is_dir()):
            remove_previous_outputs(trial_dir)
        return search(config, space, trials, tune_dir, overwrite)


def search(config, space: list[SearchDimension], trials: int, tune_dir: Path, overwrite: bool) -> list[dict]:
    import optuna

    from modes.train import run_train
    from trainer import NonFiniteLossError
    from visualize import plot_search_history

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines repeat ours
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.train.seed),
                                pruner=build_pruner())
    print(f"tune: {trials} trials over {'; '.join(d.describe() for d in space)}; runs in {tune_dir}/trial_NNN")
    rows = []
    for _ in range(trials):
        trial = study.ask()
        values = {dimension.key: dimension.suggest(trial) for dimension in space}
        run_dir = tune_dir / f"trial_{trial.number:03d}"
        run_name = f"{config.wandb.run_name or tune_dir.name}-trial_{trial.number:03d}"
        trial_config = config.updated(values, explicit=True).updated({"output.dir": str(run_dir),
                                                                       "wandb.run_name": run_name})
        reported, pruned = [], []

        def report_and_judge(record: dict) -> bool:
            """Optuna sees each epoch's validation Recall@1; True (stop) when the pruner says so."""
            reported.append(record.get("val/recall@1", math.nan))
            trial.report(reported[-1], record["epoch"])
            if record["epoch"] < trial_config.train.epochs and trial.should_prune():
                pruned.append(record["epoch"])
            return bool(pruned)

        print(f"\ntrial {trial.number + 1}/{trials}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float)
                                                                  else f"{k}={v}" for k, v in values.items()))
        started = time.perf_counter()
        try:
            summary = run_train(trial_config, resume=False, overwrite=overwrite, on_epoch_end=report_and_judge)
        except NonFiniteLossError as error:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            state, best, note = "failed", math.nan, str(error).split(";")[0]
        else:
            best = summary["best_val_recall@1"]
            if pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, best)
            state = "pruned" if pruned else "complete"
            note = f"pruned after epoch {pruned[0]}" if pruned else ""
        rows.append({"trial": trial.number, "state": state, "val_recall@1": best, "epochs": len(reported),
                     "seconds": round(time.perf_counter() - started, 1), **values, "run_dir": str(run_dir)})
        write_results(rows, tune_dir / RESULTS_FILE)
        plot_search_history([row["val_recall@1"] for row in rows], [row["state"] for row in rows],
                            tune_dir / PLOT_FILE)
        print(f"trial {trial.number + 1}/{trials}: {state}, best validation recall@1 {100 * best:.2f}%"
              + (f" ({note})" if note else ""))
    finished = [row for row in rows if row["state"] != "failed"]
    print(f"\n{len(rows)} trials: {sum(r['state'] == 'complete' for r in rows)} complete, "
          f"{sum(r['state'] == 'pruned' for r in rows)} pruned, {len(rows) - len(finished)} failed; "
          f"results in {tune_dir / RESULTS_FILE}, picture {tune_dir / PLOT_FILE}")
    if finished:  # a pruned trial's value is that of a run cut short: it wins only when nothing completed
        best_row = max(finished, key=lambda row: (row["state"] == "complete", row["val_recall@1"]))
        print(f"best: trial_{best_row['trial']:03d}, validation recall@1 {100 * best_row['val_recall@1']:.2f}% with "
              + ", ".join(f"{d.key}={best_row[d.key]}" for d in space)
              + f"\nits configuration: {best_row['run_dir']}/config.yaml; its model: {best_row['run_dir']}/best.pt")
    return rows


def write_results(rows: list[dict], path: Path) -> None:
    """One row per trial; written whole after every trial (to a temporary name, then renamed)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)
