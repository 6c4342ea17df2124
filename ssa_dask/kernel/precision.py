"""Reduced-precision kernel rows: float16 or bfloat16 bits with a per-row scale.

A kernel row block of reduced precision holds ``K~_ij = ROW_MAX * K_ij / max_l K_il`` (every
row's largest entry is ``ROW_MAX``, so no row underflows) as the 16-bit patterns of IEEE float16
or bfloat16, and each row's log scale ``log(max_l K_il / ROW_MAX)`` in float64, so that
``K_ij = K~_ij exp(log_scale_i)``.  The scale cancels in the plan's column marginal
(``a_i K_ij = p_i K~_ij / sum_l K~_il b_l``) and enters only the row potential ``f``.  The Numba
sweeps decode the bits in registers (:mod:`ssa_dask.kernel._sweeps`); accumulation stays float32/float64.

float16 rows peak at ``2^15`` (float16's largest power of two below its maximum 65504), so its
normal range reaches ``2^-29`` of the row maximum (``exp(-20)``, the smallest entry at
``lam = 0.05``) instead of ``2^-14``; bfloat16 has float32's exponent range and rows peak at 1.

Rounding error of one stored entry, relative to its row's largest entry ``k = K / max_l K_il``
(unit roundoff ``u``): bfloat16 ``<= 2^-8 k``; float16 ``<= 2^-11 k + 2^-40`` (below the normal
range, half the subnormal spacing ``2^-24`` of the scaled value; entries below ``2^-40`` are 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssa_dask.kernel import _sweeps
from ssa_dask.errors import SSAInputError

#: Storage formats of the kernel's entries.
KERNEL_DTYPES = ("float32", "float16", "bfloat16")
#: The formats stored as 16-bit patterns with a per-row scale.
HALF_DTYPES = ("float16", "bfloat16")
#: Bytes per kernel entry of each format.
ENTRY_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Unit roundoff ``u`` of each format (relative rounding error of a normal value, at most).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: Largest entry of every stored row (its scale moves the rest into the format's normal range).
ROW_MAX = {"float16": 2.0**15, "bfloat16": 1.0}
#: Largest absolute rounding error of a float16 entry below the normal range, relative to its row's maximum.
FLOAT16_SUBNORMAL_FLOOR = 2.0**-25 / ROW_MAX["float16"]


@dataclass(frozen=True)
class HalfRows:
    """A row block of the kernel in float16 or bfloat16 with a per-row scale.

    Attributes
    ----------
    bits : (n, S) uint16 array
        Bit patterns of ``K~_ij = ROW_MAX K_ij / max_l K_il``.
    log_scale : (n,) float64 array
        ``log(max_l K_il / ROW_MAX)`` of every row: ``K_ij = K~_ij exp(log_scale_i)``.
    dtype : {"float16", "bfloat16"}
        Format of ``bits``.
    """

    bits: np.ndarray
    log_scale: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_spots)``."""
        return self.bits.shape

    @property
    def bfloat16(self) -> bool:
        """Whether ``bits`` are bfloat16 (else float16)."""
        return self.dtype == "bfloat16"

    def scaled_rows(self) -> np.ndarray:
        """``K~`` decoded to float32 (the rows without their scales)."""
        return _sweeps.decode_half(self.bits, self.bfloat16)


def check_kernel_dtype(kernel_dtype: str, *, allow_auto: bool = True) -> str:
    """``kernel_dtype`` if it names a storage format (or ``"auto"``), else :class:`SSAInputError`."""
    choices = KERNEL_DTYPES + (("auto",) if allow_auto else ())
    if kernel_dtype not in choices:
        raise SSAInputError(f"kernel_dtype must be one of {', '.join(map(repr, choices))}; got {kernel_dtype!r}")
    return kernel_dtype


def choose_kernel_dtype(requested: str, n_entries: int, budget: float) -> str:
    """Resolve ``"auto"``: float16 when float32 entries would exceed ``budget`` bytes but float16 would not.

    Any other request is returned as it is (after :func:`check_kernel_dtype`).
    """
    if check_kernel_dtype(requested) != "auto":
        return requested
    fits = {dtype: n_entries * ENTRY_BYTES[dtype] <= budget for dtype in ("float32", "float16")}
    return "float16" if fits["float16"] and not fits["float32"] else "float32"


def encode_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """The float16 or bfloat16 bit patterns of float32 ``values``, rounded to nearest (ties to even).

    bfloat16 rounding is done on the float32 bits and is meant for finite values.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float16":
        return values.astype(np.float16).view(np.uint16)
    if dtype == "bfloat16":
        word = values.view(np.uint32)
        return ((word + np.uint32(0x7FFF) + ((word >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    raise SSAInputError(f"no 16-bit encoding for kernel_dtype {dtype!r}")


def half_rows_from_kernel(K: np.ndarray, dtype: str) -> HalfRows:
    """Scale each row of a float32 kernel block to a maximum of ``ROW_MAX`` and store it in ``dtype``.

    A row whose entries are all 0 keeps its zeros.
    """
    K = np.asarray(K, dtype=np.float32)
    row_max = K.max(axis=1) if K.shape[1] else np.ones(K.shape[0], np.float32)
    row_max = np.where(row_max > 0, row_max, np.float32(1.0)).astype(np.float64)
    scaled = (K * (ROW_MAX[dtype] / row_max)[:, None]).astype(np.float32)
    return HalfRows(encode_bits(scaled, dtype), np.log(row_max / ROW_MAX[dtype]), dtype)


def half_rows_from_cost(cost: np.ndarray, eps: float, dtype: str) -> HalfRows:
    """The kernel block ``exp(-D/eps)`` of a cost block, stored in ``dtype`` with its per-row scale.

    ``K~_ij = ROW_MAX exp(-(D_ij - min_l D_il)/eps)`` is computed directly (its maximum is exactly
    ``ROW_MAX``) and ``log_scale_i = -min_l D_il / eps - log ROW_MAX``, so no row underflows however
    large its costs.
    """
    cost = np.asarray(cost, dtype=np.float32)
    row_min = cost.min(axis=1)
    scaled = np.subtract(cost, row_min[:, None])
    np.multiply(scaled, np.float32(-1.0 / eps), out=scaled)
    np.exp(scaled, out=scaled)
    scaled *= np.float32(ROW_MAX[dtype])  # a power of two: exact
    return HalfRows(encode_bits(scaled, dtype), -row_min.astype(np.float64) / eps - np.log(ROW_MAX[dtype]), dtype)
