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
