r"""Muon: momentum orthogonalized by Newton-Schulz (Keller Jordan, 2024; scaled as in arXiv:2502.16982).

For a matrix parameter :math:`W \in \mathbb{R}^{m \times n}` with momentum direction :math:`D` (see
:class:`OrthogonalizedOptimizer` for weight decay, momentum and Nesterov)::

    U = NS_K(D) * s(m, n) * extra_scale_factor,      W <- W - lr * U

where :math:`NS_K(D) \approx U_D V_D^\top` is :func:`newton_schulz` (``num_ns_steps`` = K steps of
``coefficient_type``) and :math:`s` is :func:`get_muon_scale_factor`:

* ``"spectral"`` (default): :math:`\sqrt{\max(m, n)}`; with ``extra_scale_factor=0.2`` the update has about
  the RMS of an AdamW update (arXiv:2502.16982), so AdamW learning rates carry over;
* ``"shape_scaling"``: :math:`\sqrt{\max(1, m/n)}` (Keller Jordan's original);
* ``"unit_rms_norm"``: :math:`\sqrt{m/n}` (Scion, arXiv:2502.07529).

Defaults: ``lr=3e-4``, ``momentum=0.95``, ``weight_decay=0.01`` decoupled, no Nesterov, ``quintic`` x 5,
``fp32_matmul_prec="medium"`` (bf16 Newton-Schulz on CUDA and on CPUs with bf16 matrix units, AMX-BF16 or
AVX512-BF16, where it is 1.05-10x faster; float32 elsewhere: :func:`~.muon_utils.ns_compute_dtype`).

Beyond the reference, every option is per param group (and survives ``state_dict()``):

* parameters of any rank >= 2: a conv kernel ``[out, in, kh, kw]`` is orthogonalized as ``[out, in*kh*kw]``;
  ``stacked_dims=k`` treats the first ``k`` dims as a stack of independent matrices (e.g. ``stacked_dims=1``
  for MoE expert weights ``[E, out, in]``); the remaining dims are ``[out, *in]``;
* ``split_sizes``: the rows (``out``) of each matrix are split into parts orthogonalized separately, each
  scaled by its own shape (a fused QKV weight: ``split_sizes=(d_q, d_k, d_v)``; put such params in their
  own group);
* ``custom_coefficient_sets`` with ``coefficient_type="custom"``; ``ns_method`` (``"auto"``, ``"plain"``,
  ``"symmetric"``, ``"gram"``, see :mod:`.muon_utils`);
* bf16/fp16 parameters: Newton-Schulz runs in float32 and the float32 update is rounded once into the
  parameter; ``momentum_dtype=torch.float32`` keeps the momentum in float32.

1-D parameters (biases, norms) and scalars are rejected at construction: optimize them with an AdamW-type
optimizer (e.g. ``emerging_optimizers.AdamW``) or a hybrid Muon + AdamW optimizer.

One step batches the matrix work: every parameter is cut into matrices (the jobs), same-shape matrices are
stacked and orthogonalized as one batch, then the updates are applied; the result equals the per-parameter
loop (a distributed version only changes where the buckets run).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT, read_only_default
from emerging_optimizers.distributed.ownership import matrix_ns_flops
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.orthogonalized_optimizers.muon_utils import (
    NSCoeffT,
    NSMethodT,
    check_ns_options,
    newton_schulz,
    prefers_batching,
)
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import (
    OrthogonalizedOptimizer,
    WeightUpdateHook,
)
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import FP32MatmulPrecT, check_choice, check_positive

__all__ = ["Muon", "MuonScaleT", "check_scale_mode", "get_muon_scale_factor", "scaled_newton_schulz"]

MuonScaleT = Literal["shape_scaling", "spectral", "unit_rms_norm"]
_SCALE_MODES: tuple[str, ...] = get_args(MuonScaleT)
_NS_METHODS: tuple[str, ...] = get_args(NSMethodT)
# Largest number of elements stacked into one Newton-Schulz batch (bounds the transient memory).
_MAX_BATCH_NUMEL = 1 << 25


def get_muon_scale_factor(size_out: int, size_in: int, mode: MuonScaleT = "spectral") -> float:
    """Scale of the orthogonalized update of a ``size_out x size_in`` matrix (module docstring)."""
    check_scale_mode(mode)
    if mode == "shape_scaling":
        return math.sqrt(max(1.0, size_out / size_in))
    if mode == "spectral":
        return math.sqrt(max(size_out, size_in))
    return math.sqrt(size_out / size_in)  # unit_rms_norm


def check_scale_mode(mode: Any) -> None:
    """``mode`` must be a :data:`MuonScaleT`; ``ValueError`` listing the choices otherwise."""
    if mode not in _SCALE_MODES:
        raise ValueError(
            f"Invalid mode for Muon update scale factor (scale_mode): {mode!r}; choose one of "
            f"{', '.join(map(repr, _SCALE_MODES))}."
        )


def scaled_newton_schulz(
    x: torch.Tensor,
    *,
    num_ns_steps: int = 5,
    coefficient_type: NSCoeffT = "quintic",
    custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
    scale_mode: MuonScaleT = "spectral",
    extra_scale_factor: float = 1.0,
    ns_method: NSMethodT = "auto",
    ns_compute_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    use_syrk: bool = False,
) -> torch.Tensor:
    """Muon's update of a matrix or a batch ``[..., m, n]``: ``NS_K(x) * s(m, n) * extra_scale_factor``."""
    u = newton_schulz(
        x,
        num_ns_steps,
        coefficient_type,
        custom_coefficient_sets,
        use_syrk=use_syrk,
        method=ns_method,
        compute_dtype=ns_compute_dtype,
        out_dtype=out_dtype,
    )
    return u.mul_(get_muon_scale_factor(x.shape[-2], x.shape[-1], scale_mode) * extra_scale_factor)


