"""Compiled per-block Sinkhorn sweeps (Numba): one read of a kernel block per iteration.

For a row block ``K_I`` of the kernel (or ``D_I`` of the cost in the log domain), the column
potential ``g`` (``b = exp(g / eps)``) and the row masses ``p_I``, each sweep

1. updates the row scaling of every row ``i`` of the block,
   ``a_i = p_i / sum_j K_ij b_j``  (log domain: ``f_i = eps log p_i - eps LSE_j((g_j - D_ij)/eps)``),
2. adds the block's share of the column marginal of the plan ``T = diag(a) K diag(b)``,
   ``out_j += a_i K_ij b_j`` (the log domain returns ``log sum_i T_ij`` instead, exact at any eps),

row by row, so the row is still in cache for step 2 and the block is read from memory once.
Blocks stored as float16 or bfloat16 bit patterns (:mod:`ssa_dask.kernel.precision`) are decoded
in registers as they are read (:func:`kernel_sweep` on a uint16 block).
The functions release the GIL, so Dask threads run blocks in parallel.
"""

from __future__ import annotations

import platform
from typing import Any

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

#: Rows whose contributions are summed in float32 before they join the float64 accumulator.
_FLUSH_ROWS = 64
#: ``2^(127 - 15)``: moves a float16 exponent, shifted into float32's place, to float32's bias.
_F16_REBIAS = np.float32(2.0**112)


@intrinsic
def _as_float32(typingctx: Any, word: Any) -> Any:
    """The float32 whose bits are the uint32 ``word`` (a register bit cast, no memory)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@numba.njit(inline="always")
def _float16_magnitude(h: np.uint16) -> np.float32:
    """``|x|`` of a finite float16 ``x`` given by its bits, as float32, exactly.

    Exponent and mantissa are shifted into float32's place, which is ``|x| 2^-112``, and multiplied
    by ``2^112`` (exact, for float16 subnormals too).  Only float16 subnormals make a float32
    subnormal operand, slow on some CPUs; stored rows peak at ``2^15`` so that only entries
    below ``2^-29`` of their row's maximum are float16 subnormals
    (:data:`ssa_dask.kernel.precision.ROW_MAX`).
    """
    return _as_float32((np.uint32(h) & np.uint32(0x7FFF)) << np.uint32(13)) * _F16_REBIAS


@intrinsic
def _half_to_float32(typingctx: Any, bits: Any) -> Any:
    """The float16 whose bits are the uint16 ``bits``, widened to float32 (exact for every pattern).

    A bit cast to LLVM's ``half`` and an ``fpext``: on CPUs with F16C (x86-64-v3 and later) the
    loop vectoriser turns it into ``vcvtph2ps``, one instruction for 8 or 16 entries, float16
    subnormals included.
    """

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


def _widens_half_in_hardware() -> bool:
    """Whether Numba's target CPU converts float16 to float32 in hardware (x86 F16C, or AArch64).

    Without it LLVM lowers ``fpext half`` to a runtime-library call that Numba cannot link (the
    process aborts), so a generic or named target (``NUMBA_CPU_NAME``, e.g. for portable caches),
    or features without F16C (``NUMBA_CPU_FEATURES``), use the integer decoding instead.
    """
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    if numba.config.CPU_FEATURES is not None:
        return "+f16c" in numba.config.CPU_FEATURES.split(",")
    return bool(llvm.get_host_cpu_features().get("f16c", False))


#: float16 entries are widened by the CPU's conversion (else by integer decoding, same values).
HARDWARE_HALF = _widens_half_in_hardware()
_float16_value = _half_to_float32 if HARDWARE_HALF else _float16_magnitude


@numba.njit(inline="always")
def _bfloat16_value(h: np.uint16) -> np.float32:
    """The bfloat16 given by its bits, as float32 (its upper half), exactly."""
    return _as_float32(np.uint32(h) << np.uint32(16))


def _entry(rows, i, j, bfloat16):  # noqa: ANN001, ANN201 - the overload's signature must match its implementations
    """Entry ``(i, j)`` of a kernel block as float32: read (float32 block) or decoded (uint16 bits).

    Stored 16-bit entries are finite and non-negative (:mod:`ssa_dask.kernel.precision`).
    """
    raise NotImplementedError("compiled only (a Numba overload)")


@overload(_entry)
def _entry_overload(rows, i, j, bfloat16):  # noqa: ANN001, ANN201
    """The implementation of :func:`_entry` for the block's dtype."""
    if rows.dtype == types.float32:
        return lambda rows, i, j, bfloat16: rows[i, j]
    if rows.dtype == types.uint16:
        def decoded(rows, i, j, bfloat16):  # noqa: ANN001, ANN202
            h = rows[i, j]
            if bfloat16:
                return _bfloat16_value(h)
            return _float16_value(h)

        return decoded
    return None


