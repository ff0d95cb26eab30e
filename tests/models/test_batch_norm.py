"""BatchNorm with its closed-form gradient: flax's values and variables, torch's gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lucid_jax.models.batch_norm import BatchNorm

SHAPE = (2, 12, 10, 8)


def _variables(c=SHAPE[-1]):
    return {
        "params": {"scale": jnp.linspace(0.5, 2.0, c), "bias": jnp.linspace(-1.0, 1.0, c)},
        "batch_stats": {"mean": jnp.linspace(-0.2, 0.3, c), "var": jnp.linspace(0.5, 3.0, c)},
    }


def _x(shape=SHAPE, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 3.0 + 1.0


@pytest.mark.parametrize("use_running_average", [False, True])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_values_running_averages_and_variables_are_flaxs_bits(use_running_average, dtype):
    kw = dict(use_running_average=use_running_average, momentum=0.9, epsilon=1e-5, dtype=dtype)
    ours, flax_bn = BatchNorm(**kw), nn.BatchNorm(**kw)
    x = _x()
    init_ours, init_flax = ours.init(jax.random.key(0), x), flax_bn.init(jax.random.key(0), x)
    assert jax.tree.structure(init_ours) == jax.tree.structure(init_flax)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), init_ours, init_flax))

    y, stats = ours.apply(_variables(), x, mutable=["batch_stats"])
    y_ref, stats_ref = flax_bn.apply(_variables(), x, mutable=["batch_stats"])
    assert y.dtype == y_ref.dtype == (dtype or jnp.float32)
    assert bool(jnp.array_equal(y, y_ref))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), stats, stats_ref))
    if use_running_average:  # the stored statistics are left as they were
        assert bool(jnp.array_equal(stats["batch_stats"]["mean"], _variables()["batch_stats"]["mean"]))
    else:
        assert not bool(jnp.array_equal(stats["batch_stats"]["mean"], _variables()["batch_stats"]["mean"]))


def _grads(module, x, weights, axis_name=None):
    def loss(params, x):
        y, _ = module.apply({**_variables(), "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * weights)

    return jax.grad(loss, argnums=(0, 1))(_variables()["params"], x)


def test_training_gradients_equal_torchs_batchnorm2d_in_float64():
    torch = pytest.importorskip("torch")
    x, weights = _x(), _x(seed=1)
    (g_params, g_x) = _grads(BatchNorm(momentum=0.9), x, weights)

    bn = torch.nn.BatchNorm2d(SHAPE[-1], eps=1e-5).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(np.asarray(_variables()["params"]["scale"], np.float64)))
        bn.bias.copy_(torch.from_numpy(np.asarray(_variables()["params"]["bias"], np.float64)))
    xt = torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2).requires_grad_()
    wt = torch.from_numpy(np.asarray(weights, np.float64)).permute(0, 3, 1, 2)
    (bn(xt) * wt).sum().backward()

    np.testing.assert_allclose(g_x, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(g_params["scale"], bn.weight.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g_params["bias"], bn.bias.grad.numpy(), rtol=1e-5, atol=1e-4)
    # and flax's autodiff of the same forward agrees too
    ref_params, ref_x = _grads(nn.BatchNorm(use_running_average=False, momentum=0.9), x, weights)
    np.testing.assert_allclose(g_x, ref_x, rtol=0, atol=1e-5)
    np.testing.assert_allclose(g_params["scale"], ref_params["scale"], rtol=1e-5, atol=1e-4)


def test_statistics_over_a_named_axis_equal_one_batch_of_both_halves():
    """vmap over two 'devices' with axis_name: values and the input's gradient are those of
    BN over the whole batch; the parameters' gradients, summed over the axis, are too."""
    x, weights = _x(), _x(seed=1)
    whole_params, whole_x = _grads(BatchNorm(momentum=0.9), x, weights)
    module = BatchNorm(momentum=0.9, axis_name="devices")
    halves = x.reshape(2, 1, *SHAPE[1:])
    w_halves = weights.reshape(2, 1, *SHAPE[1:])

    def per_device(xd, wd):
        def loss(params, xd):
            y, _ = module.apply({**_variables(), "params": params}, xd, mutable=["batch_stats"])
            return jnp.sum(y * wd)

        return jax.grad(loss, argnums=(0, 1))(_variables()["params"], xd)

    g_params, g_x = jax.vmap(per_device, axis_name="devices")(halves, w_halves)
    np.testing.assert_allclose(g_x.reshape(SHAPE), whole_x, rtol=0, atol=1e-5)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(g_params[name].sum(0), whole_params[name], rtol=1e-5, atol=1e-4)
    y = jax.vmap(lambda xd: module.apply(_variables(), xd, mutable=["batch_stats"])[0], axis_name="devices")(halves)
    y_whole = BatchNorm(momentum=0.9).apply(_variables(), x, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(y.reshape(SHAPE), y_whole, rtol=0, atol=1e-5)


class _ConvNormChain(nn.Module):
    """Four conv -> BN -> ReLU layers, as in the backbone."""

    norm: type

    @nn.compact
    def __call__(self, x):
        for _ in range(4):
            x = nn.Conv(64, (3, 3), use_bias=False)(x)
            x = nn.relu(self.norm(use_running_average=False, momentum=0.9)(x))
        return x


def test_the_training_gradient_needs_less_memory_than_autodiff_of_flaxs():
    """The closed form keeps x and two [C] vectors; flax's autodiff keeps more (52 against 56 MiB)."""
    x = _x((4, 64, 64, 64))

    def temp_bytes(norm):
        model = _ConvNormChain(norm)
        variables = model.init(jax.random.key(0), x)

        def loss(params, x):
            y, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y)

        compiled = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours, flax_bytes = temp_bytes(BatchNorm), temp_bytes(nn.BatchNorm)
    print(f"temporaries: ours {ours / 2**20:.1f} MiB, flax's autodiff {flax_bytes / 2**20:.1f} MiB")
    assert ours <= flax_bytes - 2**20


