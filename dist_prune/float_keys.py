"""Integer keys that order like float32 values, the one place the bit tricks of selection live.

A float32's bits, read as a sign-magnitude integer, order positives correctly and negatives
backwards. Reversing the magnitude bits of the negatives gives a signed int32 key in float order
(`order_keys`, for per-row kthvalue); flipping the sign bit of that gives the same order unsigned
(`unsigned_keys`, for a radix select that histograms the top bits first). Both put -0.0 just below
+0.0. NaN is rejected before any key is made.
"""

from __future__ import annotations

import sys

import torch

SIGN = 1 << 31  # the unsigned key of +0.0
HIGH_HALF = 1 if sys.byteorder == "little" else 0  # the 16-bit half of a float32 with its sign


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the order of the float32 values."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negatives: reverse the magnitude bits


def unsigned_keys(x: torch.Tensor) -> torch.Tensor:
    """Unsigned order-preserving 32-bit keys of float32 values, as int64 (order_keys + 2**31)."""
    return order_keys(x).to(torch.int64) + SIGN


def below_key(x: torch.Tensor, key: int, out: torch.Tensor) -> torch.Tensor:
    """out = unsigned_keys(x) < key, as one float comparison with the float whose key is `key`."""
    if key == SIGN:  # +0.0: -0.0 compares equal to it but has the lower key
        return torch.signbit(x, out=out)
    # Only the bracket of -inf yields a NaN bound; below it are only NaNs (rejected): all False is right.
    bits = key - SIGN if key >= SIGN else ~key & 0xFFFFFFFF
    bound = torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()
    return torch.lt(x, bound, out=out)
