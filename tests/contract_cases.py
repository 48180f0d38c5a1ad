"""The table of optimizers that every contract test runs (tests/test_contract.py).

A case builds its optimizer from a list of params or param groups. ``matrix_only`` cases get a model
without biases (their update needs >= 2-D params); ``fused`` cases also run their compiled fast path.
Add a row here when adding an optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import emerging_optimizers as eo
from emerging_optimizers.compat import mxnet


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[..., torch.optim.Optimizer]  # build(params, **overrides)
    lr: float  # a learning rate that makes the fixed problem's loss fall within 40 steps
    matrix_only: bool = False
    fused: bool = False
    fp32_state: bool = False  # accepts fp32_state=True (float32 state for low-precision params)
    state_in_param_dtype: bool = True  # by default, state tensors take the param dtype (as torch.optim)
    lr_arg: str = "lr"  # the constructor's name for the learning rate
    extra: dict[str, Any] = field(default_factory=dict)


def _scalar(name: str, lr: float, fused: bool = True, **kw: Any) -> Case:
    """A scalar optimizer; ``fused`` marks the one case per kernel whose compiled path is tested (compiling
    costs seconds per kernel, so each kernel is compiled once in the suite)."""
    cls = eo.get_optimizer_cls(name)
    return Case(name if not kw else f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}",
                lambda params, cls=cls, kw=kw, **o: cls(params, **{"fused": False, **kw, **o}), lr, fused=fused,
                fp32_state=True)


CASES: list[Case] = [
    _scalar("adam", 3e-2, fused=False),
    _scalar("adam", 3e-2, nesterov=True, weight_decay=0.1, weight_decay_method="l2"),
    _scalar("adamw", 3e-2, fused=False),
    _scalar("ademamix", 2e-2, num_alpha_warmup_steps=5, num_beta_slow_warmup_steps=5),
    _scalar("sim_ademamix", 2e-3, betas=(0.9, 0.999)),
    _scalar("laprop", 3e-2),
    _scalar("laprop", 3e-2, fused=False, frob_normalize=True),
    _scalar("lion", 1e-2),
    _scalar("signum", 1e-2, nesterov=True, weight_decay=0.01, weight_decay_method="independent"),
    _scalar("signum", 1e-2, fused=False, momentum=0.0),
    _scalar("rmsprop", 1e-2),
    _scalar("madam", 3e-2, weight_decay=0.01, weight_decay_method="palm"),
    Case("mxnet_signum", lambda params, **o: mxnet.Signum(params, **{"learning_rate": 1e-2, **o}), 1e-2,
         lr_arg="learning_rate"),
    Case("mxnet_signum-sgd", lambda params, **o: mxnet.Signum(params, **{"momentum": 0.0, "wd": 1e-3, **o}), 1e-2,
         lr_arg="learning_rate"),
]


def _on_their_spheres(params: Any) -> list[dict[str, Any]]:
    """One group per matrix with ``hyperball_radius`` = its norm (groups given as dicts: per param of each)."""
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [p],
             "hyperball_radius": float(torch.linalg.vector_norm(p.detach().double()))}
            for g in groups for p in g["params"]]


def _matrix(name: str, lr: float, state_in_param_dtype: bool = True, **kw: Any) -> Case:
    """An orthogonalized optimizer: 2-D params only (the whole-model optimizer takes the rest)."""
    cls = eo.get_optimizer_cls(name)
    label = name if not kw else f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
    return Case(label, lambda params, cls=cls, kw=kw, **o: cls(params, **{**kw, **o}), lr, matrix_only=True,
                state_in_param_dtype=state_in_param_dtype)


CASES += [
    _matrix("muon", 0.05),
    _matrix("muon", 0.05, nesterov=True, weight_decay_method="l2", coefficient_type="polar_express"),
    _matrix("muon", 0.05, scale_mode="shape_scaling", fp32_matmul_prec="highest"),
    _matrix("scion", 0.05),
    _matrix("scion", 0.02, weight_decay=0.0, nesterov=True),
    _matrix("polargrad", 0.5),
    _matrix("mop", 0.5),
    _matrix("spel", 0.05),
    _matrix("adaptive_muon", 0.003),
    _matrix("adaptive_muon", 0.02, moment2_method="normuon"),
    _matrix("adaptive_muon", 0.02, moment2_method="namo"),
    _matrix("normuon", 0.02),
    _matrix("normuon", 0.02, nesterov=False, weight_decay_method="l2", weight_decay=0.01, beta2=0.9),
    _matrix("muown", 0.02, state_in_param_dtype=False),  # Muown keeps its factorized state in float32
    # MuonHyperball keeps each matrix on a sphere: one group per matrix, radius = its norm when built
    Case("muon_hyperball", lambda params, **o: eo.get_optimizer_cls("muon_hyperball")(
        _on_their_spheres(params), **{"hyperball_radius": 1.0, **o}), 0.05, matrix_only=True),
]

def _by_shape(name: str, p: torch.Tensor) -> str:
    return "matrix" if p.ndim >= 2 else "adamw"


CASES += [
    # The whole-model optimizer: matrices to the matrix optimizer, biases to AdamW (``lr`` is the matrix side's).
    # The cases get plain tensors (no names: the default rule would send them all to AdamW, with a warning),
    # so they route by shape: matrices to the matrix side.
    Case("muon_adamw", lambda params, **o: eo.MuonAdamW(params, **{"route": _by_shape, **o}), 2e-2, fp32_state=True),
    Case("muon_adamw-scion", lambda params, **o: eo.MuonAdamW(params, **{"matrix_optimizer": "scion",
                                                                         "route": _by_shape, **o}), 2e-2,
         fp32_state=True),
]

CASES += [
    # PSGD-Kron: any parameter (diagonal factors for 1-D params); float32 state for low-precision params.
    Case("psgd_pro", lambda params, **o: eo.PSGDPro(params, **o), 0.02, state_in_param_dtype=False),
    Case("psgd_pro-l2-clip-diag", lambda params, **o: eo.PSGDPro(params, **{"weight_decay_method": "l2",
         "max_update_rms": 1.0, "max_dense_dim": 8, **o}), 0.02, state_in_param_dtype=False),
]


def _manifold(name: str, lr: float, **kw: Any) -> Case:
    """A manifold optimizer: matrices only, float32 state for low-precision params."""
    return _matrix(name, lr, state_in_param_dtype=False, **kw)


CASES += [
    _manifold("oblique_sgd", 0.05),
    _manifold("oblique_sgd", 0.05, dim=1, weight_decay=0.01, weight_decay_method="l2"),
    _manifold("oblique_adam", 0.02),
    _manifold("oblique_adam", 0.02, dim=1, betas=(0.9, 0.999), weight_decay=0.01),
    _manifold("iso", 0.05),
    _manifold("iso", 0.05, retraction="polar"),
    _manifold("iso", 0.05, retraction="cayley"),
]


def _kron(name: str, lr: float, label: str | None = None, **kw: Any) -> Case:
    """A Kronecker-factored optimizer (SOAP family, Shampoo): any rank, float32 state for low-precision params."""
    cls = eo.get_optimizer_cls(name)
    label = label or (name if not kw else f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}")
    return Case(label, lambda params, cls=cls, kw=kw, **o: cls(params, **{**kw, **o}), lr, state_in_param_dtype=False)


CASES += [
    _kron("soap", 0.03),
    _kron("soap", 0.03, use_kl_shampoo=True, precondition_frequency=2, nesterov=True),
    _kron("soap", 0.03, use_eigh=True, weight_decay_method="l2", max_update_rms=1.0),
    _kron("rekls", 0.03),
    _kron("stacked_soap", 0.03),
    _kron("kl_soap", 0.02),
    _kron("kl_soap", 0.02, nesterov=True, weight_decay_method="l2", max_update_rms=1.0, precondition_frequency=2),
    _kron("rekls_v3", 0.02),
    _kron("kl_m_soap", 0.02),
    _kron("kl_m_soap", 0.02, precondition_frequency=3, weight_decay=0.0),
    _kron("shampoo", 2e-2),
    _kron("shampoo", 3e-3, "shampoo-rmsprop-nesterov-blocked", grafting="rmsprop", betas=(0.9, 0.99), momentum=0.9,
          nesterov=True, max_preconditioner_dim=8, precondition_frequency=2, weight_decay_method="l2"),
    _kron("shampoo", 5e-2, "shampoo-adagrad-newton", grafting="adagrad", root_method="newton",
          precondition_frequency=1, start_preconditioning_step=1, shampoo_beta=1.0),
    _kron("shampoo", 3e-2, "shampoo-none", grafting="none", betas=(0.0, 0.999), precondition_frequency=3,
          start_preconditioning_step=1),
    _matrix("moso", 3e-2, state_in_param_dtype=False),
    _matrix("moso", 3e-2, state_in_param_dtype=False, max_update_rms=1.0, weight_decay_method="l2", use_eigh=True),
]
