"""Feature Pyramid Network (Lin et al., "Feature Pyramid Networks for Object
Detection", CVPR 2017) on a ResNet, as Lucid's ``backbone`` module.

Lateral 1x1 convs bring C2..C5 to a common width, a top-down path adds the 2x
nearest-neighbour upsampled coarser map, and a 3x3 conv smooths each sum into
P2..P5. Optionally a P6 is taken from P5 by a stride-2 subsample, as torchvision's
``LastLevelMaxPool`` does for its RPN. Optionally each conv is followed by a norm
(``norm_mode``, as torchvision's v2 FPN has BatchNorm), and then has no bias.

``ResNetFPN`` declares its levels' nominal strides, as detectron2's
``Backbone.output_shape()`` does, so that RoIAlign and the input size check read
them instead of repeating them.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lucid_jax.models.conv import Conv
from lucid_jax.models.norms import check_norm_mode, norm_layer
from lucid_jax.models.resnet import ResNet


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class FPN(nn.Module):
    """Top-down pyramid: ``lateral_convs.i`` (1x1) and ``output_convs.i`` (3x3),
    each followed by ``lateral_norms.i`` and ``output_norms.i`` where ``norm_mode`` is set.

    Attributes:
      out_channels: width of every pyramid level (256).
      extra_p6: also return P6 = P5[::2, ::2] (torchvision's extra RPN level), a
        max-pool with a 1x1 window and stride 2: its grid is ceil(H5 / 2) x ceil(W5 / 2).
      norm_mode: None (convs with a bias, no norm: Lucid's and torchvision's v1) or
        a mode of ``norms.NORM_MODES`` after every conv, whose bias it replaces
        (torchvision's v2), with no activation.
      bn_axis_name: a mapped axis over which batch statistics are averaged.
      dtype: computation dtype.
    """

    out_channels: int = 256
    extra_p6: bool = False
    norm_mode: str | None = None
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    def _conv_norm(self, x: jax.Array, kernel: int, name: str, norm_name: str, train: bool) -> jax.Array:
        pad = kernel // 2
        x = Conv(
            self.out_channels,
            (kernel, kernel),
            padding=((pad, pad), (pad, pad)),
            use_bias=self.norm_mode is None,
            dtype=self.dtype,
            name=name,
        )(x)
        if self.norm_mode is None:
            return x
        norm = norm_layer(self.norm_mode, train=train, name=norm_name, axis_name=self.bn_axis_name, dtype=self.dtype)
        return norm(x)

    @nn.compact
    def __call__(self, features: list[jax.Array], train: bool = False) -> list[jax.Array]:
        """C2..C5 -> P2..P5 (and P6).

        Args:
          features: [c2 [B, H/4, W/4, C2], ..., c5 [B, H/32, W/32, C5]].
          train: batch statistics in the norms (``norm_mode="batch"``).

        Returns:
          [p2 [B, H/4, W/4, out], ..., p5 [B, H/32, W/32, out]]
          (+ p6 [B, ceil(H/64), ceil(W/64), out]).
        """
        check_norm_mode(self.norm_mode, optional=True, where="the FPN's norm_mode")
        n = len(features)
        laterals = [
            self._conv_norm(f, 1, f"lateral_convs.{i}", f"lateral_norms.{i}", train) for i, f in enumerate(features)
        ]
        merged = [laterals[-1]]  # top-down, coarsest first
        for i in range(n - 2, -1, -1):
            merged.append(laterals[i] + upsample_nearest_2x(merged[-1]))
        merged.reverse()
        outputs = [self._conv_norm(m, 3, f"output_convs.{i}", f"output_norms.{i}", train) for i, m in enumerate(merged)]
        if self.extra_p6:
            outputs.append(outputs[-1][:, ::2, ::2, :])  # max-pool with a 1x1 window, stride 2
        return outputs


class ResNetFPN(nn.Module):
    """Lucid's detector backbone: ``net`` (a ResNet classifier) and ``fpn``.

    ``net`` is a dataclass field, so ``model.backbone.net`` is reachable on the
    unbound module, as Lucid's Training Notes use it; so are ``strides``,
    ``roi_strides`` and ``size_divisibility``, which are computed from fields.

    Attributes:
      net: the ResNet whose C2..C5 feed the pyramid.
      out_channels: width of every pyramid level.
      extra_p6: also return P6 (for the RPN only; RoIAlign never pools from it).
      norm_mode: the FPN's norm (None: none; see ``FPN``).
      dtype: computation dtype.
    """

    net: ResNet
    out_channels: int = 256
    extra_p6: bool = False
    norm_mode: str | None = None
    dtype: Any = jnp.float32

    @property
    def roi_strides(self) -> tuple[int, ...]:
        """Strides of P2..P5, the levels RoIAlign pools from: (4, 8, 16, 32)."""
        return tuple(self.net.feature_strides)

    @property
    def strides(self) -> tuple[int, ...]:
        """Nominal stride of each returned level: (4, 8, 16, 32), then 64 for P6.

        A level of stride s is [B, H/s, W/s, C] when s divides H and W. P6 is
        ceil(H/64) x ceil(W/64), so where H/32 or W/32 is odd its actual stride,
        ``H // ceil(H/64)``, is below 64 (the RPN's anchors use the actual one).
        """
        p6 = (2 * self.roi_strides[-1],) if self.extra_p6 else ()
        return self.roi_strides + p6

    @property
    def size_divisibility(self) -> int:
        """Input H and W must be multiples of this: the largest RoI stride, 32."""
        return max(self.roi_strides)

    def setup(self):
        self.fpn = FPN(
            self.out_channels, self.extra_p6, self.norm_mode, bn_axis_name=self.net.bn_axis_name, dtype=self.dtype
        )

    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """Pyramid features of NHWC images.

        Args:
          x: [B, H, W, 3] NHWC, H and W multiples of ``size_divisibility``.
          train: use batch statistics in the ResNet's and the FPN's norms (unless frozen).

        Returns:
          [P2, P3, P4, P5(, P6)], level l of shape [B, ceil(H/s_l), ceil(W/s_l),
          out_channels] with s_l = ``strides[l]``.
        """
        return self.fpn(self.net.features(x, train), train)
