"""The compiled kernel-domain sweep against NumPy float64, for every row-count remainder.

``kernel_sweep`` takes rows eight at a time, then one at a time, and flushes its float32 partial
sums every ``_FLUSH_ROWS`` rows; the block sizes below hit every remainder modulo 8 on either side
of a flush, for float32 blocks and for float16 / bfloat16 bit patterns (widened by the CPU).
"""

from __future__ import annotations

import numpy as np
import pytest

from ssa_dask.kernel._sweeps import _FLUSH_ROWS, decode_half, kernel_sweep

ROW_COUNTS = [1, 3, 7, 8, 9, 15, 16, 17, _FLUSH_ROWS - 1, _FLUSH_ROWS, _FLUSH_ROWS + 5, 2 * _FLUSH_ROWS + 7]


def reference_marginal(K: np.ndarray, p: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``b * (K^T (p / (K b)))`` in float64."""
    K = K.astype(np.float64)
    b = b.astype(np.float64)
    return b * (K.T @ (p / (K @ b)))


def random_block(rng: np.random.Generator, n: int, s: int) -> np.ndarray:
    """``exp(-D / eps)`` of a random cost at lam = 0.05 (entries in [exp(-20), 1])."""
    return np.exp(-20.0 * rng.random((n, s))).astype(np.float32)


@pytest.mark.parametrize("n", ROW_COUNTS)
@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
def test_sweep_equals_float64_reference(n: int, fmt: str) -> None:
    rng = np.random.default_rng(n)
    s = 37  # not a multiple of any vector width
    K = random_block(rng, n, s)
    p = rng.uniform(0.5, 1.5, n) / n
    b = np.exp(-rng.random(s)).astype(np.float32)
    if fmt == "float32":
        stored, bfloat16, values = K, False, K
    else:
        bfloat16 = fmt == "bfloat16"
        scaled = K * np.float32(2.0**15 if not bfloat16 else 1.0)
        stored = (scaled.astype(np.float16).view(np.uint16) if not bfloat16
                  else (scaled.view(np.uint32) >> 16).astype(np.uint16))
        values = decode_half(stored, bfloat16)  # what the sweep must see, exactly
    out = np.zeros(s)
    kernel_sweep(stored, p, b, out, bfloat16)
    expected = reference_marginal(values, p, b)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=0)
    # the rows of the plan sum to p, so the marginal sums to sum(p)
    assert out.sum() == pytest.approx(p.sum(), rel=2e-6)


def test_sweep_accumulates_into_out() -> None:
    rng = np.random.default_rng(0)
    K = random_block(rng, 19, 11)
    p = np.full(19, 1 / 19)
    b = np.ones(11, np.float32)
    out = np.full(11, 5.0)
    kernel_sweep(K, p, b, out)
    np.testing.assert_allclose(out - 5.0, reference_marginal(K, p, b), rtol=2e-6)


def test_reference_is_sensitive_to_one_row() -> None:
    """Negative control: dropping one row of a 17-row block changes the marginal beyond the tolerance."""
    rng = np.random.default_rng(1)
    K = random_block(rng, 17, 37)
    p = rng.uniform(0.5, 1.5, 17) / 17
    b = np.exp(-rng.random(37)).astype(np.float32)
    out = np.zeros(37)
    kernel_sweep(K[:16], p[:16], b, out)
    assert not np.allclose(out, reference_marginal(K, p, b), rtol=2e-6, atol=0)


GENERIC_TARGET_SCRIPT = """
import numpy as np
from ssa_dask.kernel import _sweeps
assert not _sweeps.HARDWARE_HALF, "a generic target must not use the hardware float16 conversion"
rng = np.random.default_rng(0)
K = np.exp(-20.0 * rng.random((29, 37))).astype(np.float32) * np.float32(2.0**15)
bits = K.astype(np.float16).view(np.uint16)
p = np.full(29, 1 / 29)
b = np.exp(-rng.random(37)).astype(np.float32)
out, expected = np.zeros(37), np.zeros(37)
_sweeps.kernel_sweep(bits, p, b, out, False)
_sweeps.kernel_sweep(_sweeps.decode_half(bits, False), p, b, expected, False)
np.testing.assert_allclose(out, expected, rtol=1e-6)
print("ok")
"""


def test_float16_sweep_compiles_for_a_cpu_without_f16c(tmp_path) -> None:
    """NUMBA_CPU_NAME=generic (x86-64 without F16C, as for portable caches): the sweep still compiles
    (LLVM's half conversion would need a library call Numba cannot link, and abort the process) and
    gives the same marginal through the integer decoding."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the generic-target fallback concerns x86-64 (AArch64 always converts float16 in hardware)")
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", GENERIC_TARGET_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
