"""The base class of every element-wise (scalar) optimizer, and its compiled fast path.

An algorithm is written once, as two pieces in its own file:

* ``scalars(group, step, p) -> dict`` — the few numbers that depend on the step and the hyperparameters
  (bias corrections, warm-up schedules, shape scaling), computed in plain Python;
* ``kernel(grad, *state, **scalars) -> update`` — the element-wise math, updating ``state`` in place.

The documented ``calculate_<algo>_update`` function is exactly ``kernel(grad, *state, **scalars(...))``.
The optimizer runs, per parameter, :func:`param_step`: weight decay, ``kernel``, ``p -= lr * update``.

Fast path (``fused``): the parameters of a group are bucketed by (device, dtype, state dtype) and
:func:`multi_param_step` — a loop of :func:`param_step`, the *same* code as the eager path — is compiled
with ``torch.compile`` over chunks of tensors (see below for which shapes). Weight decay,
the whole update and the parameter write fuse into one pass over memory per tensor, the floor torch's fused
AdamW reaches. Keeping the scalar part out of the kernel matters: computed inside, ``beta ** step`` is
re-evaluated per vector lane and the kernel runs 3-4x slower.

Compilation never touches the real tensors: each new chunk signature (tensor count, dtypes, flags) is
compiled by running the compiled function once on scratch copies. Only a failure to compile (then, or a
recompilation later, which fails before anything runs) sends the signature to the eager path (with a
warning); a compiled chunk that fails while running raises, as any kernel would, and is never re-run.
``fused=None`` (default) compiles *in a background thread* when a compiler works: the steps run eagerly until
the compiled code is ready, so no step waits for the compiler (6-90 s per optimizer on a 2-core CPU, cached
on disk by torch), and while it compiles the interpreter's switch interval is shortened (:class:`_GilShare`)
so that the training thread is not starved of the GIL. Optimizers of at least :data:`AUTO_FUSE_MIN_NUMEL`
elements start compiling at the first step, in dynamic-shape chunks of :data:`FUSED_CHUNK` flat tensors (one
graph serves every chunk and every model). Smaller ones start once their eager steps have taken
:data:`AUTO_FUSE_AFTER_S` seconds (a short run never pays for a compilation), and compile static-shape chunks
of up to :data:`STATIC_CHUNK` whole tensors, whose lists are kept between steps (:class:`_StaticPlan`): at
~1 ms a step the per-call cost decides (char-LM, 0.82M elements in 53 tensors: Lion's step 1.9 ms eager,
0.9 ms compiled; MAdam 8.9 / 1.7 ms). ``True`` compiles at once (the first step waits), ``False``
never. Scalars reach the compiled code as 0-d float64 tensors (derived numbers such as ``1 - beta2`` are
then computed in double, as the eager path computes them from Python floats), and weight decay is always
applied there (a factor of exactly 1.0 when there is none), so a schedule that reaches lr 0 does not
recompile.

:class:`SingleMomentumOptimizer` and :class:`TwoMomentsOptimizer` (both :class:`UpdateFnOptimizer`) keep the
reference library's way of declaring an optimizer, ``(params, defaults, *, update_fn, update_kwarg_names)``
with the functions of :mod:`~emerging_optimizers.scalar_optimizers.update_functions`, on the same plumbing
(always eager).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sys
import threading
import time
import types
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT, _grads_of, group_default
from emerging_optimizers.distributed.comm import local
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT, check_weight_decay_method, decay_factor
from emerging_optimizers.utils import check_beta, check_nonneg

__all__ = ["ScalarOptimizer", "UpdateFnOptimizer", "SingleMomentumOptimizer", "TwoMomentsOptimizer", "param_step",
           "multi_param_step", "AUTO_FUSE_MIN_NUMEL", "AUTO_FUSE_AFTER_S", "auto_fuse_after", "FUSED_CHUNK",
           "STATIC_CHUNK", "compile_available"]

#: ``fused=None`` compiles the step from the first step when the optimizer holds at least this many elements
#: (about 4M), in chunks of :data:`FUSED_CHUNK` tensors that share one dynamic-shape graph.
AUTO_FUSE_MIN_NUMEL = 1 << 22

#: Smaller optimizers run eagerly until their eager steps have taken this many seconds in all, then compile in
#: the background: a short run (a test, a quick experiment) never pays for a compilation, a long one gets the
#: fast path once it has shown it is long. None: never, below :data:`AUTO_FUSE_MIN_NUMEL`.
AUTO_FUSE_AFTER_S: float | None = 5.0



@contextlib.contextmanager
def auto_fuse_after(seconds: float | None) -> Iterator[None]:
    """:data:`AUTO_FUSE_AFTER_S` set to ``seconds`` for a block, restored after (``None``: small optimizers stay
    eager, e.g. for a run that must be reproducible to the last bit)."""
    global AUTO_FUSE_AFTER_S
    saved, AUTO_FUSE_AFTER_S = AUTO_FUSE_AFTER_S, seconds
    try:
        yield
    finally:
        AUTO_FUSE_AFTER_S = saved


Kernel = Callable[..., torch.Tensor]


def param_step(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: tuple[torch.Tensor, ...],
    lr: float,
    decay: float,
    l2: float,
    scalars: dict[str, Any],
    *,
    kernel: Kernel,
    has_decay: bool,
    has_l2: bool,
) -> None:
    """One parameter's update: weight decay, ``u = kernel(g, *state, **scalars)``, ``p <- p - lr*u``.

    ``decay`` is the multiplicative weight-decay factor, ``l2`` the L2 coefficient added to the gradient
    (never in place: the caller's gradient is untouched). Compute happens in the state dtype (fp32 state for
    low-precision params up-casts the gradient); the parameter is written back in its own dtype.
    """
    salt = scalars.get("sr_salt")
    if salt is not None:  # compressed (bf16) state: computed in float32, written back stochastically rounded
        scalars = {k: v for k, v in scalars.items() if k != "sr_salt"}
        work = tuple(t.float() for t in state)
    else:
        work = state
    compute_dtype = work[0].dtype if work else p.dtype
    g = grad if grad.dtype == compute_dtype else grad.to(compute_dtype)
    if has_l2:
        g = _axpy(g, p.to(compute_dtype), l2)
    if has_decay:
        p.mul_(decay)
    update = kernel(g, *work, **scalars)
    if salt is not None:
        for k, (t, w) in enumerate(zip(state, work)):
            stochastic_round_(t, w, salt * 8 + k)
    if update.dtype == p.dtype:
        _axpy(p, update, -lr, inplace=True)
    else:
        p.copy_(_axpy(p.to(update.dtype), update, -lr, inplace=True))


def _hash16(n: int, salt: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``n`` pseudo-random 16-bit integers (int32) from the element index and ``salt``: a counter-based hash
    (no generator state: the same step gives the same bits, so a resumed run is bit-identical). int32
    arithmetic that wraps (twice the vector lanes of int64); shifts masked to act as logical shifts."""
    salt_t = salt if isinstance(salt, torch.Tensor) else torch.tensor(float(salt), dtype=torch.float64)
    key = (salt_t.to(device=device, dtype=torch.int64) * 0x27D4EB2F & 0x7FFFFFFF).to(torch.int32)
    x = torch.arange(n, device=device, dtype=torch.int32) * -1640531535 + key  # 0x9E3779B1 as int32
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x2C1B3C6D
    x = x ^ ((x >> 12) & 0xFFFFF)
    x = x * 0x297A2D39
    x = x ^ ((x >> 15) & 0x1FFFF)
    return x & 0xFFFF


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, salt: float | torch.Tensor) -> torch.Tensor:
    """Write float32 ``src`` into bfloat16 ``dst``, rounded up or down with probability given by the distance
    (unbiased: E[dst] = src), so small updates to bf16 state are not lost to round-to-nearest.

    The 16 bits bf16 drops are replaced by a uniform random offset added before truncation (carries into
    the exponent are the correct roundings); the bits come from :func:`_hash16` of the index and ``salt``.
    """
    src = src.contiguous()
    if isinstance(salt, torch.Tensor) or torch.compiler.is_compiling() or src.numel() > _NoiseCache.MAX_NUMEL:
        noise = _hash16(src.numel(), salt, src.device)
    else:  # eager: one hash per (device, salt) for every tensor of the step, sliced (element i's bits are the same)
        noise = _NOISE.get(src.numel(), float(salt), src.device)
    noise = noise.view(src.shape)
    rounded = (src.view(torch.int32) + noise) & -65536  # clear the 16 low bits: exactly representable in bf16
    return dst.copy_(rounded.view(torch.float32))


