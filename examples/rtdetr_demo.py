"""A small RT-DETR-family detector with deterministic random weights.

This is the demo model of enginekiln (``make demo``): a real RT-DETR structure
(ResNet backbone -> hybrid encoder (AIFI + CCFM) -> top-k query selection ->
deformable-attention decoder) built with transformers' ``RTDetrForObjectDetection``
from a deliberately small config, so it exports to ONNX in a few seconds and
the ONNX file is ~5 MB. Nothing is downloaded: the backbone is the in-library
``RTDetrResNetConfig`` and every weight is generated locally.

Weights: the transformers default initialisation is degenerate for a
demo (zeroed box heads and sampling offsets, BatchNorm weights ~N(0, 0.01), so
the query scores barely depend on the image). ``build_model()`` therefore
re-initialises *every* parameter and buffer from its own ``torch.Generator``,
seeded per tensor from a fixed seed and the tensor's name. The result does not
depend on the global RNG state, the global RNG state is left untouched, and two
calls (in one process or in two) give bit-identical state_dicts. Weights are
scaled so that for an image-like input the encoder's top-k query scores are
well separated (no ties, gaps far above float32 noise), so the selected
queries are the same in PyTorch and in ONNX Runtime.

Heavy imports (torch, transformers) happen inside ``build_model()``; importing
this module only to read ``INPUT_SHAPE`` etc. is cheap.
"""

from __future__ import annotations

import functools
import math
import zlib

INPUT_SHAPE = (1, 3, 256, 256)
INPUT_NAMES = ["pixel_values"]
OUTPUT_NAMES = ["logits", "pred_boxes"]

NUM_LABELS = 80
NUM_QUERIES = 100
SEED = 20240611

# The config is plain data so that it is part of the factory's source (and so of
# the export key): change a number here and the ONNX hash changes.
BACKBONE_CONFIG = dict(
    num_channels=3,
    embedding_size=16,  # must equal hidden_sizes[0] for the "basic" layer type
    hidden_sizes=[16, 32, 64, 128],
    depths=[1, 1, 1, 1],
    layer_type="basic",  # ResNet-18/34 style blocks (PResNet-D stem)
    hidden_act="relu",
    out_features=["stage2", "stage3", "stage4"],  # strides 8, 16, 32
)
DETR_CONFIG = dict(
    num_labels=NUM_LABELS,
    num_queries=NUM_QUERIES,
    encoder_in_channels=[32, 64, 128],
    feat_strides=[8, 16, 32],
    encoder_hidden_dim=64,
    encoder_layers=1,
    encoder_ffn_dim=128,
    encoder_attention_heads=4,
    encode_proj_layers=[2],
    d_model=64,
    decoder_in_channels=[64, 64, 64],
    num_feature_levels=3,
    decoder_layers=3,
    decoder_ffn_dim=128,
    decoder_attention_heads=4,
    decoder_n_points=4,
    num_denoising=0,  # training-only; keeps an unused embedding out of the checkpoint
    disable_custom_kernels=True,  # pure PyTorch deformable attention (exportable)
    anchor_image_size=None,  # anchors computed from the (static) feature shapes
)


def build_config():
    """The ``RTDetrConfig`` of the demo model (no network access)."""
    from transformers import RTDetrConfig, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(**BACKBONE_CONFIG)
    return RTDetrConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,  # ignored by transformers 5 when backbone_config is given;
        use_timm_backbone=False,  # kept explicit so an older transformers never reaches the hub
        **DETR_CONFIG,
    )


