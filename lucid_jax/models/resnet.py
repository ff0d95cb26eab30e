"""ResNet classifiers (He et al., "Deep Residual Learning", CVPR 2016).

The bottleneck puts its stride on the 3x3 conv (the "v1.5" variant used by Lucid
and torchvision). Every layer is named as in Lucid's state dict, so that
``stem.0``, ``layer3.22.conv2.conv``, ``layer1.0.conv3.1``, ``layer2.0.downsample.0``
and ``fc`` are pytree paths here too.

Images come in Lucid's layout, ``[B, 3, H, W]``; inside, activations are NHWC, the
layout XLA's convolutions prefer on every backend.
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lucid_jax.models.conv import Conv
from lucid_jax.models.inputs import check_images
from lucid_jax.models.norms import check_norm_mode, norm_layer

STEM_STRIDE = 4  # the 7x7/2 conv, then the 3x3/2 max-pool
STAGE_STRIDES = (1, 2, 2, 2)  # layer1..layer4; each stage's first bottleneck strides

# torchvision's and Lucid's ResNet init: He-normal on fan_out for convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@jax.custom_jvp
def residual_relu(x: jax.Array) -> jax.Array:
    """``jax.nn.relu`` (same values, -0.0 -> 0.0 and NaN kept, same derivative, 0 at 0),
    written as a select so that XLA materialises the residual stream.

    ``max(x, 0)`` reads no more bytes than it writes, so XLA's fusion pass may
    duplicate it, and with it the whole chain of BatchNorm + residual adds behind it,
    into every consumer: on CPU each block's output was recomputed from the first
    block of its stage, over and over (quadratic in depth: about half of the
    ResNet-101 detector's training step at 512x512). A select also reads the
    predicate, so XLA stores each block's output once and the consumers read it.
    The zero is a scalar (the same compiled program as ``zeros_like``): jax2onnx
    would store a full-size zero tensor per block in an ONNX graph.

    The derivative reads the sign of the output, which is the input's: the next
    block keeps the output for its own gradient anyway, so XLA keeps no mask of
    the input sum per block (43 MiB less scratch in the recipe's training step at
    512x512, batch 2, and 48 MiB less peak RSS).
    """
    return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


residual_relu.defjvps(lambda g, ans, x: jnp.where(ans > 0, g, jnp.zeros_like(g)))


class ConvNorm(nn.Module):
    """A bias-free conv, BatchNorm and optional ReLU; ``child_names`` are Lucid's.

    Lucid names this pair ``conv``/``bn`` in ``conv1``/``conv2`` and ``0``/``1`` in
    ``stem``, ``conv3`` and ``downsample``.
    """

    features: int
    kernel_size: int
    stride: int = 1
    relu: bool = True
    child_names: tuple[str, str] = ("conv", "bn")
    zero_init_scale: bool = False
    norm_mode: str = "batch"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H / stride, W / stride, features]."""
        pad = self.kernel_size // 2
        x = Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_conv_init,
            name=self.child_names[0],
        )(x)
        x = norm_layer(
            self.norm_mode,
            train=train,
            name=self.child_names[1],
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            scale_init=nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones,
        )(x)
        return nn.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 with a projection shortcut where shapes change."""

    width: int
    stride: int = 1
    project: bool = False
    norm_mode: str = "batch"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H / stride, W / stride, 4 * width]."""
        conv = partial(ConvNorm, norm_mode=self.norm_mode, bn_axis_name=self.bn_axis_name, dtype=self.dtype)
        out_ch = self.width * self.expansion
        y = conv(self.width, 1, name="conv1")(x, train)
        y = conv(self.width, 3, self.stride, name="conv2")(y, train)
        # The residual branch starts as zero (Goyal et al., 2017, section 5.1), so
        # an untrained network is a chain of identities and its activations stay
        # bounded even with the inference-mode BN of a fresh model.
        y = conv(out_ch, 1, relu=False, child_names=("0", "1"), zero_init_scale=True, name="conv3")(y, train)
        if self.project:
            x = conv(out_ch, 1, self.stride, relu=False, child_names=("0", "1"), name="downsample")(x, train)
        return residual_relu(x + y)


