"""Parameter counts of AQCFNet by arithmetic on the widths, independent of the network's code.

A quaternion conv has 4·q_in·q_out·k³ real weights (eq. 2 shares them among the four blocks); an affine
instance norm has 2 per real channel. The pieces below add up a stream, an A-QCF direction, its
``QConv_out`` and the bottleneck, so a test can compare a built network or a printed total against them.
"""

from __future__ import annotations


def qconv(q_in, q_out, k, bias=False):
    """A quaternion conv: 4 q_in q_out k³ weights (+ a bias per real output channel)."""
    return 4 * q_in * q_out * k**3 + (4 * q_out if bias else 0)


def block(q_in, q_out, k=3):
    """Conv (no bias) + affine instance norm on 4 q_out real channels."""
    return qconv(q_in, q_out, k) + 2 * 4 * q_out


def stream_count(widths, encoder_convs=2, decoder_convs=2):
    """One stream: real stem conv + norm, quaternion stem, encoder, decoder with attention gates, real head."""
    w, bottom = widths[:-1], widths[-1]
    stream = 27 * 4 * w[0] + 2 * 4 * w[0] + block(w[0], w[0])
    for a, b in zip(w[:-1], w[1:], strict=True):
        stream += block(a, b) + (encoder_convs - 1) * block(b, b)
    skips = w[:-1]  # levels 0..n-1; level n feeds the bottleneck
    deeper = [bottom, *reversed(skips[1:])]
    for deep, skip in zip(deeper, reversed(skips), strict=True):
        inter = max(1, skip // 2)
        stream += qconv(deep, skip, 2, bias=True)  # transposed conv, kernel 2
        stream += qconv(skip, inter, 1) + qconv(skip, inter, 1, bias=True) + (4 * inter + 1)  # W_x, W_g, ψ
        stream += block(2 * skip, skip) + (decoder_convs - 1) * block(skip, skip)
    return stream + 4 * w[0] * 3 + 3  # real 1x1x1 head


def direction_count(c):
    """One A-QCF direction at c quaternion channels without its QConv_out: q/k/v 1x1x1, the gate's MLP."""
    hidden = max(1, 2 * 4 * c // 16)
    return 3 * qconv(c, c, 1) + (8 * c * hidden + hidden) + (hidden + 1)


def qconv_out_count(c, fusion_out_kernel=3):
    """A direction's QConv_out: the concatenation [F, context] (2c) back to c channels, with its norm."""
    return block(2 * c, c, fusion_out_kernel)


def expected_count(widths, fusion_out_kernel=3, fusion_weights="separate", encoder_convs=2, decoder_convs=2,
                   bottleneck_convs=2, streams=2):
    """The whole network of ``streams`` streams.

    With separate weights every ordered pair of streams has its own direction and each target one
    QConv_out; with shared weights one direction (with its QConv_out) serves every pair; one stream has
    no fusion.
    """
    w, bottom = widths[:-1], widths[-1]
    fusion = 0
    for c in w[1:]:
        if streams == 1:
            continue
        if fusion_weights == "shared":
            fusion += direction_count(c) + qconv_out_count(c, fusion_out_kernel)
        else:
            fusion += streams * (streams - 1) * direction_count(c) + streams * qconv_out_count(c, fusion_out_kernel)
    neck = block(w[-1], bottom) + (bottleneck_convs - 1) * block(bottom, bottom)
    return streams * stream_count(widths, encoder_convs, decoder_convs) + fusion + neck
