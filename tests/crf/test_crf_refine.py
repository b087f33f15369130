"""The engine/CLI entry points: refine() and --crf-params parsing."""
import pytest
import torch

from seglab.crf import DEFAULT_CRF_PARAMS, DenseCRF, make_crf, parse_crf_params, refine


def test_parse_crf_params():
    assert parse_crf_params("") == {}
    assert parse_crf_params(None) == {}
    parsed = parse_crf_params("theta_alpha=60, theta_beta=5,w1=4,iterations=10,")
    assert parsed == {"theta_alpha": 60.0, "theta_beta": 5.0, "w1": 4.0, "iterations": 10}
    assert isinstance(parsed["iterations"], int)
    with pytest.raises(ValueError, match="unknown CRF parameter 'sxy'"):
        parse_crf_params("sxy=3")
    with pytest.raises(ValueError, match="name=value"):
        parse_crf_params("theta_alpha")
    with pytest.raises(ValueError, match="must be a number"):
        parse_crf_params("w1=big")


def test_refine_uses_defaults_and_overrides():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 20, 24)
    probabilities = torch.softmax(torch.randn(1, 4, 20, 24), dim=1)
    torch.testing.assert_close(refine(image, probabilities), DenseCRF(**DEFAULT_CRF_PARAMS)(image, probabilities))
    one_step = refine(image, probabilities, {"iterations": 1, "w1": 2.0})
    expected = DenseCRF(**{**DEFAULT_CRF_PARAMS, "iterations": 1, "w1": 2.0})(image, probabilities)
    torch.testing.assert_close(one_step, expected)
    with pytest.raises(ValueError, match="unknown CRF parameter"):
        refine(image, probabilities, {"bogus": 1})
    with pytest.raises(ValueError, match="theta_beta must be positive"):
        make_crf({"theta_beta": 0.0})
