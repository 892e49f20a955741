"""A trained checkpoint as a portable Hugging Face style folder, loadable without this project.

    config.json, model.safetensors    the Swinv2 backbone (`save_pretrained`)
    projection.safetensors            the projection head: weight (D, hidden), bias (D,); absent without a head
    preprocessor_config.json          image_size, resize_short_side, crop, interpolation, image_mean, image_std
    README.md                         model card: how to load, preprocessing, training config, metrics

`model.backbone=<folder>` loads it back into this project, head included (`model.build_embedder`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from errors import UsageError
from model import EXPORTED_HEAD_FILE as PROJECTION_FILE

from .embedding import output_size, preprocessing

PREPROCESSOR_FILE = "preprocessor_config.json"

# Run by tests/test_export.py as the card shows it: transformers, safetensors, torchvision and PIL only.
LOADING_SNIPPET = '''\
import json

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from torchvision.transforms.v2 import functional as F
from transformers import Swinv2Model

folder = "{folder}"
backbone = Swinv2Model.from_pretrained(folder).eval()
head = load_file(f"{{folder}}/projection.safetensors")  # weight (D, hidden), bias (D,)
pre = json.load(open(f"{{folder}}/preprocessor_config.json"))
mean, std = torch.tensor(pre["image_mean"]).view(3, 1, 1), torch.tensor(pre["image_std"]).view(3, 1, 1)


def embed(path):
    """An image file -> its (D,) unit embedding, as the trained model computes it."""
    pixels = F.pil_to_tensor(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))  # uint8 (3, H, W)
    pixels = F.center_crop(F.resize(pixels, pre["resize_short_side"], antialias=True), pre["image_size"])
    x = pixels.float() * (1 / (255 * std)) - mean / std
    with torch.no_grad():
        pooled = backbone(pixel_values=x[None]).pooler_output[0]  # (hidden,)
    return torch.nn.functional.normalize(pooled @ head["weight"].T + head["bias"], dim=0)
'''


def evaluation_report(checkpoint_path: Path) -> tuple[dict | None, Path]:
    """The run folder's evaluation report of this checkpoint (report.json for best.pt, <stem>_report.json else)."""
    folder = checkpoint_path.parent
    path = folder / ("report.json" if checkpoint_path.name == "best.pt" else f"{checkpoint_path.stem}_report.json")
    try:
        return json.loads(path.read_text()), path
    except (OSError, ValueError):
        return None, path


def metrics_table(metrics: dict) -> str:
    rows = [(name, value) for name, value in metrics.items() if isinstance(value, float)]
    if not rows:
        return "(none recorded)"
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {name} | {100 * value:.2f} |" for name, value in rows)])


def model_card(checkpoint: dict, checkpoint_path: Path, folder: Path, pre: dict) -> str:
    report, report_path = evaluation_report(checkpoint_path)
    test_part = (f"from `{report_path}` ({report.get('model', '')}, {report.get('num_queries', '?')} queries):\n\n"
                 f"{metrics_table(report)}" if report else f"No test report beside the checkpoint (`{report_path}`).")
    dim = output_size(checkpoint)
    return f"""# Swinv2 image-retrieval embedder

Fine-tuned by deep metric learning (image_retrieval project): an image -> a unit vector of {dim} dimensions;
similar products have a large inner product. Exported from `{checkpoint_path}` (epoch {checkpoint.get('epoch')},
weights sha256 `{checkpoint['weights_sha256']}`).

| file | content |
|---|---|
| `config.json`, `model.safetensors` | the Swinv2 backbone (`Swinv2Model.save_pretrained`) |
| `{PROJECTION_FILE}` | the projection head: `weight` ({dim}, hidden), `bias` ({dim},) |
| `{PREPROCESSOR_FILE}` | the preprocessing below |

## Preprocessing

RGB (EXIF rotation applied), resize the short side to {pre['resize_short_side']} pixels (bilinear, antialiased, on
uint8 pixels as torchvision does), centre crop {pre['image_size']} x {pre['image_size']}, scale to [0, 1], normalise
with mean {pre['mean']} and std {pre['std']}. Then backbone pooled output -> projection -> L2 normalisation.

## Load it

In the image_retrieval project: `model.backbone={folder}` (the head loads too; `model.embedding_dim={dim}`),
e.g. `python main.py --mode eval --checkpoint none model.backbone={folder} model.embedding_dim={dim}`.

With transformers and safetensors alone (torchvision for the resize, PIL to read the file; `folder` is this
folder, wherever it now is):

```python
{LOADING_SNIPPET.format(folder=folder)}```

`embed(path)` equals the project's embedding of the same PNG within 1e-5 (tests/test_export.py). JPEG files
may differ slightly: the project decodes small JPEGs with torchvision's decoder and large ones at reduced scale.

## Metrics

Validation (held-out training classes, at the exported epoch):

{metrics_table(checkpoint.get('metrics') or {})}

Test: {test_part}

## Training configuration

```yaml
{yaml.safe_dump(checkpoint['config'], sort_keys=False).rstrip()}
```
"""


def export_checkpoint(checkpoint_path: Path, output: Path) -> Path:
    """Write the export folder `output` (built in `<output>.partial`, then renamed); returns `output`."""
    from safetensors.torch import save_file

    from checkpoint import embedder_from_checkpoint, load_checkpoint

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"--output {output} already exists and is not empty; choose another folder")
    checkpoint = load_checkpoint(checkpoint_path)
    model = embedder_from_checkpoint(checkpoint)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.backbone.save_pretrained(partial, safe_serialization=True)
    if checkpoint["embedding_dim"] > 0:
        head = {name: tensor.contiguous() for name, tensor in model.projection.state_dict().items()}
        save_file(head, partial / PROJECTION_FILE, metadata={"weights_sha256": checkpoint["weights_sha256"]})
    pre = preprocessing(checkpoint)
    processor = {"image_size": pre["image_size"], "resize_short_side": pre["resize_short_side"], "crop": pre["crop"],
                 "interpolation": pre["interpolation"], "image_mean": pre["mean"], "image_std": pre["std"],
                 "embedding_dim": output_size(checkpoint)}
    (partial / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
    (partial / "README.md").write_text(model_card(checkpoint, Path(checkpoint_path), output.resolve(), pre))
    if output.is_dir():
        output.rmdir()  # empty, checked above
    os.rename(partial, output)
    return output
