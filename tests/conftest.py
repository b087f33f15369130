"""Test-wide settings: headless plotting, a small, fixed thread count for steady timings, and
random states of each test's own."""
import os
import random
import zlib

os.environ.setdefault("MPLBACKEND", "Agg")


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def seeded_by_test_name(request):
    """Python's, NumPy's and PyTorch's generators seeded from the test's own id before it runs,
    so that a test's random data does not depend on which tests ran before it: a test added to
    one file once moved an unseeded test elsewhere onto a draw its tolerance did not hold.
    `SEGLAB_TEST_SEED=n pytest` draws other data everywhere, to look for such tolerances."""
    seed = zlib.crc32(f"{os.environ.get('SEGLAB_TEST_SEED', '0')}:{request.node.nodeid}".encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(params=["pytorch", "native"])
def winograd_transforms(request, monkeypatch):
    """Runs a test with Winograd's transforms by PyTorch's operators, then by the native
    kernels (`seglab.ops.native`; skipped where they cannot be built). Returns which."""
    from seglab.ops import native

    if request.param == "native":
        if not native.available():
            pytest.skip(f"the native kernels are not available: {native.unavailable_reason()}")
    else:
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param


@pytest.fixture
def fused_calls(monkeypatch):
    """The (C_in, C_out) of each convolution the one-pass F(4x4) kernel computes
    (`seglab.ops.native.winograd_fused`), recorded while it still computes them; skips where
    the native kernels cannot be built."""
    from seglab.ops import native

    if not native.available():
        pytest.skip(f"the native kernels are not available: {native.unavailable_reason()}")
    calls = []
    one_pass = native.winograd_fused

    def recorded(nhwc, filters, *args, **kwargs):
        calls.append((nhwc.shape[-1], filters.shape[-1]))
        return one_pass(nhwc, filters, *args, **kwargs)

    monkeypatch.setattr(native, "winograd_fused", recorded)
    return calls