class _NoiseCache:
    """The last few salts' :func:`_hash16` bits, as long as the largest tensor asked for.

    Element ``i``'s bits depend only on ``i`` and the salt, so a prefix of a longer run is the run for a
    shorter tensor: eagerly, the hash (a dozen small ops) is computed once per state tensor kind and step,
    not once per parameter, and the rounding is bit-identical to computing it per tensor (and to the
    compiled path, which hashes inside its fused kernel).
    """

    #: larger tensors hash their own bits (the dozen passes then cost little next to the tensor's traffic)
    MAX_NUMEL = 1 << 22

    def __init__(self, keep: int = 4) -> None:
        self._bits: dict[tuple[torch.device, float], torch.Tensor] = {}
        self._keep = keep
        self._lock = threading.Lock()

    def get(self, n: int, salt: float, device: torch.device) -> torch.Tensor:
        key = (device, salt)
        with self._lock:
            bits = self._bits.get(key)
        if bits is None or bits.numel() < n:
            bits = _hash16(n, salt, device)
            with self._lock:
                self._bits.pop(key, None)
                while len(self._bits) >= self._keep:  # oldest first (dicts keep insertion order)
                    self._bits.pop(next(iter(self._bits)))
                self._bits[key] = bits
        return bits[:n]


_NOISE = _NoiseCache()


def _axpy(y: torch.Tensor, x: torch.Tensor, a: float | torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``y + a*x`` (in place on ``y`` if asked); ``a`` is a float (eager) or a 0-d tensor (compiled path)."""
    if isinstance(a, torch.Tensor):
        return y.add_(x * a) if inplace else y + x * a
    return y.add_(x, alpha=a) if inplace else y.add(x, alpha=a)


@functools.cache
def compile_available(device_type: str) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device_type`` here (checked once, by compiling)."""
    try:
        fn = torch.compile(lambda x: x * 2 + 1, dynamic=True, fullgraph=True)
        x = torch.ones(3, device=device_type)
        return bool(torch.equal(fn(x), x * 3))
    except Exception:
        return False


def multi_param_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[tuple[torch.Tensor, ...]],
    lr: float,
    decay: float,
    l2: float,
    scalars: dict[str, Any],
    *,
    kernel: Kernel,
    has_decay: bool,
    has_l2: bool,
) -> None:
    """:func:`param_step` for a list of tensors sharing their scalars: the unit the fast path compiles."""
    for i in range(len(params)):
        param_step(params[i], grads[i], states[i], lr, decay, l2, scalars, kernel=kernel, has_decay=has_decay,
                   has_l2=has_l2)