@dataclass
class _MatrixJob:
    """Rows ``rows`` of the ``[B, out, in]`` matrix view of parameter ``index``: ``B`` independent matrices."""

    index: int
    rows: slice
    src: torch.Tensor  # [B, rows, in] view of the direction
    whole: bool = False  # the job is the whole parameter (no row split)


def _matrix_view(x: torch.Tensor, stacked_dims: int) -> torch.Tensor:
    """``[*stack, out, *in]`` -> ``[prod(stack), out, prod(in)]`` (a view when ``x`` is contiguous)."""
    shape = x.shape
    batch = math.prod(shape[:stacked_dims])
    return x.reshape(batch, shape[stacked_dims], math.prod(shape[stacked_dims + 1 :]))


def _row_slices(rows: int, split_sizes: Sequence[int] | None) -> list[slice]:
    if not split_sizes:
        return [slice(0, rows)]
    bounds = [0, *itertools.accumulate(split_sizes)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


@register_optimizer("muon")
class Muon(OrthogonalizedOptimizer):
    """Muon (module docstring): momentum, Newton-Schulz orthogonalization, shape scaling.

    Args:
        params: parameters or param groups (every parameter must have ``ndim - stacked_dims >= 2``).
        lr: learning rate. momentum: EMA coefficient in [0, 1). weight_decay: coefficient (>= 0).
        nesterov, weight_decay_method, fp32_matmul_prec: see :class:`OrthogonalizedOptimizer`.
        coefficient_type: Newton-Schulz coefficient set. num_ns_steps: iterations (>= 1).
        scale_mode: ``"spectral" | "shape_scaling" | "unit_rms_norm"``. extra_scale_factor: multiplies it.
        custom_coefficient_sets: (a, b, c) tuples for ``coefficient_type="custom"`` (cycled).
        use_syrk: under ``fp32_matmul_prec="medium"``, compute the symmetric products of every Newton-Schulz
            step with :func:`~.muon_utils.newton_schulz_step_tsyrk` (matrices whose dims are multiples of 8;
            others fall back to GEMM, as in the reference). Needs ``ns_method="auto"``. Unlike the reference,
            it is never switched off for lack of Triton or of a given GPU: the symmetric step runs everywhere.
        weight_update_hook: a :class:`WeightUpdateHook`.
        ns_method: Newton-Schulz computation (``"auto"`` picks the cheapest exact variant per shape).
        ns_compute_dtype: Newton-Schulz compute dtype. ``None``: :func:`~.muon_utils.ns_compute_dtype`, i.e.
            under ``"medium"`` bf16 on CUDA and on CPUs with bf16 matrix units (AMX-BF16: ~10x per matmul;
            AVX512-BF16: 1.05-3.3x per iteration, measured on two AMD EPYCs) for matrices at least
            ``muon_utils.CPU_BF16_MIN_DIM`` (128) on their short side, float32 otherwise (smaller matrices, and
            AVX2-only CPUs, where bf16 is emulated and slower). ``torch.float32`` gives the same result on every
            machine.
        stacked_dims: leading dims indexing independent matrices (0 = conv-style flattening of ``in``).
        split_sizes: row split of each matrix into separately orthogonalized parts (e.g. fused QKV).
        momentum_dtype: dtype of the momentum buffer (``None``: the parameter's).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.01,
        *,
        nesterov: bool = False,
        weight_decay_method: WeightDecayT = "decoupled",
        fp32_matmul_prec: FP32MatmulPrecT = "medium",
        coefficient_type: NSCoeffT = "quintic",
        num_ns_steps: int = 5,
        scale_mode: MuonScaleT = "spectral",
        extra_scale_factor: float = 1.0,
        custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
        use_syrk: bool = False,
        weight_update_hook: WeightUpdateHook[Any] | None = None,
        ns_method: NSMethodT = "auto",
        ns_compute_dtype: torch.dtype | None = None,
        stacked_dims: int = 0,
        split_sizes: Sequence[int] | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: NonfiniteT = "skip",
        process_group: Any = None,
        gather_dtype: torch.dtype | None = None,
        reduce_gradients: bool = False,
    ) -> None:
        if not isinstance(use_syrk, bool):
            raise TypeError(f"Invalid use_syrk: {use_syrk!r}; it must be True or False.")
        super().__init__(
            params,
            lr,
            momentum,
            weight_decay,
            nesterov=nesterov,
            weight_decay_method=weight_decay_method,
            fp32_matmul_prec=fp32_matmul_prec,
            scaled_orthogonalize_fn=self._default_scaled_orthogonalize,
            weight_update_hook=weight_update_hook,
            coefficient_type=coefficient_type,
            num_ns_steps=num_ns_steps,
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            custom_coefficient_sets=custom_coefficient_sets,
            use_syrk=use_syrk,
            ns_method=ns_method,
            ns_compute_dtype=ns_compute_dtype,
            stacked_dims=stacked_dims,
            split_sizes=None if split_sizes is None else tuple(split_sizes),
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, process_group=process_group,
            gather_dtype=gather_dtype, reduce_gradients=reduce_gradients,
        )

    # ------------------------------------------------------------------ read-only views of the defaults
    # (per-group values live in param_groups; the reference library exposes these as read-only attributes)
    num_ns_steps = read_only_default("num_ns_steps")
    coefficient_type = read_only_default("coefficient_type")
    scale_mode = read_only_default("scale_mode")
    extra_scale_factor = read_only_default("extra_scale_factor")
    use_syrk = read_only_default("use_syrk")

    def _default_scaled_orthogonalize(self, x: torch.Tensor) -> torch.Tensor:
        """``scaled_orthogonalize_fn`` of the base: :func:`scaled_newton_schulz` with the default group."""
        return scaled_newton_schulz(x, **self._ns_kwargs(self.defaults))

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_ns_options(group["num_ns_steps"], group["coefficient_type"], group["custom_coefficient_sets"])
        check_scale_mode(group["scale_mode"])
        check_positive("extra_scale_factor", group["extra_scale_factor"])
        check_choice("ns_method", group["ns_method"], _NS_METHODS)
        if not isinstance(group["use_syrk"], bool):
            raise TypeError(f"Invalid use_syrk: {group['use_syrk']!r}; it must be True or False.")
        if group["use_syrk"] and group["ns_method"] != "auto":
            raise ValueError(f"use_syrk=True chooses the products itself; leave ns_method='auto' "
                             f"(got {group['ns_method']!r}).")
        cdt = group["ns_compute_dtype"]
        if cdt is not None and cdt not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(
                f"Invalid ns_compute_dtype: {cdt!r}; use None (automatic) or a floating dtype such as torch.bfloat16."
            )
        sd = group["stacked_dims"]
        if isinstance(sd, bool) or not isinstance(sd, int) or sd < 0:
            raise ValueError(f"Invalid stacked_dims: {sd!r}; it must be an integer >= 0.")
        ss = group["split_sizes"]
        if ss is not None and (
            isinstance(ss, (str, bytes))
            or not isinstance(ss, Sequence)
            or not ss
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in ss)
        ):
            raise ValueError(f"Invalid split_sizes: {ss!r}; use None or a sequence of integers >= 1.")

    def _validate_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        super()._validate_param(p, group)  # subclasses limited to plain matrices set ``param_ndim``
        sd = group["stacked_dims"]
        if p.ndim - sd < 2:
            if p.ndim < 2:
                raise ValueError(
                    f"Muon orthogonalizes matrices, got a {p.ndim}-D parameter of shape {tuple(p.shape)} "
                    "(a bias, norm weight or scalar); optimize those with an AdamW-type optimizer, e.g. "
                    "emerging_optimizers.AdamW in a second optimizer or a hybrid Muon + AdamW optimizer."
                )
            raise ValueError(
                f"stacked_dims={sd} leaves fewer than 2 matrix dims in a parameter of shape {tuple(p.shape)}; "
                f"use stacked_dims <= {p.ndim - 2}."
            )
        if not p.is_floating_point():
            raise ValueError(f"Muon needs floating-point parameters, got {p.dtype} (shape {tuple(p.shape)}).")
        ss = group["split_sizes"]
        if ss is not None and sum(ss) != p.shape[sd]:
            raise ValueError(
                f"split_sizes={tuple(ss)} sums to {sum(ss)}, but the parameter of shape {tuple(p.shape)} has "
                f"{p.shape[sd]} rows (dim {sd}); put parameters with other row counts in another param group."
            )

    # ------------------------------------------------------------------ orthogonalization
    @staticmethod
    def _ns_kwargs(group: dict[str, Any]) -> dict[str, Any]:
        return {
            "num_ns_steps": group["num_ns_steps"],
            "coefficient_type": group["coefficient_type"],
            "custom_coefficient_sets": group["custom_coefficient_sets"],
            "scale_mode": group["scale_mode"],
            "extra_scale_factor": group["extra_scale_factor"],
            "ns_method": group["ns_method"],
            "ns_compute_dtype": group["ns_compute_dtype"],
            "use_syrk": group["use_syrk"],
        }

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Muon's update for one parameter of any supported layout (``kwargs``: the group's options)."""
        return self._muon_updates([grad], kwargs)[0]

    def _orthogonalize_params(
        self, params: list[torch.Tensor], directions: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        if type(self).orthogonalize is not Muon.orthogonalize:  # a subclass customises per-param work
            return super()._orthogonalize_params(params, directions, group)
        return self._muon_updates(directions, group)

    def _bucket_key(self, p: torch.Tensor, group: dict[str, Any]) -> Hashable:
        """The shapes of the param's matrix jobs (stacked matrices and row splits batch across params)."""
        sd = group["stacked_dims"]
        inner = math.prod(p.shape[sd + 1 :])
        shapes = tuple(sorted({(s.stop - s.start, inner) for s in _row_slices(p.shape[sd], group["split_sizes"])}))
        return (shapes, self.state[p]["momentum_buffer"].dtype, p.device)

    def _ns_cost(self, p: torch.Tensor, group: dict[str, Any]) -> float:
        """Newton-Schulz FLOPs of the param's matrix jobs (stacked matrices, row splits): balances the owners."""
        sd = group["stacked_dims"]
        batch, inner = math.prod(p.shape[:sd]), math.prod(p.shape[sd + 1 :])
        return sum(matrix_ns_flops(s.stop - s.start, inner, group["num_ns_steps"], batch)
                   for s in _row_slices(p.shape[sd], group["split_sizes"]))

    def _matrix_jobs(self, directions: list[torch.Tensor], group: dict[str, Any]) -> list[_MatrixJob]:
        """Cut every direction into independent matrix jobs (stack, conv flattening, row splits)."""
        jobs = []
        for i, d in enumerate(directions):
            view = _matrix_view(d, group["stacked_dims"])
            slices = _row_slices(view.shape[1], group["split_sizes"])
            if len(slices) == 1:
                jobs.append(_MatrixJob(i, slices[0], view, whole=True))
                continue
            for rows in slices:
                jobs.append(_MatrixJob(i, rows, view[:, rows]))
        return jobs

    def _run_bucket(self, jobs: list[_MatrixJob], group: dict[str, Any], out_dtype: torch.dtype) -> list[torch.Tensor]:
        """Orthogonalize same-shape jobs as batches; returns one ``[B, rows, in]`` result per job."""
        kwargs = self._ns_kwargs(group)
        src = jobs[0].src
        if not prefers_batching(src.device, src.shape[-2], src.shape[-1]):  # large CPU matrices: one at a time
            return [scaled_newton_schulz(j.src, out_dtype=out_dtype, **kwargs) for j in jobs]
        results: list[torch.Tensor] = []
        start = 0
        while start < len(jobs):
            stop, numel = start, 0
            while stop < len(jobs) and (stop == start or numel + jobs[stop].src.numel() <= _MAX_BATCH_NUMEL):
                numel += jobs[stop].src.numel()
                stop += 1
            chunk = jobs[start:stop]
            batch = chunk[0].src if len(chunk) == 1 else torch.cat([j.src for j in chunk])
            out = scaled_newton_schulz(batch, out_dtype=out_dtype, **kwargs)
            results.extend(out.split([j.src.shape[0] for j in chunk]) if len(chunk) > 1 else (out,))
            start = stop
        return results

    def _muon_updates(self, directions: list[torch.Tensor], group: dict[str, Any]) -> list[torch.Tensor]:
        """Updates of all ``directions``: jobs bucketed by shape, each bucket orthogonalized as a batch."""
        jobs = self._matrix_jobs(directions, group)
        buckets: dict[tuple[Any, ...], list[_MatrixJob]] = defaultdict(list)
        for job in jobs:
            buckets[(tuple(job.src.shape[1:]), job.src.device, job.src.dtype)].append(job)
        updates: list[torch.Tensor | None] = [None] * len(directions)
        for bucket in buckets.values():
            dtype = bucket[0].src.dtype
            out_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
            for job, res in zip(bucket, self._run_bucket(bucket, group, out_dtype)):
                d = directions[job.index]
                if job.whole:
                    updates[job.index] = res.reshape(d.shape)  # the whole parameter in one job
                    continue
                if updates[job.index] is None:
                    updates[job.index] = torch.empty(d.shape, dtype=out_dtype, device=d.device)
                target = _matrix_view(updates[job.index], group["stacked_dims"])  # type: ignore[arg-type]
                target[:, job.rows].copy_(res)
        return updates  # type: ignore[return-value]
