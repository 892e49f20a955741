"""Configuration: defaults, YAML files and `key=value` overrides, resolved once and frozen.

Resolution order: DEFAULTS <- YAML file (--config) <- trailing `section.key=value` overrides.
Every key must already exist in DEFAULTS, and every value must have the type of its default
(an int is accepted where a float is expected). Errors are `ConfigError` with a one-line message
naming the key, raised before any heavy work (no model, no data touched).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
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
        "sampler": "pk",  # pk (P classes x K images) | triplets (the reference's random triplets)
        "classes_per_batch": 32,  # P
        "images_per_class": 4,  # K
        "triplets_per_batch": 16,  # sampler=triplets: a batch holds 3 x this many images
        "num_workers": -1,  # -1 = one per available CPU core
        "cache_dir": "",  # a downsized copy built by `--mode cache` ("" = read the originals)
        "on_bad_image": "error",  # error (stop, naming the file) | skip (leave it out, count it, list it in the run folder)
        "startup_check": "full",  # before training, decode every train/validation image (full), read headers only, or none
        "demo_classes": 100,  # format=demo only: size of the generated dataset
        "demo_images_per_class": 12,
    },
    "model": {
        "backbone": "microsoft/swinv2-base-patch4-window16-256",  # hub id | local dir | tiny
        "embedding_dim": 512,  # 0 = no projection head: the backbone's pooled output (1024-d for Swinv2-B)
        "attention": "sdpa",  # sdpa (scaled_dot_product_attention: same weights, 1.5-2x faster on H100) | eager
    },
    "train": {
        "epochs": 15,
        "loss": "triplet",  # triplet | contrastive
        "miner": "batchhard",  # random | semihard | batchhard | all
        "margin": 0.1,  # triplet margin, on L2-normalised embeddings
        "contrastive_pos_margin": 0.0,
        "contrastive_neg_margin": 0.5,
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
        "tf32": True,  # TF32 matmuls for whatever still runs in fp32 on Ampere/Hopper GPUs
    },
    "eval": {
        "recall_ks": [1, 10, 100, 1000],
        "map_ks": [1000],  # mAP@k: precision averaged over the hits in the top k, divided by min(k, R)
        "backend": "auto",  # auto | faiss | torch
        "batch_size": 128,  # images per forward pass when embedding
        "cuda_graph": True,  # on CUDA, replay the embedding forward from one captured graph (not with train.compile)
        "memory_gb": 1.0,  # working memory of the exact kNN search (its block size follows from this)
    },
    "output": {
        "dir": "models_ckpt/sop_swinv2",
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
    "data.sampler": ("pk", "triplets"),
    "data.on_bad_image": ("error", "skip"),
    "data.startup_check": ("full", "headers", "none"),
    "train.loss": ("triplet", "contrastive"),
    "train.miner": ("random", "semihard", "batchhard", "all"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "model.attention": ("eager", "sdpa"),
    "eval.backend": ("auto", "faiss", "torch"),
    "wandb.mode": ("disabled", "offline", "online"),
}


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key."""


class Config:
    """A frozen, nested view of a resolved configuration: `config.train.lr`, `config.to_dict()`."""

    def __init__(self, values: dict[str, Any]):
        for key, value in values.items():
            object.__setattr__(self, key, Config(value) if isinstance(value, dict) else value)

    def __setattr__(self, key, value):
        raise AttributeError("Config is frozen; pass overrides to load_config instead")

    def to_dict(self) -> dict[str, Any]:
        return {
            key: value.to_dict() if isinstance(value, Config) else copy.deepcopy(value)
            for key, value in vars(self).items()
        }

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(type(value), type(value).__name__)


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
    raise ConfigError(f"config key '{key}' expects a {_type_name(default)}, got {value!r}")


def _unknown_key_error(key: str) -> ConfigError:
    known = [f"{section}.{name}" for section, values in DEFAULTS.items() for name in values]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _set(values: dict, key: str, raw_value: Any) -> None:
    section, _, name = key.partition(".")
    if section not in DEFAULTS or name not in DEFAULTS[section]:
        raise _unknown_key_error(key)
    values[section][name] = _coerce(key, raw_value, DEFAULTS[section][name])


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
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if values[section][name] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {values[section][name]!r}")
    checks = [
        ("train.epochs", values["train"]["epochs"] >= 1, "must be at least 1"),
        ("train.lr", values["train"]["lr"] > 0, "must be positive"),
        ("train.head_lr_multiplier", values["train"]["head_lr_multiplier"] > 0, "must be positive"),
        ("train.margin", values["train"]["margin"] >= 0, "must be non-negative"),
        ("train.weight_decay", values["train"]["weight_decay"] >= 0, "must be non-negative"),
        ("train.warmup_fraction", 0 <= values["train"]["warmup_fraction"] < 1, "must be in [0, 1)"),
        ("train.grad_clip", values["train"]["grad_clip"] >= 0, "must be non-negative (0 = off)"),
        ("train.patience", values["train"]["patience"] >= 0, "must be non-negative (0 = off)"),
        ("model.embedding_dim", values["model"]["embedding_dim"] >= 0, "must be >= 1, or 0 for no projection head"),
        ("data.image_size", values["data"]["image_size"] >= 16, "must be at least 16 pixels"),
        ("data.min_crop_scale", 0 < values["data"]["min_crop_scale"] <= 1, "must be in (0, 1]"),
        ("data.val_fraction", 0 <= values["data"]["val_fraction"] < 1, "must be in [0, 1)"),
        ("data.classes_per_batch", values["data"]["classes_per_batch"] >= 2, "must be at least 2 (negatives come from other classes)"),
        ("data.images_per_class", values["data"]["images_per_class"] >= 2, "must be at least 2 (a positive pair needs two images)"),
        ("data.triplets_per_batch", values["data"]["triplets_per_batch"] >= 1, "must be at least 1"),
        ("data.num_workers", values["data"]["num_workers"] >= -1, "must be -1 (all cores) or >= 0"),
        ("data.demo_classes", values["data"]["demo_classes"] >= 4, "must be at least 4"),
        ("data.demo_images_per_class", values["data"]["demo_images_per_class"] >= 2, "must be at least 2"),
        ("eval.batch_size", values["eval"]["batch_size"] >= 1, "must be at least 1"),
        ("eval.memory_gb", values["eval"]["memory_gb"] > 0, "must be positive"),
        ("eval.recall_ks", len(values["eval"]["recall_ks"]) > 0 and min(values["eval"]["recall_ks"]) >= 1, "must be a non-empty list of k >= 1"),
        ("eval.map_ks", all(k >= 1 for k in values["eval"]["map_ks"]), "must be a list of k >= 1"),
    ]
    for key, ok, requirement in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"config key '{key}' {requirement}; got {values[section][name]!r}")
    device = values["train"]["device"]
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N; got {device!r}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Resolve DEFAULTS <- YAML file <- overrides into a frozen, validated Config."""
    values = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
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
    for text in overrides:
        key, value = parse_override(text)
        _set(values, key, value)
    _validate(values)
    return Config(values)


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
