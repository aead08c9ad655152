"""A plain convolutional encoder/decoder for small VQGANs trained on a CPU (``arch: conv``).

taming's ``Encoder``/``Decoder`` (ResNet blocks, GroupNorm, swish, attention) is the
architecture of every released VQGAN and the default. On a small synthetic data set
(ShapesWorld, 32 px) it is a poor fit for a CPU budget: measured on 2 cores, batch 16, 32 px,
f4, it needs ~0.5 s per step and after ~300 steps still renders coloured shapes as gray blurs
(mean L1 error on shape pixels 0.38, images in [-1, 1]), where this network, ~13 steps/s,
reached 0.15 in 100 s with the same quantiser and dead-code restarts.

The constructors read the same ``ddconfig`` keys as taming (``in_channels``, ``out_ch``,
``ch``, ``ch_mult``, ``z_channels``) and ignore the rest (``resolution``, ``attn_resolutions``,
...), so ``len(ch_mult) - 1`` stride-2 stages give a downsampling factor of
``2 ** (len(ch_mult) - 1)`` as in taming. The decoder's last convolution is ``conv_out`` (the
layer the adaptive GAN weight reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["ConvDecoder", "ConvEncoder"]


class ConvEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1).

    3x3 conv to ``ch * ch_mult[0]``, then one 4x4 stride-2 conv per further ``ch_mult`` entry
    (ReLU after each), then a 1x1 conv to ``z_channels``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        z_channels: int,
        **ignored: Any,
    ) -> None:
        super().__init__()
        widths = [ch * m for m in ch_mult]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1), nn.ReLU()]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.ReLU()]
        layers.append(nn.Conv2d(widths[-1], z_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f), the mirror of :class:`ConvEncoder`.

    3x3 conv to ``ch * ch_mult[-1]``, one 4x4 stride-2 transposed conv per further ``ch_mult``
    entry (ReLU after each), then a 3x3 ``conv_out`` to ``out_ch`` (unbounded output).
    """

    def __init__(
        self,
        *,
        out_ch: int,
        ch: int,
        ch_mult: Sequence[int],
        z_channels: int,
        **ignored: Any,
    ) -> None:
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        layers: list[nn.Module] = [nn.Conv2d(z_channels, widths[0], 3, 1, 1), nn.ReLU()]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(self.net(z))