@numba.njit(nogil=True, fastmath=True, cache=True, error_model="numpy")
def kernel_sweep(K: np.ndarray, p: np.ndarray, b: np.ndarray, out: np.ndarray, bfloat16: bool = False) -> None:
    """Add ``b * (K^T (p / (K b)))`` of one block to ``out`` (kernel domain).

    Rows are taken eight at a time: one pass over ``b`` gives eight row sums, and one pass over the
    float32 partial column sums adds eight rows, so each element of ``K`` is loaded from memory
    once and the partial sums are loaded and stored once per eight rows (with four rows, that
    load and store moved as many bytes as a float16 block itself).  Row sums and up to
    ``_FLUSH_ROWS`` rows of contributions are accumulated in float32 (twice the vector width of
    float64), then flushed into a float64 accumulator, so the column marginal keeps float64
    accuracy over millions of rows.

    A block stored as float16 or bfloat16 bit patterns (uint16) is decoded in registers as it is
    read (its eight rows are still in cache for the second pass), so it is read from memory once at
    2 bytes per entry; its per-row scale (:class:`ssa_dask.kernel.precision.HalfRows`) cancels here.

    Parameters
    ----------
    K : (n, S) float32 array, or (n, S) uint16 array of float16 / bfloat16 bits
        Kernel block ``exp(-D / eps)`` (row-scaled when stored in 16 bits).
    p : (n,) float64 array
        Row masses of the block.
    b : (S,) float32 array
        Column scaling ``exp(g / eps)``.
    out : (S,) float64 array
        Accumulator of the plan's column marginal; updated in place.
    bfloat16 : bool
        Whether a uint16 ``K`` holds bfloat16 bits (else float16); ignored for a float32 ``K``.
    """
    n, s = K.shape
    acc = np.zeros(s, dtype=np.float64)
    partial = np.zeros(s, dtype=np.float32)
    i = 0
    pending = 0
    while i < n:
        if i + 8 <= n:
            r0 = r1 = r2 = r3 = r4 = r5 = r6 = r7 = np.float32(0.0)
            for j in range(s):
                bj = b[j]
                r0 += _entry(K, i, j, bfloat16) * bj
                r1 += _entry(K, i + 1, j, bfloat16) * bj
                r2 += _entry(K, i + 2, j, bfloat16) * bj
                r3 += _entry(K, i + 3, j, bfloat16) * bj
                r4 += _entry(K, i + 4, j, bfloat16) * bj
                r5 += _entry(K, i + 5, j, bfloat16) * bj
                r6 += _entry(K, i + 6, j, bfloat16) * bj
                r7 += _entry(K, i + 7, j, bfloat16) * bj
            a0 = np.float32(p[i] / np.float64(r0))
            a1 = np.float32(p[i + 1] / np.float64(r1))
            a2 = np.float32(p[i + 2] / np.float64(r2))
            a3 = np.float32(p[i + 3] / np.float64(r3))
            a4 = np.float32(p[i + 4] / np.float64(r4))
            a5 = np.float32(p[i + 5] / np.float64(r5))
            a6 = np.float32(p[i + 6] / np.float64(r6))
            a7 = np.float32(p[i + 7] / np.float64(r7))
            for j in range(s):
                partial[j] += (((a0 * _entry(K, i, j, bfloat16) + a1 * _entry(K, i + 1, j, bfloat16))
                                + (a2 * _entry(K, i + 2, j, bfloat16) + a3 * _entry(K, i + 3, j, bfloat16)))
                               + ((a4 * _entry(K, i + 4, j, bfloat16) + a5 * _entry(K, i + 5, j, bfloat16))
                                  + (a6 * _entry(K, i + 6, j, bfloat16) + a7 * _entry(K, i + 7, j, bfloat16))))
            i += 8
            pending += 8
        else:
            r0 = np.float32(0.0)
            for j in range(s):
                r0 += _entry(K, i, j, bfloat16) * b[j]
            a0 = np.float32(p[i] / np.float64(r0))
            for j in range(s):
                partial[j] += a0 * _entry(K, i, j, bfloat16)
            i += 1
            pending += 1
        if pending >= _FLUSH_ROWS or i >= n:
            for j in range(s):
                acc[j] += partial[j]
                partial[j] = 0.0
            pending = 0
    for j in range(s):
        out[j] += acc[j] * b[j]


@numba.njit(nogil=True, cache=True)
def decode_half(bits: np.ndarray, bfloat16: bool) -> np.ndarray:
    """float16 (or bfloat16) bit patterns as float32 values, exactly, for every one of the 65,536 patterns.

    Parameters
    ----------
    bits : (n, S) uint16 array
    bfloat16 : bool
        Whether ``bits`` are bfloat16 (else float16).

    Returns
    -------
    (n, S) float32 array
    """
    n, s = bits.shape
    out = np.empty((n, s), dtype=np.float32)
    for i in range(n):
        for j in range(s):
            h = bits[i, j]
            if bfloat16:
                out[i, j] = _bfloat16_value(h)
                continue
            sign = (np.uint32(h) & np.uint32(0x8000)) << np.uint32(16)
            if np.uint32(h) & np.uint32(0x7C00) == np.uint32(0x7C00):  # infinity or NaN: keep the payload
                out[i, j] = _as_float32(sign | np.uint32(0x7F800000) | ((np.uint32(h) & np.uint32(0x3FF)) << np.uint32(13)))
            else:
                value = _float16_magnitude(h)
                out[i, j] = -value if sign else value
    return out


