"""GroupNorm: values and gradients against torch's nn.GroupNorm in float64, the group
count, and ``norm_mode="group"``: GroupNorm in the backbone, the FPN and a conv box
head, with Lucid-style names that round-trip exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax import state_dict
from lucid_jax.models.group_norm import GroupNorm, num_groups
from tests.models.conftest import TV_REASON, random_images, tiny_detector


def test_group_count():
    assert [num_groups(c) for c in (1, 2, 8, 16, 24, 48, 64, 256, 2048)] == [1, 1, 4, 8, 12, 24, 32, 32, 32]


@pytest.mark.parametrize("channels", [16, 64])
def test_values_and_gradients_equal_torchs_group_norm_in_float64(channels):
    torch = pytest.importorskip("torch", reason=TV_REASON)
    rng = np.random.default_rng(channels)
    x = (rng.standard_normal((2, 5, 6, channels)) * 3 + 1).astype(np.float32)
    weights = rng.standard_normal(x.shape).astype(np.float32)
    params = {
        "scale": np.linspace(0.5, 2.0, channels).astype(np.float32),
        "bias": np.linspace(-1.0, 1.0, channels).astype(np.float32),
    }

    def loss(params, x):
        y = GroupNorm().apply({"params": params}, x)
        return jnp.sum(y * weights), y

    (g_params, g_x), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    gn = torch.nn.GroupNorm(num_groups(channels), channels, eps=1e-5).double()
    with torch.no_grad():
        gn.weight.copy_(torch.from_numpy(params["scale"].astype(np.float64)))
        gn.bias.copy_(torch.from_numpy(params["bias"].astype(np.float64)))
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2).requires_grad_()
    yt = gn(xt)
    (yt * torch.from_numpy(weights.astype(np.float64)).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(g_x, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(g_params["scale"], gn.weight.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g_params["bias"], gn.bias.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_group_mode_puts_group_norm_everywhere_with_lucid_names_that_round_trip(tmp_path):
    from lucid_jax.state_dict_files import load_state_dict_file, save_state_dict_file

    model = tiny_detector(norm_mode="group", box_head_convs=(16,), box_head_fcs=1)
    assert (model.backbone.norm_mode, model.roi_heads.norm_mode) == ("group", "group")
    shapes = jax.eval_shape(model.init, jax.random.key(0), random_images(0))
    assert "batch_stats" not in shapes  # nothing to keep: each image's own statistics
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    flat = state_dict.to_state_dict(variables, model=model)
    assert not any(k.endswith(("running_mean", "running_var")) for k in flat)
    for name in ("backbone.net.layer1.0.conv2.bn", "backbone.fpn.output_norms.3", "box_norms.0"):
        assert flat[f"{name}.weight"].shape == flat[f"{name}.bias"].shape
    save_state_dict_file(flat, tmp_path / "gn.safetensors")
    back = state_dict.from_state_dict(shapes, load_state_dict_file(tmp_path / "gn.safetensors"), model=model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