def test_a_mask_leaves_rows_out_of_the_statistics_and_their_share_of_the_gradient():
    """With a mask over the rows (the box head's padded RoIs, which feed no loss), values,
    running averages and gradients are torch's BatchNorm2d on the unmasked rows alone
    (float64); the masked rows are normalised with those statistics and get no gradient.
    Where masked rows do feed the loss, the closed form equals autodiff through the
    masked statistics."""
    torch = pytest.importorskip("torch")
    x, weights = _x((6, 4, 4, 8)), _x((6, 4, 4, 8), seed=1)
    mask = np.array([True, False, True, True, False, True])
    module = BatchNorm(momentum=0.9)

    def ours(weights):
        def loss(params, x):
            y, stats = module.apply(
                {**_variables(), "params": params}, x, mask[:, None, None, None], mutable=["batch_stats"]
            )
            return jnp.sum(y * weights), (y, stats["batch_stats"])

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(_variables()["params"], x)

    padded_weights = jnp.where(mask[:, None, None, None], weights, 0.0)
    (g_params, g_x), (y, stats) = ours(padded_weights)

    bn = torch.nn.BatchNorm2d(8, eps=1e-5, momentum=0.1).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(np.asarray(_variables()["params"]["scale"], np.float64)))
        bn.bias.copy_(torch.from_numpy(np.asarray(_variables()["params"]["bias"], np.float64)))
        bn.running_mean.copy_(torch.from_numpy(np.asarray(_variables()["batch_stats"]["mean"], np.float64)))
    xt = torch.from_numpy(np.asarray(x, np.float64)[mask]).permute(0, 3, 1, 2).requires_grad_()
    wt = torch.from_numpy(np.asarray(weights, np.float64)[mask]).permute(0, 3, 1, 2)
    yt = bn(xt)
    (yt * wt).sum().backward()

    np.testing.assert_allclose(y[mask], yt.detach().permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    mean = np.asarray(x, np.float64)[mask].mean((0, 1, 2))
    var = np.asarray(x, np.float64)[mask].var((0, 1, 2))
    scale, bias = (np.asarray(_variables()["params"][k], np.float64) for k in ("scale", "bias"))
    np.testing.assert_allclose(y[~mask], (np.asarray(x)[~mask] - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=2e-5)
    np.testing.assert_allclose(g_x[mask], xt.grad.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-5)
    np.testing.assert_array_equal(g_x[~mask], 0.0)
    np.testing.assert_allclose(g_params["scale"], bn.weight.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g_params["bias"], bn.bias.grad.numpy(), rtol=1e-5, atol=1e-4)

    def autodiff(params, x):
        w = jnp.asarray(mask, jnp.float32)[:, None, None, None]
        n = w.sum() * 16
        m = jnp.sum(w * x, (0, 1, 2)) / n
        v = jnp.sum(w * (x - m) ** 2, (0, 1, 2)) / n
        return jnp.sum(((x - m) * jax.lax.rsqrt(v + 1e-5) * params["scale"] + params["bias"]) * weights)

    (g_params, g_x), _ = ours(weights)
    ref_params, ref_x = jax.grad(autodiff, argnums=(0, 1))(_variables()["params"], x)
    np.testing.assert_allclose(g_x, ref_x, rtol=0, atol=2e-5)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(g_params[name], ref_params[name], rtol=1e-5, atol=1e-4)


def test_a_mask_over_a_named_axis_equals_the_mask_over_the_whole_batch():
    x, weights = _x(), _x(seed=1)
    mask = np.array([True, False])[:, None, None, None] | np.zeros((2, 12, 1, 1), bool)
    mask[1, :5] = True  # half the rows of the second image count

    def whole(params, x):
        y, _ = BatchNorm(momentum=0.9).apply({**_variables(), "params": params}, x, mask, mutable=["batch_stats"])
        return jnp.sum(y * weights)

    whole_params, whole_x = jax.grad(whole, argnums=(0, 1))(_variables()["params"], x)
    module = BatchNorm(momentum=0.9, axis_name="devices")

    def per_device(xd, wd, md):
        def loss(params, xd):
            y, _ = module.apply({**_variables(), "params": params}, xd, md, mutable=["batch_stats"])
            return jnp.sum(y * wd)

        return jax.grad(loss, argnums=(0, 1))(_variables()["params"], xd)

    halves = lambda a: a.reshape(2, 1, *a.shape[1:])  # noqa: E731
    g_params, g_x = jax.vmap(per_device, axis_name="devices")(halves(x), halves(weights), halves(mask))
    np.testing.assert_allclose(g_x.reshape(SHAPE), whole_x, rtol=0, atol=1e-5)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(g_params[name].sum(0), whole_params[name], rtol=1e-5, atol=1e-4)
