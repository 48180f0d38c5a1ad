r"""MuonAdamW: one optimizer for a whole model, orthogonalized updates for hidden matrices and AdamW elsewhere.

Muon and its relatives (:class:`OrthogonalizedOptimizer` subclasses) update matrices only; the usual recipe
(Keller Jordan's Muon; Moonlight, arXiv:2502.16982) trains the hidden matrices with Muon and the embeddings,
the output head, norms and biases with AdamW (arXiv:1711.05101). ``MuonAdamW`` does this in one optimizer:

* **matrix side** (hidden matrices, conv kernels): the ``matrix_optimizer``'s step, e.g. Muon's
  :math:`M \leftarrow \mu M + (1-\mu) g,\; W \leftarrow W - \eta\, \mathrm{NS}_5(M)\, s(m, n)`, with ``lr``,
  ``momentum``, ``weight_decay`` and ``matrix_kwargs``;
* **adamw side** (everything else): :class:`~emerging_optimizers.scalar_optimizers.AdamW` with ``adamw_lr``,
  ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay`` and ``adamw_kwargs``.

Routing rule. Pass the model itself, ``MuonAdamW(model)``: then the rule knows names, module types and the
model's output sizes. ``MuonAdamW(model.named_parameters())`` (or groups of ``(name, tensor)`` pairs) gives it
names only, which suffices for the usual names (all rules but 4 and the module-type half of 2). A parameter
goes to the matrix side iff

1. it is a real matrix: floating point, ``ndim >= 2``, and its ``[shape[0], -1]`` view has at least 2 rows and
   2 columns (a ``[1, 1, d]`` class token, a ``[1, n, d]`` position table or a ``[C, 1, 1, 1]`` kernel is a
   vector in disguise);
2. it is no embedding table: not the weight of an ``nn.Embedding`` / ``nn.EmbeddingBag`` (module form, whichever
   module owns a tied weight: GPT-2's ``lm_head``, ``embed.weight = head.weight``), no component of its dotted
   name contains ``"embed"`` or is one of :data:`EMBEDDING_NAMES` (``wte``, ``wpe``, ``tok_emb``,
   ``relative_attention_bias``, ...), the module that owns it is not :data:`EMBEDDING_OWNER_NAMES` ``shared``
   outside numbered blocks (T5's and BART's ``shared.weight``), and its own name does not contain ``"token"``
   (``cls_token``, ``register_tokens``);
3. it is in no output head: no component of its name is one of :data:`HEAD_NAMES` (``head``, ``lm_head``,
   ``classifier``, ``score``, ``qa_outputs``, ``cls``, ...; everything under such a module is head, e.g.
   RoBERTa's ``classifier.dense``), and the module that owns it is not one of :data:`OUTPUT_OWNER_NAMES`
   (``output``, ``fc``) outside numbered blocks: Llama's ``output.weight`` and ResNet's ``fc.weight`` are heads,
   BERT's ``encoder.layer.0.attention.output.dense.weight`` and a ``blocks.0.fc.weight`` are not. ``pooler`` is
   no head name: BERT's ``pooler.dense`` is hidden x hidden (a pooler that projects to the labels is caught by
   rule 4);
4. (module form) it is not the weight of the model's output ``nn.Linear``: the last ``nn.Linear`` in
   ``model.modules()`` order whose ``out_features`` is an output size of the model (:data:`OUTPUT_SIZE_ATTRS`
   ``vocab_size`` / ``num_labels`` / ``num_classes`` of ``model.config`` (Hugging Face) or of the model, or
   the rows of one of its embedding tables) and not a hidden width (the input width of some Linear, conv or
   norm: this keeps the default ``num_labels=2`` of every Hugging Face config, or 1024 positions in a model of
   width 1024, from picking a hidden layer). A model that declares no output size at all (a plain
   ``nn.Sequential`` MLP) has its last ``nn.Linear`` as head, under the same width condition;
5. it has a name: matrices without one (``model.parameters()``, plain tensors in an unpinned group) go to the
   AdamW side, the conservative one, and the constructor warns once (``UserWarning``). Pinned groups and
   ``route=`` get no warning.

Conv nets: every conv kernel passing rule 1 is a matrix (its ``[out_channels, -1]`` view, ``C_out x
C_in*k*k``), hidden convs, ResNet's ``downsample.0`` 1x1 convs and the stem conv alike; that is Keller Jordan's
recipe (for a conv net, Muon gets all conv filters, AdamW the classifier head, gains and biases). The stem is a
dense linear map of pixel patches, not a lookup table like an embedding (the stem of Keller Jordan's CIFAR-10
speedrun is a whitening conv whose weight is frozen, on neither side). A depthwise kernel ``[C, 1, k, k]`` is a
``C x k*k`` matrix: orthogonalizing it equalizes the at most ``k*k`` directions of the filter bank, like any tall
matrix, so it stays on the matrix side for ``k*k >= 2``; a ``[C, 1, 1, 1]`` one is a per-channel gain (rule 1).
A conv stem named as an embedding (ViT's ``patch_embeddings.projection``, timm's ``patch_embed.proj``) follows
rule 2.

``route=callable(name, param) -> "matrix" | "adamw"`` replaces the rule for unpinned groups (unnamed params get
``""``; only floating-point params with ``ndim >= 2`` may go to the matrix side); :func:`default_route` is the
rule by name and shape (rules 1, 3, 5 and the names of 2), for a ``route`` to fall back on.
:meth:`MuonAdamW.summary` prints where every parameter went and why.

Param groups. ``params`` may be param groups (dicts). A group may pin its side with ``"side": "matrix" |
"adamw"`` (or Keller Jordan's ``"use_muon": True | False``); a pinned group's options are that side's own
(``lr``, ``betas``, ... for AdamW; ``adamw_``-prefixed names are accepted there too). An unpinned group is split
by the rule: its plain options (``lr``, ``momentum``, ``weight_decay``, Muon options) apply to its matrices,
``adamw_``-prefixed ones (``adamw_lr``, ``adamw_betas``, ...) to its other params, ``fp32_state`` to both.
Internally every group holds one side only and carries ``"side"``; ``param_groups`` is the one list of these
groups (the inner optimizers hold the same dict objects), so ``state_dict()`` / ``load_state_dict()`` and LR
schedulers work on ``MuonAdamW`` itself. A scheduler scales every group's ``lr`` by the same factor, so the
ratio of the two sides' learning rates is kept.

Defaults and why (``docs/sweeps-muon-adamw.md``: every sweep with its command, 3 seeds on each of the three
``emopt`` tasks, 10 on the MLP, against torch's Muon recipe). Matrix side: ``matrix_optimizer="normuon"``
(:class:`NorMuon`: Muon whose orthogonalized update has its rows equalised by a running second moment),
``nesterov=True``, ``lr=2e-3``, ``momentum=0.95``, and NorMuon's ``weight_decay=1.0`` (``weight_decay=None``
here means the matrix optimizer's own default: the weights shrink by ``lr * 1.0``, 0.2% a step at the peak lr,
the per-step decay of the public recipes: torch's 0.04 x 0.1, Moonlight's 2e-2 x 0.1); quintic Newton-Schulz,
spectral scaling. AdamW side: ``adamw_lr=3e-3``, ``adamw_betas=(0.9, 0.95)``, ``adamw_eps=1e-8``,
``adamw_weight_decay=0.0`` (norms, biases and embeddings are usually not decayed). What moved the char-LM's
validation loss (3 seeds): the former default lr 5e-3 sat past a cliff (2.467 +- 0.138; Muon at its best lr
2e-3: 2.172), Nesterov -0.049, NorMuon -0.025, weight decay 1.0 instead of 0.01 -0.007 at lr 2e-3 (and it is
what closes most of the gap to torch's recipe on the over-fitting MLP: 0.169 -> 0.158); weight decay 0.1,
``adamw_lr`` x0.5/x2, betas (0.9, 0.99), ``polar_express``/``simple`` coefficients stayed within the seed
spread. Against torch's recipe at its best lr: char-LM 2.092 +- 0.011 vs 2.129 +- 0.017, ViT 0.265 +- 0.011 vs
0.281 +- 0.020, MLP 0.158 +- 0.019 vs 0.143 +- 0.032 (within one seed std). Larger models want smaller
learning rates, as with AdamW.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from emerging_optimizers import registry
from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT
from emerging_optimizers.distributed.sharding import is_flat_param
from emerging_optimizers.orthogonalized_optimizers.muon import Muon  # noqa: F401 - registers "muon"
from emerging_optimizers.orthogonalized_optimizers.normuon import NorMuon  # noqa: F401 - registers "normuon"
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.adam import AdamW
from emerging_optimizers.utils import check_betas, check_nonneg

__all__ = ["MuonAdamW", "SideT", "RouteFn", "default_route", "matrix_optimizer_names", "EMBEDDING_NAMES",
           "EMBEDDING_OWNER_NAMES", "HEAD_NAMES", "OUTPUT_OWNER_NAMES", "OUTPUT_SIZE_ATTRS"]

SideT = Literal["matrix", "adamw"]
SIDES: tuple[str, ...] = get_args(SideT)
RouteFn = Callable[[str, torch.Tensor], str]

#: Name components that mark an embedding table (besides any component containing ``"embed"``).
EMBEDDING_NAMES: tuple[str, ...] = ("wte", "wpe", "emb", "tok_emb", "pos_emb", "word_emb", "relative_attention_bias")
#: Names of a module that is an embedding table when it owns the parameter directly, outside numbered blocks
#: (T5's and BART's ``shared.weight``; DeepSeek's ``mlp.shared_experts`` is another name).
EMBEDDING_OWNER_NAMES: tuple[str, ...] = ("shared",)
#: Name components that mark an output head anywhere in the name: everything under such a module is head
#: (``head.fc.weight``, RoBERTa's ``classifier.dense.weight``, BERT's ``cls.predictions.transform.dense.weight``).
HEAD_NAMES: tuple[str, ...] = ("head", "lm_head", "classifier", "cls_head", "out_head", "output_head", "score",
                               "qa_outputs", "cls")
#: Names of a module that is an output head when it owns the parameter directly, outside numbered blocks
#: (Llama's ``output.weight``, ResNet's ``fc.weight``; not BERT's ``layer.0.attention.output.dense.weight``, nor
#: a ``blocks.0.fc.weight``).
OUTPUT_OWNER_NAMES: tuple[str, ...] = ("output", "fc")
#: Attributes of the model (and of its ``config``) that give an output size (the module form's rule 4).
OUTPUT_SIZE_ATTRS: tuple[tuple[str, str], ...] = (("vocab_size", "vocab size"), ("num_labels", "num_labels"),
                                                  ("num_classes", "num_classes"))
#: Module attributes that give a hidden width: an input width of some layer (``nx``: Hugging Face's Conv1D).
_WIDTH_ATTRS = ("in_features", "in_channels", "num_features", "num_channels", "nx")

_PREFIX = "adamw_"
_SHARED_KEYS = ("fp32_state", "nonfinite")  # options of an unpinned group that apply to both sides
_PIN_KEYS = ("side", "use_muon")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_UNNAMED = "unnamed: conservative side"


# ---------------------------------------------------------------------------------------------- routing rule
def _is_matrix(p: torch.Tensor) -> bool:
    """Rule 1: floating point, ``ndim >= 2`` and a ``[shape[0], -1]`` view of at least 2 x 2 (conv kernels too)."""
    return p.is_floating_point() and p.ndim >= 2 and p.shape[0] >= 2 and p.numel() // p.shape[0] >= 2


@dataclass
class _ModuleFacts:
    """What an ``nn.Module`` tells beyond names: ``id(param) -> reason`` for the params it sends to AdamW."""

    embeddings: dict[int, str] = field(default_factory=dict)  # weights of nn.Embedding / nn.EmbeddingBag (rule 2)
    outputs: dict[int, str] = field(default_factory=dict)  # the weight of the output nn.Linear (rule 4)


def _int_size(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else None


def _module_facts(model: nn.Module) -> _ModuleFacts:
    """Embedding weights (by module type, tied ones included) and the output ``nn.Linear`` (rule 4) of ``model``."""
    facts = _ModuleFacts()
    sizes: dict[int, str] = {}  # output size -> where it comes from (first source wins)
    for owner in (getattr(model, "config", None), model):
        for attr, label in OUTPUT_SIZE_ATTRS:
            size = _int_size(getattr(owner, attr, None)) if owner is not None else None
            if size is not None:
                sizes.setdefault(size, label)
    widths: set[int] = set()
    linears: list[nn.Linear] = []
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            kind = "nn.Embedding" if isinstance(module, nn.Embedding) else "nn.EmbeddingBag"
            for p in module.parameters(recurse=False):
                facts.embeddings.setdefault(id(p), kind)
            if (size := _int_size(module.num_embeddings)) is not None:
                sizes.setdefault(size, f"{kind} size")
        if isinstance(module, nn.Linear) and not isinstance(module.weight, nn.parameter.UninitializedParameter):
            linears.append(module)
        for attr in _WIDTH_ATTRS:
            if (width := _int_size(getattr(module, attr, None))) is not None:
                widths.add(width)
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and shape and (width := _int_size(shape[-1])) is not None:
            widths.add(width)
    # An output Linear's out_features is no layer's input width (that also rules out square Linears).
    outputs = [m for m in linears if m.out_features not in widths]
    sized = [m for m in outputs if m.out_features in sizes]
    if sized:
        head = sized[-1]
        facts.outputs[id(head.weight)] = f"last Linear, out_features == {sizes[head.out_features]} {head.out_features}"
    elif not sizes and linears and linears[-1] in outputs:
        facts.outputs[id(linears[-1].weight)] = "last Linear (the model declares no output size)"
    return facts


def _outside_blocks(parts: list[str]) -> bool:
    """The owner module ``parts[-2]`` is not inside a numbered block (``layers.3``, ``blocks.0``, ``layer1.1``)."""
    return not any(part.isdigit() for part in parts[:-2])


def _route_with_reason(name: str, p: torch.Tensor, facts: _ModuleFacts | None = None) -> tuple[SideT, str]:
    """:func:`default_route` (``facts``: rules 2 and 4 of the module form) and the reason shown by ``summary()``."""
    if not _is_matrix(p):
        if not p.is_floating_point():
            return "adamw", str(p.dtype).removeprefix("torch.")
        return "adamw", f"{p.ndim}-D" if p.ndim < 2 else "vector-shaped"
    if facts is not None and id(p) in facts.embeddings:
        return "adamw", facts.embeddings[id(p)]
    if not name:
        return "adamw", _UNNAMED
    parts = name.lower().split(".")
    for part in parts:
        if "embed" in part or part in EMBEDDING_NAMES:
            return "adamw", f"embedding ({part!r})"
    if len(parts) >= 2 and parts[-2] in EMBEDDING_OWNER_NAMES and _outside_blocks(parts):
        return "adamw", f"embedding ({parts[-2]!r})"
    if "token" in parts[-1]:
        return "adamw", f"token ({parts[-1]!r})"
    for part in parts:
        if part in HEAD_NAMES:
            return "adamw", f"output head ({part!r})"
    if len(parts) >= 2 and parts[-2] in OUTPUT_OWNER_NAMES and _outside_blocks(parts):
        return "adamw", f"output head ({parts[-2]!r})"
    if facts is not None and id(p) in facts.outputs:
        return "adamw", facts.outputs[id(p)]
    return "matrix", "hidden matrix"


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised by this module's caller's caller: the first frame outside this file."""
    frame, level = sys._getframe(1), 1  # the function that calls warnings.warn
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def default_route(name: str, param: torch.Tensor) -> SideT:
    """The default rule by name and shape (module docstring, rules 1 to 3 and 5): ``"matrix"`` for hidden
    matrices, ``"adamw"`` for the rest, unnamed matrices (``name == ""``) included. Rules 2 and 4 by module type
    and output size need the module: ``MuonAdamW(model)``."""
    return _route_with_reason(name, param)[0]


