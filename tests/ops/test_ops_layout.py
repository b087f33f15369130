"""Layout helpers: a bias's gradient summed by folding a channels-last map's pixels into rows."""
import pytest
import torch

from seglab.ops.layout import SUMMED_ROW_FLOATS, channel_sums, in_layout_of


@pytest.mark.parametrize("channels", [3, 21, 64, 150])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_channel_sums_equal_the_sum_over_batch_and_map(channels, layout):
    torch.manual_seed(0)
    # 2 x 23 x 19 pixels: not a whole number of folded rows, so the remainder counts too.
    x = torch.randn(2, channels, 23, 19).contiguous(memory_format=layout)
    assert (2 * 23 * 19) % -(-SUMMED_ROW_FLOATS // channels) != 0 or channels % 32 == 0
    expected = x.double().sum((0, 2, 3))
    got = channel_sums(x)
    assert got.dtype == torch.float32 and got.shape == (channels,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-4)


def test_channel_sums_of_an_empty_batch_are_zeros():
    x = torch.empty(0, 21, 4, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(channel_sums(x), torch.zeros(21))


def test_in_layout_of_follows_the_reference():
    weight = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    assert in_layout_of(torch.randn(4, 3, 3, 3), weight).is_contiguous(memory_format=torch.channels_last)
    assert in_layout_of(weight, torch.randn(4, 3, 3, 3)).is_contiguous()
