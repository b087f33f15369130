import copy
import pickle

import torch

from seglab.ops.kept import KeptFromWeights


def test_built_once_and_again_when_a_weight_or_setting_changes():
    weight, other = torch.randn(3, 3), torch.randn(2)
    builds = []
    kept: KeptFromWeights[torch.Tensor] = KeptFromWeights()

    def build() -> torch.Tensor:
        builds.append(1)
        return weight * 2

    first = kept.get([weight, other], build, "a")
    assert kept.get([weight, other], build, "a") is first and len(builds) == 1
    other.add_(1)  # an in-place change of any weight (an optimizer step) bumps its version
    assert kept.get([weight, other], build, "a") is not first and len(builds) == 2
    kept.get([weight, other], build, "b")  # another setting
    kept.get([weight.double(), other], build, "b")  # another tensor (storage, dtype)
    assert len(builds) == 4
    kept.clear()
    assert kept.value is None


def test_rebuilt_at_every_call_while_gradients_flow_through_a_weight():
    weight, other = torch.randn(3, 3), torch.randn(2, requires_grad=True)
    builds = []
    kept: KeptFromWeights[torch.Tensor] = KeptFromWeights()

    def build() -> torch.Tensor:
        builds.append(1)
        return weight * other.sum()

    trained = kept.get_unless_training([weight, other], build)
    assert trained.requires_grad and kept.value is None  # training: fresh and differentiable, not kept
    kept.get_unless_training([weight, other], build)
    assert len(builds) == 2
    with torch.no_grad():
        first = kept.get_unless_training([weight, other], build)
        assert kept.get_unless_training([weight, other], build) is first and len(builds) == 3


def test_copies_and_pickles_start_empty():
    kept: KeptFromWeights[torch.Tensor] = KeptFromWeights()
    weight = torch.ones(2)
    kept.get([weight], lambda: weight + 1)
    module = torch.nn.Module()
    module.kept = kept
    for twin in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert isinstance(twin.kept, KeptFromWeights) and twin.kept.value is None
        assert torch.equal(twin.kept.get([weight], lambda: weight + 1), torch.full((2,), 2.0))
    assert kept.value is not None  # the original keeps its own