# ---------------------------------------------------------------------------------------------- input checks
def matrix_optimizer_names() -> list[str]:
    """Registered names usable as ``matrix_optimizer``: the optimizers marked ``matrix_optimizer_ok`` (every
    :class:`OrthogonalizedOptimizer`, PSGD-Kron, the manifold optimizers)."""
    for module in ("orthogonalized_optimizers", "psgd", "riemannian_optimizers"):  # register the families
        try:
            importlib.import_module(f"emerging_optimizers.{module}")
        except ImportError:  # pragma: no cover - a family not present in this installation
            continue
    names = []
    for name in registry.get_optimizer_name_list():
        cls = registry.get_optimizer_cls(name)
        if _is_matrix_optimizer(cls):
            names.append(name)
    return names


def _is_matrix_optimizer(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, EmergingOptimizer) and bool(cls.matrix_optimizer_ok) \
        and not issubclass(cls, MuonAdamW)


def _matrix_cls(spec: Any) -> type[EmergingOptimizer]:
    if isinstance(spec, type):
        if _is_matrix_optimizer(spec):
            return spec
        raise TypeError(f"Invalid matrix_optimizer: {spec.__name__} is not an OrthogonalizedOptimizer subclass "
                        "(nor another matrix optimizer, a class with matrix_optimizer_ok = True); "
                        f"use one of {', '.join(matrix_optimizer_names())} or such a class.")
    valid = matrix_optimizer_names()
    if not isinstance(spec, str) or spec not in valid:
        raise ValueError(f"Invalid matrix_optimizer: {spec!r}; choose one of {', '.join(map(repr, valid))} "
                         "(the registered matrix optimizers) or pass an OrthogonalizedOptimizer subclass.")
    return registry.get_optimizer_cls(spec)  # type: ignore[return-value]


