"""Configuration: defaults, YAML files and `key=value` overrides, resolved once and frozen.

Resolution order: DEFAULTS <- YAML file (--config) <- trailing `section.key=value` overrides.
Every key must already exist in DEFAULTS, and every value must have the type of its default
(an int is accepted where a float is expected). Errors are `ConfigError` with a one-line message
naming the key, raised before any heavy work (no model, no data touched).
"""

from __future__ import annotations

import copy
import difflib
import math
import reprlib
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "format": "sop",  # sop | folder | demo
        "root": "dataloaders/stanford_online_products",
        "train_list": "Ebay_train.txt",  # sop/demo: relative to data.root
        "test_list": "Ebay_test.txt",
        "test_root": "",  # folder format: a second class tree for testing ("" = no test split)
        "val_fraction": 0.2048,  # 2,318 of SOP's 11,318 training classes, as the reference used
        "split_seed": 0,
        "image_size": 256,
        "min_crop_scale": 0.16,  # training crops keep 16%-100% of the image area (RandomResizedCrop)
        "sampler": "pk",  # pk (P classes x K images) | triplets (the reference's random triplets) | shuffle
        "repeat_positives": "allow",  # allow | skip: pair an image with its own repeat in a P x K batch or not
        "classes_per_batch": 32,  # P
        "images_per_class": 4,  # K
        "triplets_per_batch": 16,  # sampler=triplets: a batch holds 3 x this many images
        "num_workers": -1,  # -1 = one per available CPU core
        "cache_dir": "",  # a downsized copy built by `--mode cache` ("" = read the originals)
        "eval_decode": "workers",  # workers | device: who decodes evaluation JPEGs (device = nvjpeg on CUDA)
        "on_bad_image": "error",  # error (stop, naming the file) | skip (leave it out, count it, list it in the run folder)
        "startup_check": "full",  # before training, decode every train/validation image (full), read headers only, or none
        "allow_outside_root": False,  # let list lines and symlinks point outside data.root (e.g. another mount)
        "max_image_bytes": 100_000_000,  # larger files (and non-regular ones) are refused before reading
        "demo_classes": 100,  # format=demo only: size of the generated dataset
        "demo_images_per_class": 12,
        "replay_list": "",  # SOP-format list of earlier classes' images, partly mixed into training ("" = none)
        "replay_fraction": 0.2,  # of each replayed class's images (at least 2 per class)
    },
    "model": {
        "backbone": "microsoft/swinv2-base-patch4-window16-256",  # hub id | local dir | tiny
        "embedding_dim": 512,  # 0 = no projection head: the backbone's pooled output (1024-d for Swinv2-B)
        "attention": "sdpa",  # sdpa (scaled_dot_product_attention: same weights, 1.5-2x faster on H100) | flex | eager
    },
    "train": {
        "epochs": 15,
        "loss": "triplet",  # objective.LOSSES: triplet | contrastive | multi_similarity | proxy_anchor | ...
        "miner": "batchhard",  # objective.MINERS: random | semihard | batchhard | all | multi_similarity | none
        "loss_params": {},  # the loss's own parameters, e.g. {alpha: 2, beta: 50}; checked against its names
        "miner_params": {},  # the miner's own parameters, e.g. {epsilon: 0.1}
        "margin": 0.1,  # triplet margin, on L2-normalised embeddings
        "contrastive_pos_margin": 0.0,
        "contrastive_neg_margin": 0.5,
        "loss_lr": 0.0,  # learning rate of a loss's own parameters (proxies); 0 = train.lr x the authors' ratio
        "lr": 2.0e-5,  # backbone learning rate
        "head_lr_multiplier": 10.0,  # the projection head learns this many times faster
        "weight_decay": 0.05,
        "warmup_fraction": 0.05,  # of all optimiser steps, linear warmup before cosine decay
        "grad_clip": 1.0,  # max global grad norm; 0 = off
        "precision": "bf16",  # fp32 | bf16 | fp16
        "seed": 0,
        "patience": 5,  # epochs without a better validation recall@1 before stopping; 0 = never stop early
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "compile": False,  # torch.compile the backbone (first step takes minutes; then much faster on GPU)
        "grad_checkpointing": False,  # recompute activations in backward: less memory, ~30% more compute
        "capture_step": False,  # on CUDA, the model's forward and backward replayed from CUDA graphs (not fp16)
        "tf32": True,  # TF32 matmuls for whatever still runs in fp32 on Ampere/Hopper GPUs
        "cross_rank_mining": True,  # several processes (torchrun): mine and score the global batch, not each share
    },
    "eval": {
        "recall_ks": [1, 10, 100, 1000],
        "map_ks": [1000],  # mAP@k: precision averaged over the hits in the top k, divided by min(k, R)
        "backend": "auto",  # auto | faiss | torch
        "batch_size": 128,  # images per forward pass when embedding
        "cuda_graph": True,  # on CUDA, replay the embedding forward from one captured graph (not with train.compile)
        "memory_gb": 0.0,  # working memory of the exact kNN search (its block size follows); 0 = 1 GB / card-sized
        "precision": "bf16",  # default: train.precision
        "device": "auto",  # default: train.device
        "compile": False,  # default: train.compile
    },
    "index": {
        "type": "flat",  # flat (exact) | hnsw | ivf_flat | ivf_pq
        "hnsw_m": 32,  # hnsw: graph neighbours per vector
        "hnsw_ef_construction": 100,
        "hnsw_ef_search": 64,
        "ivf_lists": 0,  # ivf_*: inverted lists; 0 = about 4 sqrt(N)
        "pq_bytes": 64,  # ivf_pq: bytes per vector (must divide the embedding size)
        "nprobe": 16,  # ivf_*: lists scanned per query
        "chunk_images": 10000,  # --mode index embeds and saves this many images at a time (resumable)
    },
    "output": {
        "dir": "",  # "" = models_ckpt/<config file name>, or models_ckpt/<data.root's name> without a config file
    },
    "wandb": {
        "mode": "offline",  # disabled | offline | online
        "project": "image-retrieval",
        "entity": "",  # "" = your default entity
        "run_name": "",
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("sop", "folder", "demo"),
    "data.sampler": ("pk", "triplets", "shuffle"),
    "data.repeat_positives": ("allow", "skip"),
    "data.on_bad_image": ("error", "skip"),
    "data.eval_decode": ("workers", "device"),
    "data.startup_check": ("full", "headers", "none"),
    "train.loss": ("triplet", "contrastive", "multi_similarity", "circle", "supcon", "proxy_anchor",
                   "normalized_softmax", "arcface", "subcenter_arcface"),
    "train.miner": ("random", "semihard", "batchhard", "all", "multi_similarity", "none"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "eval.precision": ("fp32", "bf16", "fp16"),
    "model.attention": ("eager", "sdpa", "flex"),
    "eval.backend": ("auto", "faiss", "torch"),
    "wandb.mode": ("disabled", "offline", "online"),
    "index.type": ("flat", "hnsw", "ivf_flat", "ivf_pq"),
}


# Keys that follow another key unless set themselves: evaluation runs as training did, unless told otherwise.
INHERITED_KEYS: dict[str, str] = {
    "eval.precision": "train.precision",
    "eval.device": "train.device",
    "eval.compile": "train.compile",
}
RUNS_FOLDER = Path("models_ckpt")
MAX_CONFIG_BYTES = 1_000_000


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key."""


class Config:
    """A frozen, nested view of a resolved configuration: `config.train.lr`, `config.to_dict()`.

    The root also knows which dotted keys the user set (`is_explicit`): a default may be adapted to the
    data (say, a k too large for a small split), a value the user asked for may not.
    """

    def __init__(self, values: dict[str, Any], explicit_keys: frozenset[str] = frozenset(), _is_section: bool = False):
        for key, value in values.items():
            if isinstance(value, dict):  # a section, or within one a mapping key (train.loss_params): read-only
                value = MappingProxyType(copy.deepcopy(value)) if _is_section else Config(value, _is_section=True)
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_explicit_keys", frozenset(explicit_keys))

    def __setattr__(self, key, value):
        raise AttributeError("Config is frozen; pass overrides to load_config instead")

    def to_dict(self) -> dict[str, Any]:
        return {
            key: value.to_dict() if isinstance(value, Config) else dict(value) if isinstance(value, MappingProxyType)
            else copy.deepcopy(value)
            for key, value in vars(self).items() if not key.startswith("_")
        }

    def is_explicit(self, key: str) -> bool:
        """Whether `section.name` was set by a config file or an override (not left at its default)."""
        return key in self._explicit_keys

    def updated(self, values: dict[str, Any], explicit: bool = False) -> "Config":
        """A copy with some dotted keys replaced (values already of the right type), validated again.

        explicit: the new values count as the user's own (`is_explicit`), as a search's chosen values do.
        """
        resolved = self.to_dict()
        set_keys = {_set(resolved, key, value) for key, value in values.items()}
        _validate(resolved)
        return Config(resolved, self._explicit_keys | set_keys if explicit else self._explicit_keys)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"


def _type_name(value: Any) -> str:
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string",
            dict: "a mapping of names to numbers, bools or strings (e.g. {alpha: 2})",
            list: f"a list of {_type_name(value[0]).split(' ', 1)[1]}s" if isinstance(value, list) and value
            else "a list"}.get(type(value), type(value).__name__)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of `default`; ints widen to floats."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '1e-4' (no dot) as a string
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. wandb.entity=1234 or a numeric run name
    elif isinstance(default, list):
        if isinstance(value, list) and all(isinstance(v, type(default[0])) for v in value):
            return value
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return {name: _mapping_entry(f"{key}.{name}", entry) for name, entry in value.items()}
    raise ConfigError(f"config key '{key}' expects {_type_name(default)}, got {_bounded_repr(value)}")


def _bounded_repr(value: Any) -> str:
    """A short repr, however large or deeply nested the value (a YAML alias bomb expands to billions of items)."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxlist, shortener.maxdict, shortener.maxstring, shortener.maxother = 3, 6, 4, 60, 60
    return shortener.repr(value)


def _unknown_key_error(key: str) -> ConfigError:
    known = [f"{section}.{name}" for section, values in DEFAULTS.items() for name in values]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; every key is listed in docs/configuration.md")


def _mapping_entry(key: str, value: Any) -> Any:
    """One entry of a mapping key (`train.loss_params.alpha`): a name and a number, bool or string.

    Which names a mapping accepts is checked where they are used (objective.check_objective_params).
    """
    name = key.split(".", 2)[2]
    if not (isinstance(name, str) and name.isidentifier()):
        raise ConfigError(f"config key '{key}': '{name}' is not a parameter name")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number; got {value!r}")
    if not isinstance(value, (bool, int, float, str)):
        raise ConfigError(f"config key '{key}' expects a number, a bool or a string, got {_bounded_repr(value)}")
    return value


def _set(values: dict, key: str, raw_value: Any) -> str:
    """Set one dotted key (type-checked); returns the key that was set (`section.name`).

    `section.name.entry` sets one entry of a mapping key (`train.loss_params.alpha=2`), keeping the others.
    """
    section, _, name = key.partition(".")
    mapping, _, entry = name.partition(".")
    if entry and section in DEFAULTS and isinstance(DEFAULTS[section].get(mapping), dict):
        values[section][mapping] = {**values[section][mapping], entry: _mapping_entry(key, raw_value)}
        return f"{section}.{mapping}"
    if section not in DEFAULTS or name not in DEFAULTS[section]:
        raise _unknown_key_error(key)
    values[section][name] = _coerce(key, raw_value, DEFAULTS[section][name])
    return key


def parse_override(text: str) -> tuple[str, Any]:
    """`'train.epochs=3'` -> `('train.epochs', 3)`; the value is read as YAML (numbers, bools, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep it as a string, and let the type check decide
    if value is None:
        value = ""
    return key.strip(), value


def _validate(values: dict) -> None:
    for section, entries in DEFAULTS.items():
        for name, default in entries.items():
            value = values[section][name]
            if isinstance(default, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{section}.{name}' must be a finite number; got {value!r}")
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if values[section][name] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {_bounded_repr(values[section][name])}")
    checks = [
        ("train.epochs", values["train"]["epochs"] >= 1, "must be at least 1"),
        ("train.lr", values["train"]["lr"] > 0, "must be positive"),
        ("train.loss_lr", values["train"]["loss_lr"] >= 0, "must be positive, or 0 for the loss's default"),
        ("train.head_lr_multiplier", values["train"]["head_lr_multiplier"] > 0, "must be positive"),
        ("train.margin", values["train"]["margin"] >= 0, "must be non-negative"),
        ("train.weight_decay", values["train"]["weight_decay"] >= 0, "must be non-negative"),
        ("train.warmup_fraction", 0 <= values["train"]["warmup_fraction"] < 1, "must be in [0, 1)"),
        ("train.grad_clip", values["train"]["grad_clip"] >= 0, "must be non-negative (0 = off)"),
        ("train.patience", values["train"]["patience"] >= 0, "must be non-negative (0 = off)"),
        ("train.capture_step", not (values["train"]["capture_step"] and values["train"]["precision"] == "fp16"),
         "needs train.precision bf16 or fp32 (fp16's gradient scaler cannot be captured in a CUDA graph)"),
        ("model.embedding_dim", values["model"]["embedding_dim"] >= 0, "must be >= 1, or 0 for no projection head"),
        ("data.image_size", values["data"]["image_size"] >= 16, "must be at least 16 pixels"),
        ("data.min_crop_scale", 0 < values["data"]["min_crop_scale"] <= 1, "must be in (0, 1]"),
        ("data.val_fraction", 0 <= values["data"]["val_fraction"] < 1, "must be in [0, 1)"),
        ("data.classes_per_batch", values["data"]["classes_per_batch"] >= 2, "must be at least 2 (negatives come from other classes)"),
        ("data.images_per_class", values["data"]["images_per_class"] >= 2, "must be at least 2 (a positive pair needs two images)"),
        ("data.triplets_per_batch", values["data"]["triplets_per_batch"] >= 1, "must be at least 1"),
        ("data.num_workers", values["data"]["num_workers"] >= -1, "must be -1 (all cores) or >= 0"),
        ("data.max_image_bytes", values["data"]["max_image_bytes"] >= 1, "must be at least 1"),
        ("data.demo_classes", values["data"]["demo_classes"] >= 4, "must be at least 4"),
        ("data.demo_images_per_class", values["data"]["demo_images_per_class"] >= 2, "must be at least 2"),
        ("data.replay_fraction", 0 < values["data"]["replay_fraction"] <= 1, "must be in (0, 1]"),
        ("eval.batch_size", values["eval"]["batch_size"] >= 1, "must be at least 1"),
        ("eval.memory_gb", values["eval"]["memory_gb"] >= 0, "must be positive, or 0 for the device's default"),
        ("eval.recall_ks", len(values["eval"]["recall_ks"]) > 0 and min(values["eval"]["recall_ks"]) >= 1, "must be a non-empty list of k >= 1"),
        ("eval.map_ks", all(k >= 1 for k in values["eval"]["map_ks"]), "must be a list of k >= 1"),
        ("index.hnsw_m", values["index"]["hnsw_m"] >= 2, "must be at least 2"),
        ("index.hnsw_ef_construction", values["index"]["hnsw_ef_construction"] >= 1, "must be at least 1"),
        ("index.hnsw_ef_search", values["index"]["hnsw_ef_search"] >= 1, "must be at least 1"),
        ("index.ivf_lists", values["index"]["ivf_lists"] >= 0, "must be >= 1, or 0 for about 4 sqrt(N)"),
        ("index.pq_bytes", values["index"]["pq_bytes"] >= 1, "must be at least 1"),
        ("index.nprobe", values["index"]["nprobe"] >= 1, "must be at least 1"),
        ("index.chunk_images", values["index"]["chunk_images"] >= 1, "must be at least 1"),
    ]
    for key, ok, requirement in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"config key '{key}' {requirement}; got {_bounded_repr(values[section][name])}")
    for key in ("train.device", "eval.device"):
        device = _get(values, key)
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise ConfigError(f"config key '{key}' must be auto, cpu, cuda or cuda:N; got {device!r}")


def default_run_dir(config_path: Path | None, data_root: str) -> str:
    """models_ckpt/<config file's name>, or without a config file models_ckpt/<the dataset folder's name>
    (its parent's for a folder named train, as in /catalogue/train)."""
    if config_path is not None:
        return str(RUNS_FOLDER / config_path.stem)
    root = Path(data_root).resolve()
    name = root.parent.name if root.name.lower() == "train" and root.parent.name else root.name
    return str(RUNS_FOLDER / (name or "run"))


def load_config(path: str | Path | None = None, overrides: list[str] = (), file_is_explicit: bool = True) -> Config:
    """Resolve DEFAULTS <- YAML file <- overrides into a frozen, validated Config.

    file_is_explicit=False: the file is a run's own resolved config.yaml, whose values are the run's
    settings but not requests of the user's (see `Config.is_explicit`).
    """
    values = copy.deepcopy(DEFAULTS)
    explicit: set[str] = set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file '{path}' is {path.stat().st_size} bytes; a configuration is at most "
                              f"{MAX_CONFIG_BYTES} bytes")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        for section, entries in loaded.items():
            if not isinstance(entries, dict):
                raise _unknown_key_error(str(section)) if section not in DEFAULTS else ConfigError(
                    f"config section '{section}' in '{path}' must be a mapping of keys")
            for name, value in entries.items():
                _set(values, f"{section}.{name}", "" if value is None else value)
                if file_is_explicit:
                    explicit.add(f"{section}.{name}")
    for text in overrides:
        key, value = parse_override(text)
        explicit.add(_set(values, key, value))
    for key, source in INHERITED_KEYS.items():
        if key not in explicit:
            _set(values, key, _get(values, source))
    if not values["output"]["dir"]:
        values["output"]["dir"] = default_run_dir(path, values["data"]["root"])
    _validate(values)
    return Config(values, frozenset(explicit))


def _get(values: dict, key: str) -> Any:
    section, name = key.split(".")
    return values[section][name]


# What a checkpoint's weights depend on: resuming or evaluating with other values would silently mismatch.
MODEL_DEFINING_KEYS = ("model.backbone", "model.embedding_dim", "data.image_size")


def differing_keys(saved: dict, current: dict, keys: tuple[str, ...] = MODEL_DEFINING_KEYS) -> list[str]:
    """`key: saved -> current` for each dotted key whose value differs between two config dicts."""
    differences = []
    for key in keys:
        section, name = key.split(".")
        before, after = saved.get(section, {}).get(name), current.get(section, {}).get(name)
        if before != after:
            differences.append(f"{key}: {before!r} in the checkpoint, {after!r} now")
    return differences


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (the run folder's `config.yaml`)."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# One line per dotted key: what it means. docs/configuration.md is generated from this, DEFAULTS, CHOICES and
# INHERITED_KEYS (`python docs/make_configuration_doc.py`); tests/test_configuration_doc.py keeps them in step.
KEY_DOCS: dict[str, str] = {
    "data.format": "`sop` (list files), `folder` (`root/<class>/<image>`), `demo` (generated)",
    "data.root": "dataset folder; for `sop`/`folder` a missing folder is an error, never a cue to generate data",
    "data.train_list": "SOP-format training list, relative to `data.root` (or absolute)",
    "data.test_list": "SOP-format test list, relative to `data.root` (or absolute)",
    "data.test_root": "`folder` format: the folder of test classes (`\"\"` = no test split)",
    "data.val_fraction": "fraction of the training classes held out for validation (class-disjoint); "
                         "0 = none, then `best.pt` is the last epoch",
    "data.split_seed": "seed of the train/validation class split",
    "data.image_size": "input resolution in pixels (square)",
    "data.min_crop_scale": "training RandomResizedCrop keeps between this fraction and all of the image area",
    "data.sampler": "`pk`: P classes x K images per batch; `triplets`: the reference's random "
                    "(anchor, positive, negative) triplets; `shuffle`: plain shuffled batches of P x K images "
                    "(for proxy losses, which need no pairs in the batch)",
    "data.repeat_positives": "`pk` fills a class with fewer than K images with repeats (new augmentations of the "
                             "same file); `skip` keeps such an image-and-its-repeat pair out of the positives "
                             "the miner and a pair loss see, `allow` counts it (docs/training.md)",
    "data.classes_per_batch": "P: distinct classes per batch (`pk` sampler; with `shuffle`, P x K is the batch size); "
                              "with several processes (torchrun) the global batch's P, split evenly over them "
                              "(docs/distributed.md)",
    "data.images_per_class": "K: images per class in a batch (`pk` sampler)",
    "data.triplets_per_batch": "`triplets` sampler: a batch holds 3 x this many images (the global batch's, with "
                               "several processes)",
    "data.num_workers": "loader processes; -1 = one per CPU core this process may use",
    "data.cache_dir": "read images from this downsized copy (built by `--mode cache`); `\"\"` = the originals",
    "data.eval_decode": "evaluation, validation and catalogue images: `workers` decode and resize them in the loader "
                        "processes; `device`: the workers only read each colour JPEG's bytes, and the evaluation "
                        "device decodes (nvjpeg on CUDA) and resizes a batch at once (dataloaders/device_decode.py; "
                        "on a CPU that is the main process, slower than the workers). Training images are always "
                        "decoded by the workers",
    "data.on_bad_image": "an image that cannot be read: `error` stops with one line naming the file; `skip` leaves it "
                         "out, counts it and lists it in `output.dir/skipped_images.jsonl`",
    "data.startup_check": "before training, decode every train/validation image (`full`), read only headers "
                          "(`headers`: missing, empty, non-image, too-large files), or `none`",
    "data.allow_outside_root": "let list lines and symlinks point outside `data.root` (e.g. to another mount); "
                               "false refuses such paths",
    "data.max_image_bytes": "larger image files (and anything that is not a regular file) are refused before reading",
    "data.demo_classes": "`demo` format: number of classes of the generated dataset (half train, half test)",
    "data.demo_images_per_class": "`demo` format: images per generated class",
    "data.replay_list": "fine-tuning on new classes: an SOP-format list (like `data.train_list`) of earlier classes' "
                        "images, of which `data.replay_fraction` joins the training split to limit forgetting "
                        "(docs/recipes.md); `\"\"` = none",
    "data.replay_fraction": "fraction of each class's images in `data.replay_list` that joins training (at least 2 "
                            "per class, drawn by `train.seed`)",
    "model.backbone": "Hugging Face hub id, local folder, or `tiny` (a 0.6 M-parameter random Swinv2 for tests "
                      "and the demo)",
    "model.embedding_dim": "width of the linear projection after the pooled output; 0 = no projection "
                           "(the backbone's pooled output, 1024-d for Swinv2-B)",
    "model.attention": "`sdpa`: transformers' Swinv2 attention rewritten with `scaled_dot_product_attention` "
                       "(same weights, same results to float rounding, tested); `flex`: the same with "
                       "`flex_attention`, one fused kernel computing the position bias and shift mask inside "
                       "(compiled on CUDA; SDPA where it cannot serve, with a warning); "
                       "`eager`: transformers' own",
    "train.epochs": "number of passes over the training images",
    "train.loss": "the loss, from pytorch-metric-learning (objective.LOSSES; docs/training.md): tuple losses "
                  "`triplet`, `contrastive`, `multi_similarity`, `circle`, `supcon`; proxy losses (one learned "
                  "vector per training class) `proxy_anchor`, `normalized_softmax`, `arcface`, `subcenter_arcface`",
    "train.miner": "which tuples of a batch train (docs/training.md): `batchhard`, `semihard` (with "
                   "`train.margin`), `multi_similarity` (pairs), `random` (one random triplet per anchor), "
                   "`all` or `none` (the whole batch); left unset, a proxy loss gets `none`",
    "train.loss_params": "the loss's own parameters by name, e.g. `{alpha: 2, beta: 50}` in YAML or "
                         "`train.loss_params.alpha=2`; unset ones keep PML's defaults; an unknown name stops the "
                         "run before any data is read, listing the valid ones",
    "train.miner_params": "the miner's own parameters by name (e.g. `train.miner_params.epsilon=0.1`), checked "
                          "like `train.loss_params`",
    "train.loss_lr": "learning rate of a proxy loss's own parameters (AdamW, no weight decay); 0 = `train.lr` "
                     "times its authors' ratio: 100 for `proxy_anchor`, 50 for `arcface`/`subcenter_arcface`, 1 "
                     "for `normalized_softmax`",
    "train.margin": "triplet margin on L2-normalised embeddings (distances lie in [0, 2]); also the semihard "
                    "miner's margin",
    "train.contrastive_pos_margin": "contrastive loss: positive pairs closer than this cost nothing",
    "train.contrastive_neg_margin": "contrastive loss: negative pairs farther than this cost nothing",
    "train.lr": "backbone learning rate (AdamW)",
    "train.head_lr_multiplier": "the projection head's learning rate is `train.lr` times this",
    "train.weight_decay": "AdamW weight decay; not applied to biases, norm weights, Swinv2's logit_scale and "
                          "continuous-position-bias MLP (chosen by parameter name, as timm does)",
    "train.warmup_fraction": "linear warmup over this fraction of all optimiser steps, then cosine decay to 0",
    "train.grad_clip": "max global gradient norm; 0 = off",
    "train.precision": "`fp32`, `bf16` or `fp16` (with a gradient scaler) autocast; one code path for all three",
    "train.seed": "model init, sampler plans, augmentation, miner draws, and the `--visualize` queries",
    "train.patience": "stop after this many epochs without a better validation Recall@1; 0 = never stop early",
    "train.device": "`auto` (the first GPU, else the CPU), `cpu`, `cuda` or `cuda:N`",
    "train.compile": "`torch.compile` the backbone for training (the first step takes minutes; "
                     "`configs/sop.yaml` turns it on)",
    "train.grad_checkpointing": "recompute activations in the backward pass: less memory, more compute",
    "train.capture_step": "on CUDA, replay the model's forward and backward from CUDA graphs captured after 3 "
                          "warm-up rehearsals (`captured_step`, strategy `split`); the loss and its miner, clipping "
                          "and AdamW run as usual between them. bf16 or fp32 only, one process; a batch of another "
                          "shape, or a failed capture (with a warning), runs uncaptured. No effect on the CPU",
    "train.cross_rank_mining": "with several processes (torchrun): gather every process's embeddings so that the miner "
                               "and the loss see the whole global batch, as one process would (gradients through each "
                               "process's own rows); false = each process mines its own share. No effect in one process",
    "train.tf32": "TF32 tensor cores for whatever still runs in fp32 on Ampere/Hopper GPUs "
                  "(the exact kNN search always runs in IEEE fp32)",
    "eval.recall_ks": "the k of Recall@k; a default k that a split is too small for is left out with a note, "
                      "a k you set that does not fit (k > images - 1) stops with exit 2",
    "eval.map_ks": "the k of mAP@k (same rule as `eval.recall_ks`)",
    "eval.backend": "exact kNN: `torch` (blocked matmul + top-k, CPU or GPU), `faiss` (flat inner product; on the "
                    "GPU when faiss is a GPU build and k + 2 <= 2048), `auto` = faiss on a GPU build, else torch",
    "eval.batch_size": "images per forward pass when embedding",
    "eval.cuda_graph": "on CUDA, capture the embedding forward as a CUDA graph at the start of each embedding pass "
                       "and replay it for every batch (a short batch is padded); off with a compiled backbone, "
                       "for passes of under 4 batches, and if the capture fails (with a warning)",
    "eval.memory_gb": "working memory of the exact kNN search in GB; its query block size follows from it "
                      "(the N x k result, 12 bytes per entry, comes on top). 0: 1 GB on the CPU; on CUDA half "
                      "the card's free memory, at least 1 GB. A CUDA search keeps its neighbours and metrics on "
                      "the card whatever the budget",
    "eval.precision": "`--mode eval`'s autocast precision when embedding (validation uses `train.precision`)",
    "eval.device": "`--mode eval`'s device: `auto`, `cpu`, `cuda` or `cuda:N`",
    "eval.compile": "`torch.compile` the backbone for `--mode eval`",
    "index.type": "`--mode index`: `flat` (exact inner product, the default), `hnsw` (graph; fast and accurate, "
                  "more memory, rebuilt on remove), `ivf_flat` or `ivf_pq` (inverted lists of full vectors or of "
                  "`index.pq_bytes`-byte codes; trained on the catalogue, kept on add and remove)",
    "index.hnsw_m": "hnsw: graph neighbours per vector (more: better recall, more memory)",
    "index.hnsw_ef_construction": "hnsw: candidates kept while building the graph (more: better graph, slower build)",
    "index.hnsw_ef_search": "hnsw: candidates kept per query (more: better recall, slower); a search may override it",
    "index.ivf_lists": "ivf_*: inverted lists (k-means centroids); 0 = round(4 sqrt(N)) for N catalogue images",
    "index.pq_bytes": "ivf_pq: bytes per vector (sub-quantisers of 8 bits); must divide the embedding size",
    "index.nprobe": "ivf_*: lists scanned per query (more: better recall, slower); a search may override it",
    "index.chunk_images": "`--mode index` embeds this many images at a time and saves each chunk, so an interrupted "
                          "build resumes from the last chunk",
    "output.dir": "the run folder; `\"\"` = models_ckpt/<config file's name> (`--config configs/mine.yaml`: "
                  "models_ckpt/mine), or without a config file models_ckpt/<data.root's folder name> "
                  "(its parent's name when that folder is named `train`)",
    "wandb.mode": "`disabled`, `offline` (sync later with `wandb sync`) or `online`; a resumed run continues "
                  "its wandb run",
    "wandb.project": "wandb project name",
    "wandb.entity": "wandb entity; `\"\"` = your default entity",
    "wandb.run_name": "wandb run name; `\"\"` = wandb's default",
}
