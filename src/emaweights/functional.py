r"""Pure in-place update kernels on lists of tensors.

Everything here is stateless: the caller owns the tensors and the step counter.
Each kernel has a *foreach* path (one multi-tensor launch, used by default when
every tensor is on a device torch supports for it) and a per-tensor path (a
Python loop, the reference). A test checks that both give the same numbers.

None of these functions reads a value back to the host: the weight is a
Python ``float`` (or a 0-dim tensor that stays on the device), so a training
loop never waits on the EMA. The same-dtype paths and the staged kernels
allocate nothing. The mixed-dtype path of :func:`lerp_` may materialize a cast
of a source tensor (on the CPU, or with a tensor weight); the EMA's update
takes :func:`lerp_staged_` for mixed dtypes instead, which does not, or,
when asked to, :func:`lerp_compiled_`, which also reads every byte only once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Batch",
    "bias_corrected_ema_",
    "copy_",
    "ema_update_",
    "lerp_",
    "lerp_compiled_",
    "lerp_staged_",
    "lerp_stochastic_",
    "mean_",
    "stage_batches",
    "stochastic_round_",
]

Weight = float | Tensor


def _use_foreach(tensors: Sequence[Tensor], foreach: bool | None) -> bool:
    """Decide whether to take the foreach path (``None`` means: when possible)."""
    if foreach is not None:
        return foreach
    if not tensors:
        return False
    # Foreach kernels exist for CPU and CUDA-like devices; they fall back
    # internally (still correctly) when tensors are not fast-path compatible.
    return all(t.device.type in ("cpu", "cuda", "xpu", "mps") for t in tensors)


def _check_pairs(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    """Refuse lists of different lengths, which would silently pair the wrong tensors."""
    if len(a) != len(b):
        raise ValueError(f"{what}: got {len(a)} target tensors but {len(b)} source tensors")


def lerp_(
    target: Sequence[Tensor],
    source: Sequence[Tensor],
    weight: Weight,
    *,
    foreach: bool | None = None,
) -> None:
    r"""Move ``target`` toward ``source`` in place: :math:`t \leftarrow t + w\,(s - t)`.

    When ``target`` and ``source`` differ in dtype (an fp32 shadow of a bf16
    model), the update is computed as :math:`t \leftarrow (1 - w)\,t + w\,s`,
    in ``target``'s dtype; with a float weight on CUDA there is no full-size
    temporary, elsewhere a cast of the source may be materialized (see
    :func:`lerp_staged_` for a path that never allocates).

    Args:
        target: tensors updated in place.
        source: tensors read, paired with ``target`` by position; same shapes.
        weight: :math:`w`, a float or a 0-dim tensor on the targets' device.
        foreach: force (``True``) or forbid (``False``) the multi-tensor path;
            ``None`` picks it whenever the tensors allow.

    """
    _check_pairs(target, source, "lerp_")
    if not target:
        return
    same_dtype = all(t.dtype == s.dtype for t, s in zip(target, source, strict=True))
    if _use_foreach(target, foreach):
        if same_dtype:
            torch._foreach_lerp_(list(target), list(source), weight)  # type: ignore[arg-type]
        else:
            _foreach_scale_add_(target, source, weight)
        return
    for t, s in zip(target, source, strict=True):
        if t.dtype == s.dtype:
            t.lerp_(s, weight)
        elif isinstance(weight, Tensor):
            t.mul_(1 - weight).add_(s * weight)
        else:
            t.mul_(1.0 - weight).add_(s, alpha=weight)


def _foreach_scale_add_(target: Sequence[Tensor], source: Sequence[Tensor], weight: Weight) -> None:
    r"""Mixed-dtype foreach update :math:`t \leftarrow (1 - w)\,t + w\,s`."""
    targets = list(target)
    if isinstance(weight, Tensor):
        torch._foreach_mul_(targets, 1 - weight)
        torch._foreach_add_(targets, torch._foreach_mul(list(source), weight))
        return
    torch._foreach_mul_(targets, 1.0 - weight)
    torch._foreach_add_(targets, list(source), alpha=weight)


def ema_update_(
    shadow: Sequence[Tensor],
    live: Sequence[Tensor],
    weight: Weight,
    *,
    foreach: bool | None = None,
) -> None:
    r"""One exponential-moving-average step, in place on ``shadow``.

    .. math::
        \bar\theta \leftarrow \beta\,\bar\theta + (1 - \beta)\,\theta
        = \bar\theta + w\,(\theta - \bar\theta), \qquad w = 1 - \beta

    Args:
        shadow: the averages :math:`\bar\theta`, updated in place.
        live: the current weights :math:`\theta`, paired with ``shadow`` by position.
        weight: :math:`w = 1 - \beta`, the weight of the new value.
        foreach: see :func:`lerp_`.

    """
    lerp_(shadow, live, weight, foreach=foreach)


def copy_(
    target: Sequence[Tensor], source: Sequence[Tensor], *, foreach: bool | None = None
) -> None:
    """Copy ``source`` into ``target`` in place (casting dtype and device as needed).

    Args:
        target: tensors overwritten in place.
        source: tensors read, paired with ``target`` by position; same shapes.
        foreach: see :func:`lerp_`.

    """
    _check_pairs(target, source, "copy_")
    if not target:
        return
    if _use_foreach(target, foreach) and hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(list(target), list(source), non_blocking=True)
        return
    for t, s in zip(target, source, strict=True):
        t.copy_(s, non_blocking=True)


def mean_(
    target: Sequence[Tensor],
    sources: Sequence[Sequence[Tensor]],
    *,
    foreach: bool | None = None,
) -> None:
    r"""Overwrite ``target`` with the mean of the ``sources`` lists: :math:`t = \frac1n\sum_i s_i`.

    The sum runs in the order of ``sources`` (so the result is reproducible
    bit for bit), in ``target``'s dtype.

    Args:
        target: tensors overwritten in place.
        sources: ``n >= 1`` lists, each paired with ``target`` by position.
        foreach: see :func:`lerp_`.

    Raises:
        ValueError: no source list, or a list of another length.

    """
    if not sources:
        raise ValueError("mean_: needs at least one source list, got none")
    for s in sources:
        _check_pairs(target, s, "mean_")
    if not target:
        return
    n = float(len(sources))
    if _use_foreach(target, foreach):
        targets = list(target)
        torch._foreach_copy_(targets, list(sources[0]))
        for s in sources[1:]:
            torch._foreach_add_(targets, list(s))
        torch._foreach_div_(targets, n)
        return
    for i, t in enumerate(target):
        t.copy_(sources[0][i])
        for s in sources[1:]:
            t.add_(s[i])
        t.div_(n)


def bias_corrected_ema_(
    result: Sequence[Tensor],
    ema: Sequence[Tensor],
    reference: Sequence[Tensor],
    live: Sequence[Tensor],
    ema_weight: float,
    correction: float,
    *,
    foreach: bool | None = None,
) -> None:
    r"""One BEMA step (Block & Zhang 2025), in place on ``ema`` and ``result``.

    .. math::
        \mu \leftarrow \mu + w\,(\theta - \mu), \qquad
        \hat\theta \leftarrow \mu + c\,(\theta - \theta_0)

    with :math:`w` the EMA's new-value weight and :math:`c` the weight of the
    bias correction.

    Args:
        result: :math:`\hat\theta`, overwritten.
        ema: :math:`\mu`, updated in place.
        reference: :math:`\theta_0`, read.
        live: :math:`\theta`, read (may have another dtype than the others).
        ema_weight: :math:`w`.
        correction: :math:`c`.
        foreach: see :func:`lerp_`.

    """
    for other, what in ((ema, "ema"), (reference, "reference"), (live, "live")):
        _check_pairs(result, other, f"bias_corrected_ema_ ({what})")
    lerp_(ema, live, ema_weight, foreach=foreach)
    if not result:
        return
    if _use_foreach(result, foreach):
        results = list(result)
        torch._foreach_copy_(results, list(ema))
        torch._foreach_add_(results, list(live), alpha=correction)
        torch._foreach_add_(results, list(reference), alpha=-correction)
        return
    for r, m, x, x0 in zip(result, ema, live, reference, strict=True):
        r.copy_(m).add_(x, alpha=correction).add_(x0, alpha=-correction)


# -- staged kernels: mixed dtypes and stochastic rounding without a full-size temporary --

Batch = tuple[list[Tensor], list[Tensor], list[Tensor]]
"""(targets, sources, staging views): 1-D pieces updated together through the staging buffer."""


def stage_batches(
    target: Sequence[Tensor], source: Sequence[Tensor], staging: Tensor
) -> list[Batch]:
    """Cut ``target``/``source`` pairs into pieces that fit the 1-D ``staging`` buffer.

    Large tensors are split into chunks of ``staging.numel()`` elements; small
    ones are packed together so that one batch fills the buffer. The result
    holds only views (built once, reused by every :func:`lerp_staged_` call).
    A non-contiguous source (a ``channels_last`` weight) is cut into slices of
    its first dimension instead, each staged under its own shape, so the cast
    into the staging buffer reads it through its strides.

    Raises:
        ValueError: lists of different lengths, a non-contiguous target, a pair
            of different shapes, a slice of a non-contiguous source larger than
            the staging buffer, or an empty or non-1-D staging buffer.

    """
    _check_pairs(target, source, "stage_batches")
    if staging.dim() != 1 or staging.numel() == 0:
        raise ValueError(
            f"staging must be a non-empty 1-D tensor, got shape {tuple(staging.shape)}"
        )
    cap = staging.numel()
    batches: list[Batch] = []
    tgt: list[Tensor] = []
    src: list[Tensor] = []
    stg: list[Tensor] = []
    used = 0
    for t, s in zip(target, source, strict=True):
        if not t.is_contiguous() or t.numel() != s.numel():
            raise ValueError(f"stage_batches needs contiguous targets of equal size, got {t.shape}")
        pieces: list[tuple[Tensor, Tensor]] = []
        if s.is_contiguous():
            tf, sf = t.view(-1), s.view(-1)
            pieces = [(tf[lo : lo + cap], sf[lo : lo + cap]) for lo in range(0, tf.numel(), cap)]
        elif s.numel():
            if t.shape != s.shape:
                raise ValueError(f"stage_batches: shapes differ, {t.shape} and {s.shape}")
            rows = cap // s[0].numel()
            if rows == 0:
                raise ValueError(
                    f"stage_batches: a slice of the non-contiguous {tuple(s.shape)} tensor "
                    f"({s[0].numel()} elements) exceeds the staging buffer ({cap})"
                )
            pieces = [(t[lo : lo + rows], s[lo : lo + rows]) for lo in range(0, s.shape[0], rows)]
        for tp, sp in pieces:
            n = tp.numel()
            if used + n > cap:
                batches.append((tgt, src, stg))
                tgt, src, stg, used = [], [], [], 0
            tgt.append(tp)
            src.append(sp)
            stg.append(staging[used : used + n].view(tp.shape))
            used += n
    if tgt:
        batches.append((tgt, src, stg))
    return batches


def lerp_staged_(
    batches: Sequence[Batch],
    weight: float,
    *,
    work: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    r"""Mixed-precision :math:`t \leftarrow t + w\,(s - t)` through a cache-sized staging buffer.

    Each batch casts its source pieces into the staging buffer (which stays in
    cache), then runs one same-dtype ``lerp_`` from there: the target and source
    are each read once and the target written once, and no full-size temporary
    is made. The staging buffer has the target's dtype.

    With ``work`` and ``noise`` (stochastic rounding of a bfloat16 target), the
    update is computed in float32 in ``work`` (staging and ``work`` are float32,
    the size of the staging buffer) and rounded to bfloat16 stochastically (see
    :func:`stochastic_round_`), so that the expected shadow equals the exact
    average even when :math:`w\,(s - t)` is below bfloat16 resolution.

    Args:
        batches: from :func:`stage_batches`.
        weight: :math:`w`.
        work: float32 buffer like the staging buffer, for stochastic rounding.
        noise: int32 buffer like the staging buffer, for stochastic rounding.
        generator: random generator of the rounding noise.

    """
    if work is None:
        for tgt, src, stg in batches:
            if len(tgt) == 1:  # one chunk of a large tensor: skip the foreach wrapper
                stg[0].copy_(src[0])
                tgt[0].lerp_(stg[0], weight)
            else:
                torch._foreach_copy_(stg, src)
                torch._foreach_lerp_(tgt, stg, weight)
        return
    if noise is None:
        raise ValueError("stochastic rounding needs both work and noise buffers")
    for tgt, src, stg in batches:
        n = sum(t.numel() for t in tgt)
        acc, rnd = work[:n], noise[:n]
        accs = [
            acc[lo : lo + t.numel()].view(t.shape) for lo, t in zip(_offsets(tgt), tgt, strict=True)
        ]
        torch._foreach_copy_(stg, src)
        torch._foreach_copy_(accs, tgt)
        torch._foreach_lerp_(accs, stg, weight)
        stochastic_round_(acc, rnd, generator)
        torch._foreach_copy_(tgt, accs)


def lerp_stochastic_(
    target: Sequence[Tensor],
    source: Sequence[Tensor],
    weight: float,
    *,
    generator: torch.Generator | None = None,
) -> None:
    r"""Per-tensor reference of :func:`lerp_staged_` with stochastic rounding.

    For each bfloat16 target :math:`t`: :math:`t \leftarrow \mathrm{round}(t + w\,(s - t))`,
    computed in float32 and rounded by :func:`stochastic_round_`. One float32
    temporary per tensor (this is the ``foreach=False`` path, not the fast
    one). The noise is drawn tensor by tensor in list order, which on the CPU
    is the same stream :func:`lerp_staged_` draws, so both give the same bits.

    Args:
        target: bfloat16 tensors, updated in place.
        source: tensors of the same shapes, any floating dtype.
        weight: :math:`w`.
        generator: random generator of the rounding noise.

    Raises:
        ValueError: lists of different lengths.

    """
    _check_pairs(target, source, "lerp_stochastic_")
    for t, s in zip(target, source, strict=True):
        acc = t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        acc.lerp_(s.to(torch.float32), weight)
        stochastic_round_(
            acc, torch.empty(acc.shape, dtype=torch.int32, device=acc.device), generator
        )
        t.copy_(acc)


def _lerp_cast_(target: Tensor, source: Tensor, weight: Tensor) -> None:
    target.lerp_(source.to(target.dtype), weight)


_compiled: dict[str, object] = {}


def lerp_compiled_(target: Tensor, source: Tensor, weight: Tensor) -> None:
    r"""Mixed-precision :math:`t \leftarrow t + w\,(s - t)` in one fused pass, compiled.

    ``torch.compile`` (Inductor) fuses the cast of ``source`` into the update,
    so each element of ``source`` and ``target`` is read once and ``target``
    written once, with no temporary, where the eager :func:`lerp_staged_`
    moves the staging buffer too (measured in ``docs/performance.md``).
    Pass tensors that are not views of a differently shaped base (Inductor
    compiles those into a slower element-by-element kernel). The kernel is
    compiled for dynamic sizes once per process (per dtype pair and device;
    seconds on a CPU, which needs a C++ compiler) and reused for every size.
    Its numbers may differ from the eager kernels' in the last bit (a fused
    multiply-add), and the weight is a tensor so that a changing decay does
    not recompile.

    Args:
        target: 1-D contiguous tensor, updated in place.
        source: 1-D contiguous tensor of the same size, any floating dtype.
        weight: :math:`w`, a 0-dim tensor on ``target``'s device.

    Raises:
        ValueError: the tensors are not 1-D contiguous tensors of equal size,
            or ``weight`` is not a 0-dim tensor.

    """
    if target.dim() != 1 or source.shape != target.shape:
        raise ValueError(
            f"lerp_compiled_ needs 1-D tensors of equal size, got {tuple(target.shape)} "
            f"and {tuple(source.shape)}"
        )
    if not (target.is_contiguous() and source.is_contiguous()):
        raise ValueError("lerp_compiled_ needs contiguous tensors")
    if not isinstance(weight, Tensor) or weight.dim() != 0:
        raise ValueError(f"lerp_compiled_ needs a 0-dim tensor weight, got {weight!r}")
    fn = _compiled.get("lerp")
    if fn is None:
        # dynamic: one kernel for every size (a model's groups, several models)
        fn = _compiled["lerp"] = torch.compile(_lerp_cast_, dynamic=True, fullgraph=True)
    fn(target, source, weight)  # type: ignore[operator]


def _offsets(tensors: Sequence[Tensor]) -> list[int]:
    """Start offsets of ``tensors`` laid out back to back."""
    out, lo = [], 0
    for t in tensors:
        out.append(lo)
        lo += t.numel()
    return out


def stochastic_round_(x: Tensor, noise: Tensor, generator: torch.Generator | None = None) -> None:
    r"""Round float32 ``x`` in place to a bfloat16-representable value, stochastically.

    A value between two neighbouring bfloat16 numbers :math:`a < x < b` becomes
    :math:`b` with probability :math:`(x - a) / (b - a)`, else :math:`a`, so
    :math:`\mathbb{E}[\mathrm{round}(x)] = x`. Implemented on the bit pattern:
    add uniform noise in :math:`[0, 2^{16})` to the low 16 bits and clear them
    (bfloat16 is the top 16 bits of float32). Values within one bfloat16 step of
    the largest finite number may round to infinity.

    Args:
        x: float32, contiguous; overwritten.
        noise: int32 scratch of ``x``'s size; overwritten.
        generator: random generator.

    """
    bits = x.view(torch.int32)
    noise.random_(0, 1 << 16, generator=generator)
    bits.add_(noise).bitwise_and_(-(1 << 16))
