"""Our ResNet-101 classifier against ``torchvision.models.resnet101`` on identical
(random) weights, loaded through ``state_dict.from_torchvision_resnet``."""

import jax
import numpy as np
import pytest

from lucid_jax import state_dict
from lucid_jax.models import resnet_101
from tests.models.conftest import TV_REASON, randomise_bn

torch = pytest.importorskip("torch", reason=TV_REASON)
torchvision = pytest.importorskip("torchvision", reason=TV_REASON)


def test_resnet101_logits_match_torchvision():
    torch.manual_seed(0)
    tv = torchvision.models.resnet101(weights=None).eval()
    randomise_bn(tv, torch.Generator().manual_seed(1))
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    with torch.no_grad():
        expected = tv(torch.from_numpy(x)).numpy()
    model = resnet_101()
    template = jax.eval_shape(model.init, jax.random.key(0), x)
    template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
    variables = state_dict.from_state_dict(template, state_dict.from_torchvision_resnet(tv.state_dict()))
    got = np.asarray(jax.jit(model.apply)(variables, x))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
