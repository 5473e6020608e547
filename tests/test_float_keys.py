"""The integer keys of dist_prune/float_keys.py order exactly like the floats (-0.0 just below +0.0)."""

import torch

from dist_prune.float_keys import SIGN, below_key, order_keys, unsigned_keys

SPECIAL = [float("-inf"), -3.5e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, 3.5e38, float("inf")]


def _values() -> torch.Tensor:
    random = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.randint(-40, 38, (4000,))
    return torch.cat([torch.tensor(SPECIAL), random.float(), torch.tensor(SPECIAL)])


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Position of each value in float order, -0.0 before +0.0, equal values by index."""
    tiebreak = torch.signbit(x).to(torch.float64) * -0.5  # only separates -0.0 from +0.0
    order = sorted(range(len(x)), key=lambda i: (float(x[i]), float(tiebreak[i]), i))
    return torch.tensor(order)


def test_signed_and_unsigned_keys_sort_like_the_floats():
    x = _values()
    expected = _rank(x)
    assert torch.equal(torch.sort(order_keys(x).to(torch.int64), stable=True).indices, expected)
    assert torch.equal(torch.sort(unsigned_keys(x), stable=True).indices, expected)
    assert torch.equal(unsigned_keys(x), (order_keys(x).to(torch.int64) + SIGN))
    assert int(unsigned_keys(torch.tensor([0.0]))) == SIGN
    assert int(unsigned_keys(torch.tensor([-0.0]))) == SIGN - 1


def test_below_key_is_the_key_comparison_for_every_bracket_start():
    x = _values()
    keys = unsigned_keys(x)
    for key in [0, 1, SIGN - 1, SIGN, SIGN + 1, (0x3F80 << 16), (0xBF80 << 16) ^ 0xFFFFFFFF] + keys[::97].tolist():
        out = torch.empty_like(x, dtype=torch.bool)
        assert torch.equal(below_key(x, key, out), keys < key), key
