"""A tiny DETR-shaped detector for fast tests (ONNX export well under 2 s).

Structure: two stride-2 3x3 convs (32x32 -> 8x8 = 64 locations), a 1x1 class
head (C logits per location) and a 1x1 box head (4 values per location), then
the same query selection as RT-DETR: top-k (Q) locations by their max class
logit, gather their logits and boxes.

    forward(pixel_values [1,3,32,32]) -> (logits [1,Q,C], pred_boxes [1,Q,4] sigmoid)

``build_model()`` has deterministic weights (own ``torch.Generator``, fixed
seed per tensor name; the global RNG is neither read nor changed) and, for an
image-like input, distinct top-k scores.

``build_model_with_ties()`` (= ``build_model(ties=True)``) is the same network
with ``TIE_LOCATIONS`` locations whose class logits are forced to be exactly
equal: the class head sees all-zero features there (a fixed mask), so their
logits are exactly the class-head bias, plus a fixed per-location prior that
lifts them to the top of the ranking. Their *boxes* still differ (the box head
is not masked), so the outputs contain rows with exactly tied scores whose
order is implementation-defined (PyTorch vs ONNX Runtime TopK): a comparison of
outputs must tolerate permuted rows within a tie group.

Heavy imports happen inside the functions; importing this module is cheap.
"""

from __future__ import annotations

import functools
import zlib

INPUT_SHAPE = (1, 3, 32, 32)
INPUT_NAMES = ["pixel_values"]
OUTPUT_NAMES = ["logits", "pred_boxes"]

NUM_CLASSES = 5
NUM_QUERIES = 10
WIDTH = 16
STRIDE = 4  # two stride-2 convs
SEED = 1234
# Flattened locations (row * 8 + col on the 8x8 grid) whose scores tie exactly in
# the ties variant, and how much their class logits are lifted so that they land
# inside the top-k (and well away from the k / k+1 boundary).
TIE_LOCATIONS = (9, 18, 27, 45)
TIE_LIFT = 20.0


def _generator(name: str):
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed((SEED * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


@functools.lru_cache(maxsize=None)  # one class object per process, not one per build
def _module_class():
    import torch
    from torch import nn

    class TinyDetector(nn.Module):
        def __init__(self, num_classes=NUM_CLASSES, num_queries=NUM_QUERIES, width=WIDTH, ties=False):
            super().__init__()
            self.num_classes = num_classes
            self.num_queries = num_queries
            self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
            self.act = nn.ReLU()
            self.class_head = nn.Conv2d(width, num_classes, 1)
            self.box_head = nn.Conv2d(width, 4, 1)
            self.ties = ties
            if ties:
                h, w = INPUT_SHAPE[2] // STRIDE, INPUT_SHAPE[3] // STRIDE
                mask = torch.ones(1, 1, h * w)
                lift = torch.zeros(1, 1, h * w)
                for loc in TIE_LOCATIONS:
                    mask[..., loc] = 0.0
                    lift[..., loc] = TIE_LIFT
                # Buffers, so they are part of the checkpoint and of the ONNX graph.
                self.register_buffer("tie_mask", mask.view(1, 1, h, w))
                self.register_buffer("tie_lift", lift.view(1, 1, h, w))

        def forward(self, pixel_values):
            feat = self.act(self.conv2(self.act(self.conv1(pixel_values))))
            if self.ties:
                cls = self.class_head(feat * self.tie_mask) + self.tie_lift
            else:
                cls = self.class_head(feat)
            box = self.box_head(feat)
            cls = cls.flatten(2).transpose(1, 2)  # [B, N, C]
            box = box.flatten(2).transpose(1, 2)  # [B, N, 4]
            scores = cls.max(-1).values  # [B, N]
            _, idx = torch.topk(scores, self.num_queries, dim=1)  # [B, Q]
            logits = torch.gather(cls, 1, idx.unsqueeze(-1).expand(-1, -1, cls.shape[-1]))
            boxes = torch.gather(box, 1, idx.unsqueeze(-1).expand(-1, -1, 4)).sigmoid()
            return logits, boxes

    return TinyDetector


def build_model(ties: bool = False):
    """The tiny detector in eval mode; bit-identical weights on every call."""
    import math

    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):  # nn default init draws from the global RNG
        model = _module_class()(ties=ties)
    with torch.no_grad():
        for name, t in model.named_parameters():
            mod = model.get_submodule(name.rsplit(".", 1)[0])
            if name.endswith("weight") and isinstance(mod, nn.Conv2d):
                fan_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                std = math.sqrt(2.0 / fan_in)  # He init: ReLU network keeps its scale
                t.copy_(torch.randn(t.shape, generator=_generator(name)) * std)
            else:  # biases
                t.copy_(torch.randn(t.shape, generator=_generator(name)) * 0.1)
    model.eval()
    return model


def build_model_with_ties():
    """Variant whose top-k contains ``len(TIE_LOCATIONS)`` exactly tied scores."""
    return build_model(ties=True)


def example_input(seed: int = 0):
    """A deterministic image-like input of ``INPUT_SHAPE`` (values in [0, 1])."""
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return torch.rand(INPUT_SHAPE, generator=g)