def _shared_matrix_kwargs(cls: type, momentum: float, weight_decay: float | None, nesterov: bool) -> dict[str, Any]:
    """MuonAdamW's ``momentum``, ``weight_decay`` and ``nesterov`` for a matrix optimizer that takes them.

    A matrix optimizer without one (``oblique_adam`` has betas, ``iso`` no weight decay) gets nothing for it;
    a value other than MuonAdamW's default would be ignored, so it is refused. ``weight_decay=None`` leaves the
    matrix optimizer's own default (NorMuon's 1.0, Muon's 0.01: their scales differ, see the module doc).
    """
    valid = registry.valid_kwargs(cls)
    out: dict[str, Any] = {}
    for key, value in (("momentum", momentum), ("weight_decay", weight_decay), ("nesterov", nesterov)):
        if key == "weight_decay" and value is None:
            continue
        if key in valid:
            out[key] = value
        elif value != _MATRIX_DEFAULTS[key]:
            raise TypeError(f"{key}={value!r} does not apply: matrix_optimizer {cls.__name__} takes no {key!r}; "
                            f"leave MuonAdamW's {key} at its default ({_MATRIX_DEFAULTS[key]}).")
    return out


_MATRIX_DEFAULTS = {"momentum": 0.95, "weight_decay": None, "nesterov": True}