def _generator(name: str):
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed((SEED * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def _reinit_(model) -> None:
    """Deterministically overwrite every floating parameter and buffer of ``model``.

    Each tensor gets its own generator seeded from (SEED, tensor name), so the
    values depend only on the name, shape and rule, never on creation order or
    on the global RNG.
    """
    import torch
    from torch import nn

    done: set[str] = set()

    def normal_(name, t, mean=0.0, std=1.0):
        t.copy_(torch.randn(t.shape, generator=_generator(name), dtype=torch.float32) * std + mean)
        done.add(name)

    def uniform_(name, t, low, high):
        t.copy_(torch.rand(t.shape, generator=_generator(name), dtype=torch.float32) * (high - low) + low)
        done.add(name)

    def const_(name, t, value):
        t.fill_(value)
        done.add(name)

    prior = 1.0 / (NUM_LABELS + 1)
    prior_bias = -math.log((1 - prior) / prior)

    with torch.no_grad():
        for mname, m in model.named_modules():
            p = f"{mname}." if mname else ""
            kind = type(m).__name__
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                normal_(p + "weight", m.weight, std=1.0 / math.sqrt(fan_in))
                if m.bias is not None:
                    normal_(p + "bias", m.bias, std=0.05)
            elif isinstance(m, nn.BatchNorm2d) or kind == "RTDetrFrozenBatchNorm2d":
                # Non-trivial running statistics, so BN folding is really exercised.
                uniform_(p + "weight", m.weight, 0.7, 1.3)
                normal_(p + "bias", m.bias, std=0.1)
                normal_(p + "running_mean", m.running_mean, std=0.1)
                uniform_(p + "running_var", m.running_var, 0.7, 1.3)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.zero_()
            elif isinstance(m, nn.LayerNorm):
                normal_(p + "weight", m.weight, mean=1.0, std=0.05)
                normal_(p + "bias", m.bias, std=0.02)
            elif isinstance(m, nn.Embedding):
                normal_(p + "weight", m.weight, std=1.0)
            elif isinstance(m, nn.Linear):
                fan_in = m.in_features
                std = 1.0 / math.sqrt(fan_in)
                if ".sampling_offsets" in p:
                    std *= 0.5  # offsets of a fraction of a cell around the grid below
                elif ".attention_weights" in p:
                    std *= 0.5
                elif ".bbox_embed." in p or "enc_bbox_head." in p:
                    std *= 0.5
                normal_(p + "weight", m.weight, std=std)
                if m.bias is not None:
                    if "class_embed." in p or p.endswith("enc_score_head."):
                        normal_(p + "bias", m.bias, mean=prior_bias, std=0.2)
                    else:
                        normal_(p + "bias", m.bias, std=0.05)
            if kind == "RTDetrMultiscaleDeformableAttention":
                # Deformable-DETR grid init for the sampling offsets (as upstream):
                # each head looks in its own direction, point i at distance i+1.
                heads, levels, points = m.n_heads, m.n_levels, m.n_points
                thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
                grid = torch.stack([thetas.cos(), thetas.sin()], -1)
                grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(heads, 1, 1, 2)
                grid = grid.repeat(1, levels, points, 1)
                for i in range(points):
                    grid[:, :, i, :] *= i + 1
                m.sampling_offsets.bias.copy_(grid.view(-1))

    missing = [
        n
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.is_floating_point() and n not in done
    ]
    if missing:  # a transformers upgrade added a tensor this function does not know
        raise RuntimeError(f"rtdetr_demo: no deterministic init rule for {missing[:5]}")


@functools.lru_cache(maxsize=None)  # one class object per process, not one per build
def _wrapper_class():
    from torch import nn

    class RTDetrDemo(nn.Module):
        """``forward(pixel_values) -> (logits [1,Q,C], pred_boxes [1,Q,4] cxcywh in 0..1)``."""

        def __init__(self, detr):
            super().__init__()
            self.detr = detr

        def forward(self, pixel_values):
            out = self.detr(pixel_values=pixel_values)
            return out.logits, out.pred_boxes

    return RTDetrDemo


def build_model():
    """The demo RT-DETR in eval mode, bit-identical weights on every call."""
    import torch
    from transformers import RTDetrForObjectDetection

    config = build_config()
    # transformers' own __init__ draws from the global RNG; every value it draws is
    # overwritten below, and fork_rng keeps the caller's RNG state unchanged.
    with torch.random.fork_rng(devices=[]):
        detr = RTDetrForObjectDetection(config)
    _reinit_(detr)
    model = _wrapper_class()(detr)
    model.eval()
    return model


def example_input(seed: int = 0):
    """A deterministic image-like input of ``INPUT_SHAPE`` (values in [0, 1])."""
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.rand(INPUT_SHAPE, generator=g)
