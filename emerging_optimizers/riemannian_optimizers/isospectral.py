r"""Iso: the isospectral optimizer, which moves the singular vectors of a matrix and never its singular values.

*ISO: An RLVR-Native Optimization Stack*, arXiv:2607.19331 (designed for reinforcement learning with verifiable
rewards, e.g. LLM reasoning post-training; nothing here depends on an RL interface).

At the first step each matrix is factored once, by a thin SVD :math:`W = U\,\mathrm{diag}(\Sigma)\,V^\top`
(:math:`U \in \mathbb{R}^{m\times r}`, :math:`V \in \mathbb{R}^{n\times r}`, :math:`r = \min(m, n)`), in float32
(float64 for float64 params). :math:`\Sigma` is then fixed and the two Stiefel factors move. With the
Euclidean gradient :math:`G` of :math:`W`, momentum :math:`\mu` and learning rate :math:`\eta`::

    G_U = (G V) diag(S),   G_V = (G^T U) diag(S)          gradients of L(U diag(S) V^T) w.r.t. U and V
    M_U <- mu M_U + G_U,   M_V <- mu M_V + G_V            heavy-ball momentum (Euclidean, no dampening)
    U <- Retr(U, M_U, lr),  V <- Retr(V, M_V, lr)
    W <- U diag(S) V^T                                      W is rewritten; its singular values stay S

Retractions (``retraction``, a :data:`RetractionT`):

* ``"qr"`` (default): ``Q`` of the thin QR of ``Y = U - lr*M_U``, columns signed so that ``diag(R) >= 0``
  (the unique such ``Q``; without the fix LAPACK's sign choice would flip columns). O(m r^2).
* ``"polar"``: ``A B^T`` from the thin SVD ``Y = A diag(s) B^T``, the orthonormal matrix nearest to ``Y``.
  O(m r^2), a larger constant than QR.
* ``"cayley"``: the Cayley curve ``(I - lr/2 S)^{-1} (I + lr/2 S) U`` with the skew matrix
  ``S = D U^T - U D^T``, ``D = -M_U`` (Wen and Yin's curve; it never leaves the manifold, so no renormalisation).
  **It builds and solves an m x m system for U and n x n for V** (O(m^3 + n^3) time, O(m^2 + n^2) memory):
  for an LLM embedding or LM head (m ~ 1e5) that is out of reach, use ``"qr"``. Since ``S`` has rank <= 2r, the
  Sherman-Morrison-Woodbury form would solve a 2r x 2r system instead; it is not implemented here. The curve is
  orthogonal only in exact arithmetic and is never re-orthonormalised, so rounding accumulates slowly (in our
  float32 tests about 40 ulps in ``U^T U`` after 1,000 steps, against 3-7 for ``"qr"`` and ``"polar"``).

Defaults (the reference's): ``lr=1e-3``, ``momentum=0.9``, ``retraction="qr"`` (the cheapest),
``fp32_matmul_prec="highest"`` (the factor products decide how well ``W`` keeps its spectrum; TF32 would
round them to ~1e-3). No weight decay: decay would shrink the singular values, which Iso keeps by design.

Only 2-D parameters (an ``nn.Linear`` weight, an embedding): a conv kernel or a stack of matrices has no
single spectrum to keep (reshape it yourself if ``[out, -1]`` is what you mean).

State (float32; float64 for float64 params): ``step`` (int), ``u`` (m, r), ``sigma`` (r), ``v`` (n, r),
``momentum_u`` (m, r), ``momentum_v`` (n, r). The factors are taken from the parameter at its first step
(``step == 0``), so state allocated eagerly (``_init_group(..., skip_non_grad_params=False)``, zeros) or loaded
from such a checkpoint is filled from the weights the training actually starts from. bf16/fp16 params are
written from the float32 factors once per step (their singular values are then those of ``S`` up to the
format's rounding of ``W``; ``sigma`` itself never changes).

Differences from the reference library: ``retraction`` and ``fp32_matmul_prec`` live in the param group
(per-group values, saved by ``state_dict()``; assigning ``opt.fp32_matmul_prec`` sets every group); float64
params keep float64 factors (the reference rounds them to float32); non-2-D params and bad hyperparameters
raise ``ValueError`` at construction (the reference: at the first ``step()``); the factors are (re)read from
the weights at step 0 rather than when the state is created; the Cayley solve uses ``torch.linalg.solve_ex``
(no host synchronisation for its error check; the SVDs of the first step and of ``"polar"`` may still synchronise
on CUDA, where ``torch.linalg.svd`` checks convergence); ``lr = 0`` leaves the parameter and the factors bit-for-bit
untouched (retracting a point of the manifold gives the point) while the momenta still advance.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT, group_default
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.riemannian_optimizers._base import ManifoldOptimizer, state_dtype
from emerging_optimizers.utils import FP32MatmulPrecT, check_beta, check_choice, check_nonneg, fp32_matmul_precision

__all__ = [
    "RETRACTIONS",
    "Iso",
    "RetractionT",
    "calculate_iso_update",
    "cayley_retraction",
    "iso_factor_gradients",
    "iso_factorize",
    "iso_momentum_",
    "polar_retraction",
    "qr_retraction",
    "retract",
]

RetractionT = Literal["qr", "polar", "cayley"]
RETRACTIONS: tuple[str, ...] = get_args(RetractionT)
_FP32_MATMUL_PRECS = ("highest", "high", "medium")


# ---------------------------------------------------------------------------------------------- pure math
def iso_factorize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``W = U diag(S) V^T`` in float32 (float64 for float64 input): returns ``(U, S, V)``."""
    u, sigma, vh = torch.linalg.svd(w.to(state_dtype(w)), full_matrices=False)
    return u, sigma, vh.mT.contiguous()