#: The fast path compiles :func:`multi_param_step` for lists of up to this many tensors. Each call of
#: compiled code costs 0.1-0.5 ms (guards on its inputs), so one call per tensor would add ~10 ms to a 37 ms
#: step of 76 tensors, while one graph over all of them compiles for over a minute. Chunks of 16 keep both
#: moderate: two graphs (full chunks and the remainder), 6-40 s of compilation once, ~2.5 ms of calls a step.
FUSED_CHUNK = 16

#: Optimizers of fewer than :data:`AUTO_FUSE_MIN_NUMEL` elements compile their chunks with static shapes, up to
#: this many tensors per chunk (one graph per chunk, usually one for the whole model). There a step is ~1 ms and
#: the per-call cost decides: on the char-LM's 53 tensors (0.82M elements) one call of the dynamic graph takes
#: 1.0 ms, of the static one without size asserts (Dynamo's guards check every size already) 0.6 ms, of which
#: ~0.45 ms is the kernel; it also compiles faster (~30 s cold, ~2 s from torch's cache).
STATIC_CHUNK = 64


@functools.cache
def _compiled_multi_param_step(kernel: Kernel, static: Any = None) -> Callable[..., None]:
    """:func:`multi_param_step` compiled for one kernel: with dynamic shapes (``static=None``), or for the
    chunk signature ``static`` with static shapes.

    Dynamo caches compiled code per code object, with a small recompile limit; a fresh code object per
    kernel (bound as the keyword default), and per static signature, gives each its own cache. Tensors reach
    it flattened (see :func:`_flat`), so the dynamic code serves every chunk of the same length and dtypes.
    """
    code = multi_param_step.__code__.replace(co_name=f"multi_param_step_{kernel.__name__}")
    fn = types.FunctionType(code, multi_param_step.__globals__, code.co_name)
    fn.__kwdefaults__ = {"kernel": kernel}
    if static is None:
        return torch.compile(fn, dynamic=True, fullgraph=True)
    # sizes are guarded by Dynamo; Inductor's own size asserts would check them a second time per call
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"size_asserts": False})