class ResNetStage(nn.Module):
    """``num_blocks`` bottlenecks named ``0``, ``1``, ...; the first one strides."""

    num_blocks: int
    width: int
    stride: int
    norm_mode: str = "batch"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_blocks):
            x = Bottleneck(
                self.width,
                stride=self.stride if i == 0 else 1,
                project=i == 0,
                norm_mode=self.norm_mode,
                bn_axis_name=self.bn_axis_name,
                dtype=self.dtype,
                name=str(i),
            )(x, train)
        return x


class ResNet(nn.Module):
    """ResNet classifier with Lucid's layer names.

    Attributes:
      stage_sizes: bottlenecks per stage, (3, 4, 23, 3) for ResNet-101.
      num_classes: outputs of the classifier ``fc``.
      widths: bottleneck widths per stage; stage outputs are 4x these.
      stem_width: channels of the 7x7 stem conv.
      norm_mode: "batch" (trained BatchNorm) or "frozen" (fixed statistics).
      bn_axis_name: a pmap/shard_map axis over which BN averages batch statistics.
      dtype: computation dtype (parameters stay float32).
    """

    stage_sizes: Sequence[int] = (3, 4, 23, 3)
    num_classes: int = 1000
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    norm_mode: str = "batch"
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    def setup(self):
        check_norm_mode(self.norm_mode)
        if len(self.stage_sizes) != 4 or len(self.widths) != 4:
            raise ValueError(
                f"stage_sizes and widths must have 4 entries (layer1..layer4), "
                f"got {tuple(self.stage_sizes)} and {tuple(self.widths)}"
            )
        common = dict(norm_mode=self.norm_mode, bn_axis_name=self.bn_axis_name, dtype=self.dtype)
        self.stem = ConvNorm(self.stem_width, 7, 2, child_names=("0", "1"), **common)
        self.layer1 = ResNetStage(self.stage_sizes[0], self.widths[0], STAGE_STRIDES[0], **common)
        self.layer2 = ResNetStage(self.stage_sizes[1], self.widths[1], STAGE_STRIDES[1], **common)
        self.layer3 = ResNetStage(self.stage_sizes[2], self.widths[2], STAGE_STRIDES[2], **common)
        self.layer4 = ResNetStage(self.stage_sizes[3], self.widths[3], STAGE_STRIDES[3], **common)
        self.fc = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of C2..C5."""
        return tuple(w * Bottleneck.expansion for w in self.widths)

    @property
    def feature_strides(self) -> tuple[int, ...]:
        """Strides of C2..C5 in input pixels: (4, 8, 16, 32).

        C_k is [B, H/s_k, W/s_k, out_channels[k]] when s_k divides H and W.
        """
        strides = [STEM_STRIDE * STAGE_STRIDES[0]]
        for s in STAGE_STRIDES[1:]:
            strides.append(strides[-1] * s)
        return tuple(strides)

    def features(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """The feature hierarchy C2..C5 (strides 4, 8, 16, 32).

        Args:
          x: [B, H, W, 3] NHWC images.
          train: use batch statistics and update them.

        Returns:
          [c2 [B, H/4, W/4, 4*w1], c3 [.., H/8 ..], c4 [.., H/16 ..], c5 [.., H/32 ..]].
        """
        x = self.stem(x, train)
        # The 1-pixel pad spelled out, and keyword arguments: jax2onnx replaces
        # nn.max_pool by a version that knows only "SAME"/"VALID" and keywords.
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")  # stride 4 so far
        c2 = self.layer1(x, train)
        c3 = self.layer2(c2, train)
        c4 = self.layer3(c3, train)
        c5 = self.layer4(c4, train)
        if self.is_initializing():
            # The detector never calls the classifier, but it is part of the
            # backbone (Lucid keeps and trains it), so create its parameters.
            self.fc(jnp.zeros((1, c5.shape[-1]), self.dtype))
        return [c2, c3, c4, c5]

    def __call__(self, images: jax.Array, train: bool = False, *, channels_last: bool = False) -> jax.Array:
        """Classify images.

        Args:
          images: [B, 3, H, W] float images (Lucid's layout).
          train: use batch statistics and update them.
          channels_last: the images are [B, H, W, 3] (the Loader's layout).

        Returns:
          logits [B, num_classes] (float32).
        """
        x = check_images(images, multiple=1, channels_last=channels_last)
        c5 = self.features(x.astype(self.dtype), train)[-1]
        pooled = jnp.mean(c5, axis=(1, 2))  # [B, 4*w4]
        return self.fc(pooled).astype(jnp.float32)