def qr_retraction(y: torch.Tensor) -> torch.Tensor:
    """The ``Q`` factor of the thin QR of ``y`` (``[..., m, r]``, m >= r), signed so that ``diag(R) >= 0``."""
    q, r = torch.linalg.qr(y, mode="reduced")
    signs = torch.diagonal(r, dim1=-2, dim2=-1).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def polar_retraction(y: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor ``A B^T`` of ``y = A diag(s) B^T`` (thin SVD), nearest to ``y``."""
    a, _, bh = torch.linalg.svd(y, full_matrices=False)
    return a @ bh


def cayley_retraction(point: torch.Tensor, momentum: torch.Tensor, lr: float) -> torch.Tensor:
    """Wen-Yin's Cayley curve from ``point`` (orthonormal columns) along ``D = -momentum``, at step ``lr``.

    ``(I - lr/2 S)^{-1} (I + lr/2 S) point`` with ``S = D point^T - point D^T`` (skew, m x m): an m x m solve.
    """
    m = point.shape[-2]
    skew = point @ momentum.mT - momentum @ point.mT  # D P^T - P D^T with D = -momentum
    eye = torch.eye(m, dtype=point.dtype, device=point.device)
    lhs = eye - (0.5 * lr) * skew
    rhs = point + (0.5 * lr) * (skew @ point)
    return torch.linalg.solve_ex(lhs, rhs).result


def retract(point: torch.Tensor, momentum: torch.Tensor, lr: float, retraction: str) -> torch.Tensor:
    """The new Stiefel factor: ``qr``/``polar`` of ``point - lr*momentum``, or the ``cayley`` curve."""
    if retraction == "qr":
        return qr_retraction(point - lr * momentum)
    if retraction == "polar":
        return polar_retraction(point - lr * momentum)
    if retraction == "cayley":
        return cayley_retraction(point, momentum, lr)
    check_choice("retraction", retraction, RETRACTIONS)
    raise AssertionError("unreachable")


def iso_factor_gradients(
    grad: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``G_U = (G V) diag(S)`` and ``G_V = (G^T U) diag(S)``, the gradients of ``L(U diag(S) V^T)``."""
    scale = sigma.unsqueeze(-2)
    return (grad @ v) * scale, (grad.mT @ u) * scale


def iso_momentum_(
    grad: torch.Tensor,
    u: torch.Tensor,
    sigma: torch.Tensor,
    v: torch.Tensor,
    momentum_u: torch.Tensor,
    momentum_v: torch.Tensor,
    momentum: float,
) -> None:
    """Heavy-ball momenta of the factors, in place: ``M_U <- mu*M_U + G_U``, ``M_V <- mu*M_V + G_V``."""
    grad_u, grad_v = iso_factor_gradients(grad, u, sigma, v)
    momentum_u.mul_(momentum).add_(grad_u)
    momentum_v.mul_(momentum).add_(grad_v)


def calculate_iso_update(
    grad: torch.Tensor,
    u: torch.Tensor,
    sigma: torch.Tensor,
    v: torch.Tensor,
    momentum_u: torch.Tensor,
    momentum_v: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    retraction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Iso step of the factors: the momenta are updated in place, the new ``(U, V)`` returned.

    ``grad`` must be in the factors' dtype. The caller writes ``W = U diag(S) V^T``.
    """
    iso_momentum_(grad, u, sigma, v, momentum_u, momentum_v, momentum)
    return retract(u, momentum_u, lr, retraction), retract(v, momentum_v, lr, retraction)


# ---------------------------------------------------------------------------------------------- optimizer
@register_optimizer("iso")
class Iso(ManifoldOptimizer):
    """Isospectral optimizer for 2-D parameters (module docstring): ``W = U diag(S) V^T`` with ``S`` fixed.

    Args:
        params: 2-D parameters or param groups.
        lr: learning rate (1e-3).
        momentum: heavy-ball coefficient in [0, 1) (0.9): ``M <- mu*M + G_U``, no dampening.
        retraction: ``"qr"`` (default), ``"polar"`` or ``"cayley"`` (an m x m solve, see the module docstring).
        fp32_matmul_prec: ``torch.set_float32_matmul_precision`` during the step (``"highest"``).
    """

    param_hint = ("Iso keeps the spectrum of a matrix; optimize biases and norm weights with an AdamW-type optimizer "
                  "(emerging_optimizers.AdamW), and reshape conv kernels to 2-D yourself if [out, -1] is meant.")
    # the reference keeps it on ``self``; here each group has its own (assigning sets every group)
    fp32_matmul_prec = group_default("fp32_matmul_prec")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        retraction: RetractionT = "qr",
        *,
        fp32_matmul_prec: FP32MatmulPrecT = "highest",
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, retraction=retraction, fp32_matmul_prec=fp32_matmul_prec)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_beta("momentum", group["momentum"])
        check_choice("retraction", group["retraction"], RETRACTIONS)
        check_choice("fp32_matmul_prec", group["fp32_matmul_prec"], _FP32_MATMUL_PRECS)

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        m, n = p.shape
        r = min(m, n)
        dtype, device = state_dtype(p), p.device

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        # the factors are filled from the weights at the first step (see the module docstring)
        return {"step": 0, "u": zeros(m, r), "sigma": zeros(r), "v": zeros(n, r), "momentum_u": zeros(m, r),
                "momentum_v": zeros(n, r)}

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr = group["lr"]
        for p in params:
            assert p.grad is not None
            state = self.state[p]
            if state["step"] == 0:  # factor the weights the training starts from
                state["u"], state["sigma"], state["v"] = iso_factorize(p.detach())
            u, sigma, v = state["u"], state["sigma"], state["v"]
            grad = p.grad.to(u.dtype)
            with fp32_matmul_precision(group["fp32_matmul_prec"]):
                if lr == 0:  # a zero step: the factors and W stay (see the module docstring)
                    iso_momentum_(grad, u, sigma, v, state["momentum_u"], state["momentum_v"], group["momentum"])
                else:
                    u, v = calculate_iso_update(grad, u, sigma, v, state["momentum_u"], state["momentum_v"], lr=lr,
                                                momentum=group["momentum"], retraction=group["retraction"])
                    state["u"], state["v"] = u, v
                    scaled_u = u * sigma
                    if p.dtype == u.dtype and p.is_contiguous():
                        torch.matmul(scaled_u, v.mT, out=p)
                    else:
                        p.copy_(scaled_u @ v.mT)
            state["step"] += 1