def _as_tensors(values: dict[str, Any], device: torch.device, cache: dict[Any, dict[str, Any]],
                dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Floats as 0-d tensors of ``dtype`` (bools stay Python bools: they select code paths).

    Dynamo may specialize a Python float on its value (a guard per value, so bias corrections that change
    every step would recompile every step); a tensor argument has no such guard. float32 is what eager
    PyTorch does with a Python scalar in a float32/bf16 op; float64 parameters get float64 scalars, as
    eager float64 arithmetic has. Equal dicts share their tensors (``cache``).
    """
    key = (device, dtype, tuple(values.items()))
    if key not in cache:
        cache[key] = {k: v if isinstance(v, bool) else torch.tensor(v, dtype=dtype, device=device)
                      for k, v in values.items()}
    return cache[key]


class _GilShare:
    """Shortens the interpreter's thread switch interval while background compilations run, then restores it.

    Compiling is Python (Dynamo's tracing, sympy) that holds the GIL; every PyTorch op the training thread runs
    releases the GIL and then waits to take it back, by default up to the 5 ms switch interval: an eager step of
    ~800 small ops, or a forward pass, then takes seconds (measured: one 40 ms step took 4.3-13.5 s while a
    4M-element optimizer compiled). At :data:`INTERVAL_S` the training thread waits ~0.1 ms per op instead: no
    step took over 1.9 s, cold cache included, and the training thread did twice as many steps meanwhile (the
    compilation takes longer: the training thread keeps its share of the CPU). ``begin``/``end`` pair up per
    compilation (under the caller's lock); the first sets the interval, the last restores the saved one unless
    someone changed it in between (their setting is then left alone).
    """

    INTERVAL_S = 1e-4

    def __init__(self) -> None:
        self._count = 0
        self._saved: float | None = None  # the interval before ours
        self._ours: float | None = None  # ours, as the interpreter reads it back (whole microseconds)

    def begin(self) -> None:
        if self._count == 0:
            current = sys.getswitchinterval()
            if current > self.INTERVAL_S:
                self._saved = current
                sys.setswitchinterval(self.INTERVAL_S)
                self._ours = sys.getswitchinterval()
        self._count += 1

    def end(self) -> None:
        self._count -= 1
        if self._count == 0 and self._saved is not None:
            if sys.getswitchinterval() == self._ours:  # nobody changed it meanwhile
                sys.setswitchinterval(self._saved)
            self._saved = self._ours = None


class _CompiledChunks:
    """Compiled :func:`multi_param_step` per chunk signature, compiled on scratch copies of the chunk.

    A signature is compiled once per process (the compiled code is shared by every optimizer using the
    kernel): synchronously (``block=True``: ``fused=True``, which also warns when it fails) or in a
    background thread (``fused=None``). :meth:`get` returns the compiled function when that signature
    compiled, ``None`` while it compiles or when compilation failed.
    """

    def __init__(self) -> None:
        self._ready: dict[Any, Callable[..., None] | None] = {}
        self._failed: dict[Any, str] = {}
        self._pending: dict[Any, threading.Thread] = {}
        self._lock = threading.Lock()
        self._share = _GilShare()

    @staticmethod
    def tensors_signature(args: tuple[Any, ...], static: bool = False) -> tuple[Any, ...]:
        """The part of :meth:`signature` that depends on the chunk's tensors (the static path keeps it)."""
        params, grads, states = args[0], args[1], args[2]
        # dynamic shapes still specialize sizes 0 and 1: they are part of the signature; static ones, every shape
        return (static, len(params), tuple((p.dtype, p.shape if static else min(p.numel(), 2)) for p in params),
                grads[0].dtype, tuple(t.dtype for t in states[0]), params[0].device.type)

    @staticmethod
    def signature(kernel: Kernel, args: tuple[Any, ...], flags: dict[str, bool], static: bool = False,
                  tensors: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
        """What one compiled code serves: the kernel, the chunk's tensors (``tensors``, else computed), the
        flags and the scalars' names and bools."""
        if tensors is None:
            tensors = _CompiledChunks.tensors_signature(args, static)
        return (kernel, id(_compiled_multi_param_step), tensors, args[3].dtype, tuple(flags.items()),
                tuple((k, v) for k, v in args[6].items() if isinstance(v, bool)),  # bools select code paths
                tuple(sorted(args[6])))

    def get(self, kernel: Kernel, args: tuple[Any, ...], flags: dict[str, bool], block: bool,
            who: str, static: bool = False, tensors: tuple[Any, ...] | None = None) -> Callable[..., None] | None:
        sig = self.signature(kernel, args, flags, static, tensors)
        with self._lock:
            if sig in self._ready:
                return self._ready[sig]
            thread = self._pending.get(sig)
            if thread is None:
                scratch = ([t.clone() for t in args[0]], [t.clone() for t in args[1]],
                           [tuple(t.clone() for t in ts) for ts in args[2]], *args[3:])
                thread = threading.Thread(target=self._compile, args=(sig, kernel, scratch, flags, static),
                                          daemon=True,
                                          name=f"emerging_optimizers compile {kernel.__name__}")
                self._pending[sig] = thread
                self._share.begin()
                thread.start()
        if block:
            thread.join()
        with self._lock:
            fn = self._ready.get(sig)
            error = self._failed.pop(sig, None)
        if error is not None and block:
            warnings.warn(f"{who}: compiling the fused step failed ({error}); falling back to the eager step.",
                          RuntimeWarning, stacklevel=4)
        return fn

    def compiling(self) -> bool:
        """Whether background compilations are in progress."""
        with self._lock:
            return bool(self._pending)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the compilations in progress (benchmarks that time the compiled path call this)."""
        with self._lock:
            threads = list(self._pending.values())
        for thread in threads:
            thread.join(timeout)

    def mark_failed(self, sig: Any) -> None:
        with self._lock:
            self._ready[sig] = None

    def _compile(self, sig: Any, kernel: Kernel, scratch: tuple[Any, ...], flags: dict[str, bool],
                 static: bool = False) -> None:
        fn: Callable[..., None] | None = None
        try:
            fn = _compiled_multi_param_step(kernel, sig) if static else _compiled_multi_param_step(kernel)
            # as ``step`` runs: grad mode is per thread, and a mismatch would make the first real call recompile
            with torch.no_grad(), _no_duck_shapes():
                fn(*scratch, **flags)  # type: ignore[misc]
        except Exception as exc:  # compilation (or its trial run on copies) failed: nothing real was written
            fn = None
            with self._lock:
                self._failed[sig] = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._ready[sig] = fn
                self._pending.pop(sig, None)
                self._share.end()


_COMPILED = _CompiledChunks()


def _no_duck_shapes() -> Any:
    """Compile without "duck" shapes: otherwise tensors that happen to have equal sizes share one size symbol,
    and the next chunk whose sizes differ recompiles (the compiled code is meant for every chunk)."""
    try:
        from torch.fx.experimental import _config

        return _config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        return contextlib.nullcontext()


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Errors raised while (re)compiling, before the compiled code runs: nothing has been written yet."""
    import torch._dynamo.exc as dynamo_exc

    errors: list[type[BaseException]] = [dynamo_exc.TorchDynamoException]
    limit = getattr(dynamo_exc, "FailOnRecompileLimitHit", None)
    if limit is not None:
        errors.append(limit)
    return tuple(errors)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D alias of a contiguous tensor that is neither a Parameter nor a view.

    Dynamo treats Parameters' shapes as static and guards on a view's base, and either would recompile per
    shape; this alias shares storage, so in-place updates reach the original tensor.
    """
    return t.detach().view(-1).detach()


def _check_state_dtype(state_dtype: Any) -> None:
    if state_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r}; use None (the parameter's dtype, or float32 with "
                         "fp32_state=True), torch.float32, or torch.bfloat16 (half the memory, stochastic rounding).")


class ScalarOptimizer(WeightDecayMixin, EmergingOptimizer):
    """Base of the element-wise optimizers.

    Subclasses set ``kernel`` (a ``staticmethod``), implement :meth:`scalars` and, when their state is not
    ``state_keys``, :meth:`state_keys_for`. Every hyperparameter lives in the param group. Keyword options
    common to all of them:

    * ``fused`` (``None`` | bool): the compiled single-pass step, see the module docstring;
    * ``fp32_state`` (bool, default False): keep state in float32 for bf16/fp16 params (state otherwise
      takes the param dtype, as in torch.optim);
    * ``state_dtype`` (``None`` | ``torch.float32`` | ``torch.bfloat16``): the state's dtype whatever the
      parameter's. bfloat16 state of float32 parameters halves the state memory; the update is computed in
      float32 and the state written back with stochastic rounding (:func:`stochastic_round_`: unbiased, bits
      from a counter-based hash of the element index and the step, so a resumed run is bit-identical).
    """

    state_keys: ClassVar[tuple[str, ...]] = ()
    kernel: ClassVar[Kernel]
    #: Whether :meth:`scalars` reads the parameter (its shape, say). False: they are computed once per step and
    #: dtype for the whole group (each of the package's optimizers says which holds; True is the safe default).
    scalars_use_param: ClassVar[bool] = True
    #: DTensor parameters (FSDP2, tensor parallel): the kernel runs on the local shards, no communication
    #: (``scalars`` and the ``pre_step``/``post_step`` hooks see the DTensor: global shape, global norms).
    dtensor_support = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, fused: bool | None = None,
                 fp32_state: bool = False, nonfinite: NonfiniteT = "skip",
                 state_dtype: torch.dtype | None = None) -> None:
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r}; use None (auto), True or False.")
        if fp32_state not in (True, False):
            raise ValueError(f"Invalid fp32_state: {fp32_state!r}; use True or False.")
        _check_state_dtype(state_dtype)
        defaults = dict(defaults, fused=fused, fp32_state=fp32_state, state_dtype=state_dtype)
        super().__init__(params, defaults, nonfinite=nonfinite)  # validates every group (add_param_group)
        total = sum(p.numel() for g in self.param_groups for p in g["params"])
        self._auto_fuse = total >= AUTO_FUSE_MIN_NUMEL  # fused=None compiles from the first step
        self._static = not self._auto_fuse  # chunks compile with static shapes (see STATIC_CHUNK)
        self._eager_s = 0.0  # time spent in eager steps of fused=None groups (see AUTO_FUSE_AFTER_S)
        # the fused path's flat views of each param and its state (keyed by the param, as ``self.state``)
        self._views: dict[torch.Tensor, Any] = {}
        self._plans: dict[int, _StaticPlan] = {}  # the static path's chunk lists, per group (by id)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_views"], state["_plans"] = {}, {}  # caches of aliases of the params: rebuilt by the copy
        return state

    # ------------------------------------------------------------------ per-algorithm interface
    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        """Step-dependent numbers handed to ``kernel`` as keyword arguments."""
        raise NotImplementedError

    def state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors ``kernel`` takes after ``grad``, in order (may depend on the group)."""
        return self.state_keys

    def _kernel(self) -> Kernel:
        """The element-wise update function ``step`` applies (the class's ``kernel`` unless overridden)."""
        return type(self).kernel

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate a group's hyperparameters (called for the constructor's and for added groups)."""

    def pre_step(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        """Hook before a param's update; its return value reaches :meth:`post_step`."""
        return None

    def post_step(self, p: torch.Tensor, group: dict[str, Any], ctx: Any) -> None:
        """Hook after a param's update."""

    # ------------------------------------------------------------------ plumbing
    # the reference keeps it on ``self``; here each group has its own (the step reads the group's)
    weight_decay_method = group_default("weight_decay_method")

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_weight_decay_method(group["weight_decay_method"])
        _check_state_dtype(group.get("state_dtype"))
        self._check_group(group)

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = torch.float32 if group["fp32_state"] and p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        if group.get("state_dtype") is not None:
            dtype = group["state_dtype"]
        state: dict[str, Any] = {"step": 0}
        for key in self.state_keys_for(group):
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def _use_fused(self, group: dict[str, Any], device: torch.device) -> bool:
        fused = group["fused"]
        if torch.compiler.is_compiling():  # the user compiles the step: it fuses the plain path itself
            return False
        # no compiler here shows as a failed compilation (a warning for fused=True; silent under auto)
        return fused is True or (fused is None and self._hot())

    def _hot(self) -> bool:
        """Whether ``fused=None`` compiles: from the first step for large optimizers, after
        :data:`AUTO_FUSE_AFTER_S` seconds of eager steps for the others."""
        after = AUTO_FUSE_AFTER_S
        return self._auto_fuse or (after is not None and self._eager_s >= after)

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, method = group["lr"], group["weight_decay"], group["weight_decay_method"]
        has_l2 = wd != 0 and method == "l2"
        decay = decay_factor(method, lr, wd)
        flags = dict(has_decay=decay != 1.0, has_l2=has_l2)
        l2 = wd if has_l2 else 0.0
        keys = self.state_keys_for(group)
        kernel = self._kernel()
        cls = type(self)
        hooked = cls.pre_step is not ScalarOptimizer.pre_step or cls.post_step is not ScalarOptimizer.post_step
        ctxs = [self.pre_step(p, group) for p in params] if hooked else None
        grads = _grads_of(params)
        jobs = []
        shared: dict[Any, dict[str, Any]] = {}  # scalars of a (step, dtype), when they do not depend on the param
        # (not under a user's torch.compile: a dict keyed by the traced step would specialize on its value)
        share = not self.scalars_use_param and not torch.compiler.is_compiling()
        for p, grad in zip(params, grads):
            state = self.state[p]
            state["step"] = step = state["step"] + 1
            skey = (step, p.dtype)
            scalars = shared.get(skey) if share else None
            if scalars is None:
                scalars = self.scalars(group, step, p)
                if keys and state[keys[0]].dtype == torch.bfloat16 and p.dtype != torch.bfloat16:
                    scalars = {**scalars, "sr_salt": float(step)}  # compressed state: stochastic rounding
                if share:
                    shared[skey] = scalars
            jobs.append((p, grad, scalars))
        eager = jobs
        fused = self._use_fused(group, params[0].device)
        if fused:
            eager = self._fused_steps(group, jobs, keys, kernel, lr, decay, l2, flags)
        # a fused=None optimizer not compiling yet counts the time its eager steps take (AUTO_FUSE_AFTER_S)
        timed = not fused and group["fused"] is None and not torch.compiler.is_compiling()
        start = time.perf_counter() if timed else 0.0
        for p, grad, scalars in eager:
            param_step(local(p), local(grad), tuple(local(self.state[p][k]) for k in keys), lr, decay, l2, scalars,
                       kernel=kernel, **flags)
        if timed:
            self._eager_s += time.perf_counter() - start
        if hooked:
            for p, ctx in zip(params, ctxs):  # type: ignore[arg-type]
                self.post_step(p, group, ctx)

    def _fused_steps(self, group: dict[str, Any], jobs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
                     keys: tuple[str, ...], kernel: Kernel, lr: float, decay: float, l2: float,
                     flags: dict[str, bool]) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """The compiled chunks of a group's step; returns the jobs left to the eager path (compiling in the
        background, failed to compile, or tensors that are not contiguous)."""
        if self._static:
            return self._static_steps(group, jobs, keys, kernel, lr, decay, l2, flags)
        eager = []
        buckets: dict[Any, list[tuple[Any, ...]]] = defaultdict(list)
        for job in jobs:
            p, grad, scalars = job
            views = self._flat_views(p, keys)
            if views is None:
                eager.append(job)
                continue
            # one bucket per (device, dtypes, scalars): usually one per dtype, as every param of a group is at
            # the same step; a chunk then hands its scalars to the compiled code once. Shared scalars are one
            # dict (its id is the key); per-param ones are compared by value.
            skey = tuple(scalars.items()) if self.scalars_use_param else id(scalars)
            buckets[(views[0].device, p.dtype, views[1][0].dtype if keys else None, skey)].append(
                (views, local(grad), job))
        cache: dict[Any, dict[str, Any]] = {}
        # compiled chunks always decay (a factor of 1.0 when there is none): an lr reaching 0 does not recompile
        compiled_flags = dict(flags, has_decay=True)
        for (device, *_), items in buckets.items():
            # float64 scalars: ``1 - beta2`` and friends are then computed as eagerly (in double, rounded once
            # into the float32 op), not in float32 (1 - 0.999 off by 1e-5 relative); same speed (memory-bound)
            hyper = _as_tensors({"lr": lr, "decay": decay, "l2": l2}, device, cache, torch.float64)
            scalars = _as_tensors(items[0][2][2], device, cache, torch.float64)
            for i in range(0, len(items), FUSED_CHUNK):
                chunk = items[i : i + FUSED_CHUNK]
                args = ([v[0] for v, _, _ in chunk], [g.view(-1) if g.is_contiguous() else g.reshape(-1)
                                                       for _, g, _ in chunk],
                        [v[1] for v, _, _ in chunk], hyper["lr"], hyper["decay"], hyper["l2"], scalars)
                if not self._run_compiled(group, kernel, args, compiled_flags):
                    eager.extend(job for _, _, job in chunk)
        return eager

    def _static_steps(self, group: dict[str, Any], jobs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
                      keys: tuple[str, ...], kernel: Kernel, lr: float, decay: float, l2: float,
                      flags: dict[str, bool]) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """:meth:`_fused_steps` of the static-shape path (optimizers below :data:`AUTO_FUSE_MIN_NUMEL`).

        Chunks are whole tensors (no flat views: static shapes need none), grouped as the dynamic path groups
        them, in chunks of :data:`STATIC_CHUNK`. A step is ~1 ms here, so the lists are built once
        (:class:`_StaticPlan`) and reused while the group's params and their state tensors stay the same
        objects; a step then only gathers the gradients.
        """
        params = [p for p, _, _ in jobs]
        plan = self._plans.get(id(group))
        if plan is None or not plan.valid(self.state, params, keys) or (
                self.scalars_use_param and not plan.same_scalars(jobs)):
            plan = _StaticPlan(self, jobs, keys)
            self._plans[id(group)] = plan
        grads = [local(g) for _, g, _ in jobs]
        # as the compiled code was traced: contiguous, not requiring grad (a guard failing would recompile inline)
        if not all(g.is_contiguous() and not g.requires_grad for g in grads):
            grads = [g.detach().contiguous() for g in grads]
        compiled_flags = dict(flags, has_decay=True)  # as in _fused_steps: lr reaching 0 does not recompile
        eager = [jobs[i] for i in plan.eager]
        for device, idx, ps, states, tsig in plan.chunks:
            hyper = plan.tensors({"lr": lr, "decay": decay, "l2": l2}, device, "hyper")
            args = (ps, [grads[i] for i in idx], states, hyper["lr"], hyper["decay"], hyper["l2"],
                    plan.tensors(jobs[idx[0]][2], device, "scalars"))
            if not self._run_compiled(group, kernel, args, compiled_flags, static=True, tensors=tsig):
                eager.extend(jobs[i] for i in idx)
        return eager

    def _run_compiled(self, group: dict[str, Any], kernel: Kernel, args: tuple[Any, ...],
                      compiled_flags: dict[str, bool], static: bool = False,
                      tensors: tuple[Any, ...] | None = None) -> bool:
        """Run one chunk on its compiled code; False when the chunk is left to the eager path (compiling in the
        background, compilation failed, or a recompilation failed before running: nothing written)."""
        fn = _COMPILED.get(kernel, args, compiled_flags, block=group["fused"] is True, who=type(self).__name__,
                           static=static, tensors=tensors)
        if fn is None:
            return False
        try:
            fn(*args, **compiled_flags)
        except _compile_errors() as exc:
            _COMPILED.mark_failed(_CompiledChunks.signature(kernel, args, compiled_flags, static, tensors))
            warnings.warn(f"{type(self).__name__}: recompiling the fused step failed ({type(exc).__name__}: "
                          f"{exc}); running it eagerly from now on.", RuntimeWarning, stacklevel=5)
            return False
        return True

    def _flat_views(self, p: torch.Tensor,
                    keys: tuple[str, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """1-D aliases of ``p``'s local tensor and of its state tensors (see :func:`_flat`), or None when one is
        not contiguous. Kept between steps while the parameter and its state tensors are the same objects
        (``load_state_dict`` replaces state tensors: the views are then rebuilt)."""
        state = self.state[p]
        srcs = tuple(state[k] for k in keys)
        lp = local(p)
        cached = self._views.get(p)
        # valid while the state tensors are the same objects and the param's data has not been swapped
        # (``p.data = ...`` keeps the Parameter and changes its storage)
        if (cached is not None and cached[2] == lp.data_ptr() and len(cached[0]) == len(srcs)
                and all(a is b for a, b in zip(cached[0], srcs))):
            return cached[1]
        tensors = tuple(local(t) for t in srcs)
        views = None
        if lp.is_contiguous() and all(t.is_contiguous() for t in tensors):
            views = (_flat(lp), tuple(map(_flat, tensors)))
        self._views[p] = (srcs, views, lp.data_ptr())
        return views


_data_ptr = torch.Tensor.data_ptr


class _StaticPlan:
    """The chunk lists of one group for :meth:`ScalarOptimizer._static_steps`.

    Built from a step's jobs: local tensors of the params and their state, bucketed by (device, dtypes,
    scalars) in chunks of :data:`STATIC_CHUNK`; non-contiguous ones go to the eager path. Valid while the
    optimizer's state mapping, the params (in order), their local tensors and storage (``p.data = ...``) and each
    param's state tensors are the same (``load_state_dict`` replaces state tensors).
    """

    __slots__ = ("state_map", "params", "locals", "ptrs", "dicts", "state_tensors", "flat_state", "chunks", "eager",
                 "_scalars")

    def __init__(self, opt: ScalarOptimizer, jobs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
                 keys: tuple[str, ...]) -> None:
        self.state_map = opt.state
        self.params = [p for p, _, _ in jobs]
        self.locals = [local(p) for p in self.params]
        self.ptrs = [lp.data_ptr() for lp in self.locals]
        self.dicts = [opt.state[p] for p in self.params]
        self.state_tensors = [tuple(d[k] for k in keys) for d in self.dicts]
        self.flat_state = [t for ts in self.state_tensors for t in ts]  # for the identity check, in one pass
        buckets: dict[Any, list[int]] = defaultdict(list)
        self.eager: list[int] = []
        for i, (p, _, scalars) in enumerate(jobs):
            lp, states = local(p), tuple(local(t) for t in self.state_tensors[i])
            if not (lp.is_contiguous() and all(t.is_contiguous() for t in states)):
                self.eager.append(i)
                continue
            skey = tuple(scalars.items()) if opt.scalars_use_param else id(scalars)
            buckets[(lp.device, p.dtype, states[0].dtype if states else None, skey)].append(i)
        self.chunks: list[tuple[torch.device, list[int], list[torch.Tensor], list[tuple[torch.Tensor, ...]]]] = []
        for (device, *_), idx in buckets.items():
            for k in range(0, len(idx), STATIC_CHUNK):
                part = idx[k : k + STATIC_CHUNK]
                # detached aliases: the compiled code was traced on plain tensors (its trial run's scratch copies); a
                # Parameter (requires_grad) would fail a guard and recompile inline, blocking a step for seconds
                ps = [self.locals[i].detach() for i in part]
                states = [tuple(local(t) for t in self.state_tensors[i]) for i in part]
                grads = [local(jobs[i][1]) for i in part]
                self.chunks.append((device, part, ps, states,
                                    _CompiledChunks.tensors_signature((ps, grads, states), static=True)))
        self._scalars: dict[tuple[Any, ...], torch.Tensor] = {}  # see tensors()

    def tensors(self, values: dict[str, Any], device: torch.device, kind: str) -> dict[str, Any]:
        """Floats as 0-d float64 tensors (as :func:`_as_tensors`), kept for later steps per (``kind``, name,
        value): the hyperparameters (lr, betas) are then created once, the per-step numbers (bias corrections)
        each step. Never one tensor for two names: two inputs that are one tensor make Dynamo's aliasing guard
        fail when they part (``bc1`` reaching exactly 1.0 = ``decay`` shared a tensor, then recompiled inline)."""
        out: dict[str, Any] = {}
        cache = self._scalars
        for k, v in values.items():
            if isinstance(v, bool):
                out[k] = v
                continue
            if isinstance(v, torch.Tensor):  # a tensor lr, say
                out[k] = v.to(device=device, dtype=torch.float64)
                continue
            key = (kind, k, device, float(v).hex())  # (0.0 and -0.0 are different numbers)
            t = cache.get(key)
            if t is None:
                if len(cache) > 256:  # per-step values accumulate: start over now and then
                    cache.clear()
                t = cache[key] = torch.tensor(v, dtype=torch.float64, device=device)
            out[k] = t
        return out

    def same_scalars(self, jobs: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]) -> bool:
        """Whether every chunk's jobs still share their scalars (they may depend on the param: compared by value)."""
        return all(all(jobs[i][2] == jobs[idx[0]][2] for i in idx[1:]) for _, idx, *_ in self.chunks)

    def valid(self, state_map: Any, params: list[torch.Tensor], keys: tuple[str, ...]) -> bool:
        if not (state_map is self.state_map and len(params) == len(self.params)
                and all(map(operator.is_, params, self.params))):
            return False
        lps = [local(p) for p in params]  # a DTensor's local tensor, or a param's storage (p.data = ...), may change
        return (all(map(operator.is_, lps, self.locals)) and list(map(_data_ptr, lps)) == self.ptrs
                and all(map(operator.is_, [d[k] for d in self.dicts for k in keys], self.flat_state)))


# ---------------------------------------------------------------------------------------------------------------
# Optimizers built from an update function, with the reference library's constructor
# ---------------------------------------------------------------------------------------------------------------


def _validate_common_hparams(*, lr: float | None = None, betas: tuple[float, ...] | None = None,
                             eps: float | None = None, weight_decay: float | None = None) -> None:
    """Check the hyperparameters most scalar optimizers share; ``None`` skips one.

    Kept for subclasses written for the reference library, which import it from this module.
    """
    if lr is not None:
        check_nonneg("lr", lr)
    if betas is not None:
        for i, b in enumerate(betas):
            check_beta(f"betas[{i}]", b)
    if eps is not None:
        check_nonneg("eps", eps)
    if weight_decay is not None:
        check_nonneg("weight_decay", weight_decay)


class UpdateFnOptimizer(ScalarOptimizer):
    """A :class:`ScalarOptimizer` whose kernel is an update function handed to the constructor.

    This is the reference library's way of declaring a scalar optimizer, kept so that its subclasses run
    unchanged: ``state_keys`` (a class attribute) names the zero-initialised state tensors, and every step
    calls, per parameter with a gradient,

    ``u = update_fn(grad, *state[state_keys], step=t, **{k: group[k] for k in update_kwarg_names})``

    then ``p <- p - lr*u``, with weight decay (``group["weight_decay"]``, ``weight_decay_method``) applied
    before, between the hooks :meth:`pre_step_inplace` and :meth:`post_step_inplace`. ``step`` counts from 1.
    The functions of :mod:`emerging_optimizers.scalar_optimizers.update_functions` have this signature.

    Differences from the reference: ``step(closure)`` accepts a closure and returns its loss; ``l2`` weight
    decay does not modify ``p.grad`` in place; ``weight_decay_method`` is kept in the param groups (so it may
    differ per group and is saved in ``state_dict()``). The compiled fast path is off (``fused`` must be
    False): ``update_fn`` is arbitrary code.

    Args:
        params: parameters or param groups.
        defaults: the group defaults; must hold ``lr``, ``weight_decay`` and every name in ``update_kwarg_names``.
        update_fn: ``update_fn(grad, *state_tensors, step=..., **hyperparameters) -> update``, updating the state
            tensors in place.
        update_kwarg_names: the group keys handed to ``update_fn`` as keyword arguments.
        weight_decay_method: ``"decoupled"`` (default), ``"independent"``, ``"l2"`` or ``"palm"``.
    """

    state_keys: ClassVar[tuple[str, ...]] = ()
    scalars_use_param = False

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, update_fn: Callable[..., torch.Tensor],
                 update_kwarg_names: tuple[str, ...], weight_decay_method: WeightDecayT = "decoupled",
                 nonfinite: NonfiniteT = "skip") -> None:
        if not callable(update_fn):
            raise TypeError(f"update_fn must be callable, got {type(update_fn).__name__}.")
        if isinstance(update_kwarg_names, str):
            raise TypeError(f"update_kwarg_names must be a tuple of names, got the string {update_kwarg_names!r}.")
        missing = sorted(set(update_kwarg_names) - set(defaults))
        if missing:
            raise ValueError(f"update_kwarg_names {missing} not present in defaults (keys: {sorted(defaults)}).")
        self.update_fn = update_fn
        self.update_kwarg_names = tuple(update_kwarg_names)
        super().__init__(params, dict(defaults, weight_decay_method=weight_decay_method), fused=False,
                         nonfinite=nonfinite)

    def pre_step_inplace(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        """Hook called before the weight decay and the update; its return value reaches :meth:`post_step_inplace`."""
        return None

    def post_step_inplace(self, p: torch.Tensor, group: dict[str, Any], ctx: Any) -> None:
        """Hook called after the update, with what :meth:`pre_step_inplace` returned."""

    # ------------------------------------------------------------------ ScalarOptimizer interface
    def _kernel(self) -> Kernel:
        return self.update_fn

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        kwargs = {key: group[key] for key in self.update_kwarg_names}
        kwargs["step"] = step
        return kwargs

    def _check_group(self, group: dict[str, Any]) -> None:
        if group["fused"] is not False:
            raise ValueError(f"{type(self).__name__} has no fused step (its update_fn is arbitrary code); "
                             f"got fused={group['fused']!r}, use False.")

    def pre_step(self, p: torch.Tensor, group: dict[str, Any]) -> Any:
        return self.pre_step_inplace(p, group)

    def post_step(self, p: torch.Tensor, group: dict[str, Any], ctx: Any) -> None:
        self.post_step_inplace(p, group, ctx)


#: The reference library's name of :class:`UpdateFnOptimizer`.
_ScalarOptimizerBase = UpdateFnOptimizer


class SingleMomentumOptimizer(UpdateFnOptimizer):
    """An :class:`UpdateFnOptimizer` with one state tensor, ``exp_avg`` (e.g. Lion, Signum)."""

    state_keys: ClassVar[tuple[str, ...]] = ("exp_avg",)


class TwoMomentsOptimizer(UpdateFnOptimizer):
    """An :class:`UpdateFnOptimizer` with two state tensors, ``exp_avg`` and ``exp_avg_sq`` (e.g. LaProp)."""

    state_keys: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")