def _check_kwargs(arg: str, kwargs: dict[str, Any] | None, cls: type, reserved: dict[str, str]) -> dict[str, Any]:
    """``kwargs`` for ``cls``: a dict, none of ``reserved`` (which MuonAdamW sets itself), all accepted by ``cls``."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"Invalid {arg}: expected a dict of {cls.__name__} arguments, got {type(kwargs).__name__}.")
    for key, own in reserved.items():
        if key in kwargs:
            raise TypeError(f"{arg} sets {key!r}; pass it as MuonAdamW's {own}=... instead.")
    var_kw = any(q.kind is q.VAR_KEYWORD for q in inspect.signature(cls.__init__).parameters.values())
    valid = registry.valid_kwargs(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown and not var_kw:
        raise TypeError(f"{arg} has unexpected argument(s) {', '.join(unknown)} for {cls.__name__}; valid "
                        f"arguments: {', '.join(k for k in valid if k not in reserved)}.")
    return dict(kwargs)


def _pin_of(group: dict[str, Any], where: str) -> SideT | None:
    side = group.get("side")
    if side is not None and side not in SIDES:
        raise ValueError(f"Invalid side {side!r} in {where}; use 'matrix' or 'adamw' (or leave it out to route "
                         "by the rule).")
    use_muon = group.get("use_muon")
    if use_muon is not None:
        if not isinstance(use_muon, bool):
            raise ValueError(f"Invalid use_muon {use_muon!r} in {where}; use True (matrix side) or False (adamw side).")
        if side is not None and side != ("matrix" if use_muon else "adamw"):
            raise ValueError(f"{where} sets side={side!r} and use_muon={use_muon}, which disagree; give one of them.")
        side = "matrix" if use_muon else "adamw"
    return side  # type: ignore[return-value]


def _named_items(group: dict[str, Any], where: str) -> list[tuple[str | None, torch.Tensor]]:
    """The group's params as ``(name or None, tensor)``."""
    params = group.get("params")
    if params is None:
        raise ValueError(f"{where} has no 'params'.")
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError(f"'params' of {where} is a set, whose order changes between runs; use a list.")
    items: list[tuple[str | None, torch.Tensor]] = []
    for item in params:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            items.append((item[0], item[1]))
        else:
            items.append((None, item))
    names = group.get("param_names")
    if names is not None and all(n is None for n, _ in items) and len(names) == len(items):
        items = [(str(n), p) for n, (_, p) in zip(names, items)]
    for name, p in items:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where} holds a {type(p).__name__}; optimizers take tensors (or (name, tensor) pairs).")
        if is_flat_param(p):
            raise ValueError(
                f"MuonAdamW got an FSDP1 FlatParameter {name or ''!r} of shape {tuple(p.shape)} "
                "(FullyShardedDataParallel with use_orig_params=False): every weight is flattened into one 1-D shard, "
                "so no matrix would reach the matrix side (silently training as AdamW). Shard the model with FSDP2 "
                "(torch.distributed.fsdp.fully_shard): its DTensor parameters keep their shapes."
            )
    return items


