"""The counter-based hash behind dropout masks: uniform numbers in [0, 1) computed on the device
with ``xp`` integer operations, the same on every backend (see ``Device.random``).

Draw k of a run has the key mix32(k0 ^ mix32(k·φ + k1)) (k0, k1 from the seed, φ = 0x9E3779B9);
element i of the draw is (mix32(mix32(i·φ ^ key) ^ k1) >> 8) / 2²⁴. The compiled dropout kernel
(xpnet/_native/fused_typed.h) computes the same numbers in uint32 arithmetic.
"""

from __future__ import annotations

import math
import operator

_U32 = 0xFFFFFFFF
#: 2³² / the golden ratio: the step between the counters hashed.
PHI = 0x9E3779B9


def _mul32(x, c: int):
    """x · c mod 2³² for an int64 array x of values below 2³² and a constant c below 2³², without
    overflow: c is split into 16-bit halves, so no product reaches 2⁴⁹ (every backend has int64;
    not all have uint32 arithmetic, and Python ints above 2³¹ do not mix with int32 or uint32)."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _U32


def _mix32(x):
    """A 32-bit integer hash (Wellons' 'lowbias32'); works on Python ints and int64 arrays of
    values below 2³²."""
    mul = (lambda v, c: (v * c) & _U32) if isinstance(x, int) else _mul32
    x = x ^ (x >> 16)
    x = mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def draw_key(seed_key, counter: int) -> int:
    """The key of draw ``counter`` for the seed's two words (k0, k1)."""
    k0, k1 = seed_key
    return _mix32(k0 ^ _mix32((counter * PHI + k1) & _U32))


def first_element(draw: tuple, shape) -> int | None:
    """The number in the draw of the first element of an array of ``shape`` whose first row is
    row ``draw[2]`` (0 when the draw has two entries) of the whole batch: a rank of a
    data-parallel job takes rows of each global batch, and draws the numbers those rows have
    there. None for a row number that is not a non-negative integer below 2³¹."""
    row = draw[2] if len(draw) > 2 else 0
    try:
        row = None if isinstance(row, bool) else operator.index(row)
    except TypeError:
        row = None
    if row is None or not 0 <= row < 2**31:
        return None
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return (row * per_row) & _U32


def uniform(xp, device, key: int, k1: int, shape, dtype, first: int = 0):
    """The draw's numbers in [0, 1) of ``shape``, in ``dtype``: multiples of 2⁻²⁴, exact in float32.
    ``first``: the number in the draw of the first element (elements are numbered mod 2³²)."""
    n = math.prod(shape)
    index = xp.arange(n, dtype=xp.int64, device=device)
    if first:
        index = (index + first) & _U32
    bits = _mul32(index, PHI)
    bits = _mix32(_mix32(bits ^ key) ^ k1)
    u = xp.astype(bits >> 8, dtype)
    return xp.reshape(u * (1.0 / 16777216.0), tuple(shape))