#: Fast-math flags of the log-domain sweep: those of ``fastmath=True`` except "no NaN / no inf", so
#: ``-inf`` and ``exp`` underflow keep their IEEE meaning.
_LOG_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
#: A block's column sum accumulated in the linear domain is used when it is at least ``exp(-600)``:
#: every term lost to underflow is below 1e-323, so the sum is then exact to ``n_rows * 1e-62``
#: (relative).  Smaller sums are recomputed as a log-sum-exp over the block.
_LINEAR_FLOOR = float(np.exp(-600.0))


@numba.njit(nogil=True, fastmath=_LOG_FASTMATH, cache=True, error_model="numpy")
def log_sweep(D: np.ndarray, p: np.ndarray, g: np.ndarray, eps: float, out: np.ndarray) -> None:
    """Write the log of the plan's column marginal of one block to ``out`` (log domain, stabilised).

    Row ``i`` of the plan after its row update is ``T_ij = p_i exp(t_ij - m_i) / s_i`` with
    ``t_ij = (g_j - D_ij)/eps``, ``m_i = max_l t_il`` and ``s_i = sum_l exp(t_il - m_i)``, so no
    exponential overflows and every row sums to ``p_i``; ``log T_ij = r_i + t_ij`` with
    ``r_i = log(p_i / s_i) - m_i``.

    The block's column sums ``sum_i T_ij`` are first accumulated in float64 in the same pass (one
    ``exp`` per entry).  A column whose sum is at least ``_LINEAR_FLOOR`` is exact; any other
    column (all of its entries in this block tiny: eps very small, far from every cell of the
    block) is recomputed as ``log sum_i exp(r_i + t_ij)`` with its column maximum taken first,
    so its log marginal is exact at any eps, however far below float64's range it lies.

    Parameters
    ----------
    D : (n, S) float32 array
        Cost block.
    p : (n,) float64 array
        Row masses of the block (positive).
    g : (S,) float64 array
        Column potential.
    eps : float
        Entropic regularisation.
    out : (S,) float64 array
        Receives ``log sum_i T_ij`` of the block.
    """
    n, s = D.shape
    inv_eps = 1.0 / eps
    buf = np.empty(s, dtype=np.float64)
    linear = np.zeros(s, dtype=np.float64)
    row_offset = np.empty(n, dtype=np.float64)
    for i in range(n):
        m = (g[0] - D[i, 0]) * inv_eps
        for j in range(s):
            t = (g[j] - D[i, j]) * inv_eps
            buf[j] = t
            m = max(m, t)
        total = 0.0
        for j in range(s):
            e = np.exp(buf[j] - m)
            buf[j] = e
            total += e
        c = p[i] / total
        row_offset[i] = np.log(c) - m
        for j in range(s):
            linear[j] += c * buf[j]
    n_starved = 0
    for j in range(s):
        if linear[j] >= _LINEAR_FLOOR:
            out[j] = np.log(linear[j])
        else:
            n_starved += 1
    if n_starved:
        starved = np.empty(n_starved, dtype=np.int64)
        k = 0
        for j in range(s):
            if linear[j] < _LINEAR_FLOOR:
                starved[k] = j
                k += 1
        _log_sum_columns(D, g, inv_eps, row_offset, starved, out)


@numba.njit(nogil=True, fastmath=_LOG_FASTMATH, cache=True, error_model="numpy")
def _log_sum_columns(D: np.ndarray, g: np.ndarray, inv_eps: float, row_offset: np.ndarray, columns: np.ndarray,
                     out: np.ndarray) -> None:
    """``out[j] = log sum_i exp(row_offset_i + (g_j - D_ij)/eps)`` for ``j`` in ``columns``: max first, then the sum."""
    n = D.shape[0]
    k = columns.size
    top = np.empty(k, dtype=np.float64)
    for c in range(k):
        j = columns[c]
        top[c] = row_offset[0] + (g[j] - D[0, j]) * inv_eps
    for i in range(1, n):
        for c in range(k):
            j = columns[c]
            top[c] = max(top[c], row_offset[i] + (g[j] - D[i, j]) * inv_eps)
    acc = np.zeros(k, dtype=np.float64)
    for i in range(n):
        for c in range(k):
            j = columns[c]
            acc[c] += np.exp(row_offset[i] + (g[j] - D[i, j]) * inv_eps - top[c])
    for c in range(k):
        out[columns[c]] = top[c] + np.log(acc[c])