def _all_reduce_mean(grads: list[torch.Tensor | None], group: Any) -> None:
    """Average ``grads`` over ``group`` in place: one all-reduce per dtype of a flat buffer (DDP's bytes)."""
    import torch.distributed as dist

    from emerging_optimizers.distributed.comm import COMM_STATS

    world = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, group=group)
        COMM_STATS.add("all_reduce", 2 * (world - 1) * flat.numel() * flat.element_size() // world)
        flat.div_(world)
        offset = 0
        for g in gs:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@dataclass
class _Split:
    """One user group cut into one-side groups, with the options the user set (checked after construction)."""

    index: int
    pinned: SideT | None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_keys: dict[str, set[str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- optimizer
@register_optimizer("muon_adamw")
class MuonAdamW(EmergingOptimizer):
    """Orthogonalized updates for hidden matrices, AdamW for embeddings, heads, norms and biases (module doc).

    ``MuonAdamW(model)`` is the first form (names, module types and output sizes drive the rule);
    ``MuonAdamW(model.named_parameters())`` the second (names only).

    Args:
        params: the model (an ``nn.Module``), ``model.named_parameters()``, or param groups (see the module
            docstring for ``side`` / ``use_muon`` and ``adamw_`` options). Matrices without names
            (``model.parameters()``) go to the AdamW side, with a warning.
        lr: learning rate of the matrix side (2e-3; spectral scaling: the update has RMS about 1, so ``lr`` is
            the per-element step, and one value served matrices of width 64 and 128 alike).
        momentum: momentum of the matrix side (0.95).
        weight_decay: decoupled weight decay of the matrix side (None: the matrix optimizer's default, NorMuon's
            1.0, i.e. weights shrink by ``lr * 1.0`` = 0.2% a step at the peak lr, as torch's recipe's ``0.04 * 0.1``
            does 0.4%; Muon's own default is 0.01).
        nesterov: Nesterov momentum on the matrix side (True), for matrix optimizers that take it.
        adamw_lr: learning rate of the adamw side (3e-3).
        adamw_betas: AdamW's betas ((0.9, 0.95), the usual choice for transformers).
        adamw_eps: AdamW's eps (1e-8).
        adamw_weight_decay: AdamW's weight decay (0.0: norms, biases and embeddings are usually not decayed).
        matrix_optimizer: a registered matrix optimizer (``"normuon"``, the default; ``"muon"``, ``"scion"``,
            ``"psgd_pro"``, ... see :func:`matrix_optimizer_names`) or an :class:`OrthogonalizedOptimizer` subclass.
        matrix_kwargs: further arguments of the matrix optimizer (``num_ns_steps``, ``coefficient_type``, ...).
        adamw_kwargs: further arguments of :class:`~emerging_optimizers.scalar_optimizers.AdamW` (``nesterov``,
            ``fused``, ``weight_decay_method``, ...).
        route: ``route(name, param) -> "matrix" | "adamw"`` replacing :func:`default_route` for unpinned groups.
        state_dtype: both sides' state dtype (``torch.bfloat16``: half the memory, stochastic rounding; AdamW's
            ``state_dtype`` and the matrix optimizer's ``momentum_dtype``); None: as ``fp32_state`` says.
        fp32_state: keep both sides' state in float32 for bf16/fp16 params (AdamW's ``fp32_state``; Muon's
            momentum, unless ``momentum_dtype`` is set).
        nonfinite: ``"skip"`` (default), ``"raise"`` or ``"off"``: what a step with NaN/Inf gradients does
            (:class:`~emerging_optimizers.base.EmergingOptimizer`); one check over both sides.
        process_group, gather_dtype: the matrix side's work shared over the ranks of a data-parallel group
            (replicated parameters; :class:`OrthogonalizedOptimizer`). DTensor (FSDP2) parameters need neither:
            the matrix side assembles whole matrices by itself, the AdamW side steps the local shards.
        reduce_gradients: the zero-extra-bytes recipe (no DDP wrapper): the matrix side reduce-scatters its
            gradients to their owners and all-gathers the updates, the AdamW side all-reduces its gradients
            (docs/distributed.md); call :meth:`synchronize_state` on every rank before saving.
    """

    dtensor_support = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 2e-3,
        momentum: float = 0.95,
        weight_decay: float | None = None,
        *,
        nesterov: bool = True,
        adamw_lr: float = 3e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        matrix_optimizer: str | type[EmergingOptimizer] = "normuon",
        matrix_kwargs: dict[str, Any] | None = None,
        adamw_kwargs: dict[str, Any] | None = None,
        route: RouteFn | None = None,
        fp32_state: bool = False,
        nonfinite: NonfiniteT = "skip",
        state_dtype: torch.dtype | None = None,
        process_group: Any = None,
        gather_dtype: torch.dtype | None = None,
        reduce_gradients: bool = False,
    ) -> None:
        matrix_cls = _matrix_cls(matrix_optimizer)
        dist_kwargs = {k: v for k, v in (("process_group", process_group), ("gather_dtype", gather_dtype),
                                         ("reduce_gradients", reduce_gradients or None)) if v is not None}
        missing = sorted(set(dist_kwargs) - set(registry.valid_kwargs(matrix_cls)))
        if missing:
            raise ValueError(f"MuonAdamW: matrix_optimizer {matrix_cls.__name__} does not take {', '.join(missing)}; "
                             "use an orthogonalized optimizer (normuon, muon, ...) to share the work over ranks.")
        matrix_kwargs = _check_kwargs("matrix_kwargs", matrix_kwargs, matrix_cls,
                                      {"lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
                                       "nesterov": "nesterov", "nonfinite": "nonfinite",
                                       "process_group": "process_group", "gather_dtype": "gather_dtype",
                                       "reduce_gradients": "reduce_gradients"})
        adamw_kwargs = _check_kwargs("adamw_kwargs", adamw_kwargs, AdamW,
                                     {"lr": "adamw_lr", "betas": "adamw_betas", "eps": "adamw_eps",
                                      "weight_decay": "adamw_weight_decay", "fp32_state": "fp32_state",
                                      "nonfinite": "nonfinite", "state_dtype": "state_dtype"})
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype!r}; use None, torch.float32 or torch.bfloat16.")
        if (state_dtype is not None and "momentum_dtype" in registry.valid_kwargs(matrix_cls)
                and "momentum_dtype" not in matrix_kwargs):
            matrix_kwargs = {**matrix_kwargs, "momentum_dtype": state_dtype}
        if route is not None and not callable(route):
            raise TypeError(f"Invalid route: expected a callable route(name, param) -> 'matrix' | 'adamw', got "
                            f"{type(route).__name__}.")
        if not isinstance(fp32_state, bool):
            raise ValueError(f"Invalid fp32_state: {fp32_state!r}; use True or False.")
        self._route = route
        self._reasons: dict[int, str] = {}
        self._fp32_state = fp32_state
        user_groups, self._embedding_ids = self._user_groups(params)
        splits = [self._split(i, g, f"param group {i}") for i, g in enumerate(user_groups)]

        def side_groups(side: str) -> list[dict[str, Any]]:
            return [s.groups[side] for s in splits if side in s.groups]

        matrix = self._build(matrix_cls, side_groups("matrix"),
                             dict(_shared_matrix_kwargs(matrix_cls, momentum, weight_decay, nesterov), lr=lr,
                                  nonfinite=nonfinite, **dist_kwargs, **matrix_kwargs))
        # AdamW names its own arguments (lr, betas, ...); here they are adamw_lr, adamw_betas, ...
        check_nonneg("adamw_lr", adamw_lr)
        check_betas("adamw_betas", adamw_betas, 2)
        check_nonneg("adamw_eps", adamw_eps)
        check_nonneg("adamw_weight_decay", adamw_weight_decay)
        try:
            adamw = self._build(AdamW, side_groups("adamw"),
                                dict(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay,
                                     fp32_state=fp32_state, nonfinite=nonfinite, state_dtype=state_dtype,
                                     **adamw_kwargs))
        except ValueError as e:  # a group's adamw_-prefixed option (or a pinned adamw group's own)
            raise ValueError(f"{e} (on the adamw side: MuonAdamW's adamw_lr, adamw_betas, adamw_eps, "
                             "adamw_weight_decay, or a param group's adamw_-prefixed keys)") from e
        self._inner: dict[str, EmergingOptimizer] = {"matrix": matrix, "adamw": adamw}
        for s in splits:
            self._check_split(s)
        self._constructing = True
        super().__init__([g for s in splits for g in s.groups.values()], {})
        self._constructing = False
        if weight_decay is None:  # the matrix optimizer's default (what its groups hold)
            weight_decay = matrix.defaults.get("weight_decay", 0.0)
        self.defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                             adamw_lr=adamw_lr,
                             adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                             adamw_weight_decay=adamw_weight_decay, fp32_state=fp32_state, nonfinite=nonfinite)
        self._sync_inner()

    # ------------------------------------------------------------------ the two inner optimizers
    @property
    def matrix_optimizer(self) -> EmergingOptimizer:
        """The matrix side's optimizer: its ``param_groups`` and ``state`` are views of this optimizer's."""
        return self._inner["matrix"]  # type: ignore[return-value]

    @property
    def adamw(self) -> AdamW:
        """The adamw side's optimizer (its ``param_groups`` are this optimizer's adamw groups)."""
        return self._inner["adamw"]  # type: ignore[return-value]

    @staticmethod
    def _build(opt_cls: type, groups: list[dict[str, Any]], kwargs: dict[str, Any]) -> EmergingOptimizer:
        """``opt_cls(groups, **kwargs)``; with no groups, built on an empty group then emptied (validates kwargs)."""
        opt = opt_cls(groups or [{"params": []}], **kwargs)
        if not groups:
            opt.param_groups.clear()
        return opt  # type: ignore[no-any-return]

    def _sync_inner(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (after construction and loading)."""
        for side, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["side"] == side]
            inner.state = self.state

    # ------------------------------------------------------------------ routing and group splitting
    @staticmethod
    def _user_groups(params: ParamsT) -> tuple[list[dict[str, Any]], _ModuleFacts]:
        """User param groups (dicts) and, when ``params`` is an ``nn.Module``, what its modules tell (rules 2, 4)."""
        facts = _ModuleFacts()
        if isinstance(params, nn.Module):
            facts = _module_facts(params)
            params = params.named_parameters()
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, or an nn.Module; "
                            "got a single tensor: wrap it in a list.")
        if isinstance(params, dict):
            params = [params]
        items = list(params)
        if not items:
            raise ValueError("MuonAdamW got an empty parameter list.")
        if not isinstance(items[0], dict):
            return [{"params": items}], facts
        if not all(isinstance(g, dict) for g in items):
            raise TypeError("params mixes param groups (dicts) with tensors; put every tensor in a group.")
        return [dict(g) for g in items], facts

    def _decide(self, name: str | None, p: torch.Tensor, where: str) -> SideT:
        if self._route is None:
            # self._embedding_ids holds the _ModuleFacts of _user_groups (set by the constructor).
            side, reason = _route_with_reason(name or "", p, self._embedding_ids)  # type: ignore[arg-type]
            if reason == _UNNAMED and not getattr(self, "_warned_unnamed", False):
                self._warned_unnamed = True
                warnings.warn(
                    f"MuonAdamW: a {tuple(p.shape)} parameter in {where} (and maybe others) has no name, so the "
                    "routing rule cannot tell a hidden matrix from an embedding or output head; unnamed matrices go "
                    "to the AdamW side. Pass the model itself, MuonAdamW(model), or model.named_parameters() to "
                    "train hidden matrices on the matrix side (or pin groups with side='matrix' / 'adamw', or pass "
                    "route=).",
                    UserWarning,
                    stacklevel=_caller_stacklevel(),
                )
        else:
            side, reason = self._route(name or "", p), "route()"  # type: ignore[assignment]
            if side not in SIDES:
                raise ValueError(f"route({name or ''!r}, <{tuple(p.shape)} tensor>) returned {side!r} for a param of "
                                 f"{where}; it must return 'matrix' or 'adamw'.")
        self._reasons[id(p)] = reason
        return side

    def _split(self, index: int, group: dict[str, Any], where: str) -> _Split:
        """Cut one user group into a matrix group and an adamw group (module docstring, "Param groups")."""
        pinned = _pin_of(group, where)
        split = _Split(index, pinned)
        opts = {k: v for k, v in group.items() if k not in ("params", "param_names", *_PIN_KEYS)}
        plain = {k: v for k, v in opts.items() if not k.startswith(_PREFIX)}
        prefixed = {k[len(_PREFIX):]: v for k, v in opts.items() if k.startswith(_PREFIX)}
        if pinned == "matrix":
            if prefixed:
                raise ValueError(f"{where} is pinned to the matrix side but sets "
                                 f"{', '.join(_PREFIX + k for k in sorted(prefixed))}; drop them (or the pin).")
            side_opts = {"matrix": plain}
        elif pinned == "adamw":
            both = sorted(set(plain) & set(prefixed))
            if both:
                raise ValueError(f"{where} sets both {both[0]!r} and {_PREFIX + both[0]!r}; give one of them.")
            side_opts = {"adamw": {**plain, **prefixed}}
        else:
            shared = {k: v for k, v in plain.items() if k in _SHARED_KEYS}
            side_opts = {"matrix": plain, "adamw": {**shared, **prefixed}}
        members: dict[str, list[Any]] = {side: [] for side in side_opts}
        for name, p in _named_items(group, where):
            if pinned is None:
                side = self._decide(name, p, where)
            else:
                side = pinned
                self._reasons[id(p)] = "pinned"
            if side == "matrix" and (p.ndim < 2 or not p.is_floating_point()):
                how = "pinned to" if pinned else "routed by route() to"
                raise ValueError(f"param {name or ''!r} of shape {tuple(p.shape)} ({p.dtype}) in {where} is {how} the "
                                 "matrix side, which updates floating-point matrices only (ndim >= 2); put it on the "
                                 "adamw side (side='adamw', or fix route).")
            members[side].append(p if name is None else (name, p))
        for side, opts_ in side_opts.items():
            if members[side] or pinned is not None:
                split.groups[side] = {"params": members[side], **opts_, "side": side}
                split.user_keys[side] = set(opts_)
        for g in split.groups.values():
            g.setdefault("fp32_state", self._fp32_state)
        return split

    def _check_split(self, split: _Split) -> None:
        """Refuse options given to the wrong side (after the inner optimizers filled in their defaults)."""
        where = f"param group {split.index}"
        matrix_keys, adamw_keys = set(self._inner["matrix"].defaults), set(self._inner["adamw"].defaults)
        for key in split.user_keys.get("matrix", set()) - set(_SHARED_KEYS):
            if key in adamw_keys and key not in matrix_keys:
                fix = (f"write {_PREFIX + key}=... for its non-matrix params" if split.pinned is None
                       else "it is an AdamW option")
                raise ValueError(f"{where} sets {key!r}, which {type(self.matrix_optimizer).__name__} does not take; "
                                 f"{fix} (or pin the group with side='adamw').")
        for key in split.user_keys.get("adamw", ()):
            if key in matrix_keys and key not in adamw_keys:
                raise ValueError(f"{where} is pinned to the adamw side but sets {key!r}, an option of "
                                 f"{type(self.matrix_optimizer).__name__}; drop it (or the pin).")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: split and validated like the constructor's groups; on error nothing is added."""
        if getattr(self, "_constructing", True):  # torch's constructor adding the already-split groups
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}.")
        split = self._split(len(self.param_groups), dict(param_group), "the added param group")
        known = {id(p) for g in self.param_groups for p in g["params"]}
        named = "param_names" in self.param_groups[0] if self.param_groups else None
        added: list[dict[str, Any]] = []
        try:
            for side, group in split.groups.items():
                if any(id(p[1] if isinstance(p, tuple) else p) in known for p in group["params"]):
                    raise ValueError("some parameters appear in more than one parameter group")
                group_named = any(isinstance(p, tuple) for p in group["params"])
                if named is not None and group_named != named and group["params"]:
                    raise ValueError("all param groups must be given with names or all without "
                                     "(model.named_parameters() vs model.parameters()).")
                self._inner[side].add_param_group(group)
                added.append(group)
            self._check_split(split)
        except Exception:
            for group in added:
                inner = self._inner[group["side"]]
                inner.param_groups = [g for g in inner.param_groups if g is not group]
            raise
        self.param_groups.extend(added)

    # ------------------------------------------------------------------ EmergingOptimizer interface
    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        side = group["side"]
        if side == "matrix" and group.get("fp32_state") and group.get("momentum_dtype") is None \
                and p.dtype in _LOW_PRECISION:
            group = {**group, "momentum_dtype": torch.float32}
        return self._inner[side]._init_param_state(p, group)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if group["side"] == "adamw" and getattr(self.matrix_optimizer, "reduce_gradients", False):
            _all_reduce_mean([p.grad for p in params], self.matrix_optimizer.process_group)  # type: ignore[attr-defined]
        self._inner[group["side"]]._step_group(group, params)

    def synchronize_state(self) -> None:
        """``reduce_gradients=True``: give every rank the matrix owners' state (collective; before saving)."""
        sync = getattr(self.matrix_optimizer, "synchronize_state", None)
        if sync is not None:
            sync()

    def state_dict(self) -> dict[str, Any]:
        if getattr(self.matrix_optimizer, "_stale_state", False):
            raise RuntimeError("MuonAdamW(reduce_gradients=True): only each matrix's owner holds its current state; "
                               "call optimizer.synchronize_state() on every rank before state_dict() or a checkpoint.")
        return super().state_dict()

    def _nonfinite_group(self) -> Any:
        return self._inner["matrix"]._nonfinite_group()

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of a MuonAdamW with the same routing (checked first; on a mismatch nothing changes)."""
        super().load_state_dict(state_dict)
        self._sync_inner()

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
            saved = state_dict["param_groups"]
            if not all(isinstance(g, dict) and g.get("side") in SIDES for g in saved):
                raise ValueError("MuonAdamW.load_state_dict: the state dict's param groups have no 'side' tag; it was "
                                 "probably saved by a different optimizer.")
            if len(saved) == len(self.param_groups):
                for i, (s, g) in enumerate(zip(saved, self.param_groups)):
                    if s["side"] != g["side"]:
                        raise ValueError(f"MuonAdamW.load_state_dict: param group {i} is a {s['side']!r} group in the "
                                         f"state dict and a {g['side']!r} group here; build the optimizer with the "
                                         "same params, groups and route as the one that saved it.")
        super()._check_state_dict(state_dict)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        """A table of every parameter: group, side, name, shape, dtype, current lr and weight decay, and why."""
        header = ("group", "side", "name", "shape", "dtype", "lr", "weight_decay", "why")
        rows: list[tuple[str, ...]] = []
        totals = {side: [0, 0] for side in SIDES}
        index = 0
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [None] * len(group["params"])
            for name, p in zip(names, group["params"]):
                shape = "x".join(map(str, p.shape)) or "scalar"
                rows.append((str(gi), group["side"], name or f"<param {index}>", shape,
                             str(p.dtype).removeprefix("torch."), f"{group['lr']:.4g}",
                             f"{group.get('weight_decay', 0.0):.4g}", self._reasons.get(id(p), "")))
                totals[group["side"]][0] += 1
                totals[group["side"]][1] += p.numel()
                index += 1
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        title = (f"{type(self).__name__}: matrix side ({type(self.matrix_optimizer).__name__}) "
                 f"{totals['matrix'][0]} tensors, {totals['matrix'][1]:,} elements; adamw side (AdamW) "
                 f"{totals['adamw'][0]} tensors, {totals['adamw'][1]:,} elements")
        lines = [
            title,
            "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        counts = {side: sum(len(g["params"]) for g in self.param_groups if g["side"] == side) for side in SIDES}
        head = (f"{type(self).__name__}(matrix_optimizer={type(self.matrix_optimizer).__name__}: "
                f"{counts['matrix']} params, AdamW: {counts['adamw']} params; see .summary())")
        return head + "\n" + super().__repr__()
