"""The example model factories: deterministic weights, output contract, ties."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # plain `pytest` puts tests/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from examples import rtdetr_demo, tiny_detector  # noqa: E402

STATE_DICT_DIGEST = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.manual_seed(int(sys.argv[2]))
from examples import tiny_detector
sd = tiny_detector.build_model().state_dict()
h = hashlib.sha256()
for k in sorted(sd):
    h.update(k.encode()); h.update(str(sd[k].dtype).encode()); h.update(sd[k].contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def _digest(model) -> str:
    sd = model.state_dict()
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(str(sd[k].dtype).encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _assert_same_state_dict(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _run(model, x):
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- tiny detector


def test_tiny_module_constants_need_no_torch_import():
    assert tiny_detector.INPUT_SHAPE == (1, 3, 32, 32)
    assert tiny_detector.INPUT_NAMES == ["pixel_values"]
    assert tiny_detector.OUTPUT_NAMES == ["logits", "pred_boxes"]


def test_tiny_state_dict_is_deterministic_and_ignores_global_rng():
    torch.manual_seed(1)
    a = tiny_detector.build_model()
    torch.manual_seed(2)
    b = tiny_detector.build_model()
    _assert_same_state_dict(a, b)
    assert _digest(a) == _digest(b)
    # The weights are not trivial (the check above would also pass on zeros).
    assert a.conv1.weight.std() > 0.05 and a.class_head.bias.abs().sum() > 0


def test_tiny_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_detector.build_model()
    tiny_detector.build_model_with_ties()
    assert torch.equal(torch.rand(3), expected)


def test_tiny_state_dict_is_identical_in_another_process():
    here = _digest(tiny_detector.build_model())
    out = subprocess.run(
        [sys.executable, "-c", STATE_DICT_DIGEST, str(ROOT), "987"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == here


@pytest.mark.parametrize("ties", [False, True])
def test_tiny_output_contract(ties):
    model = tiny_detector.build_model(ties=ties)
    assert not model.training
    logits, boxes = _run(model, tiny_detector.example_input())
    q, c = tiny_detector.NUM_QUERIES, tiny_detector.NUM_CLASSES
    assert logits.shape == (1, q, c) and logits.dtype == torch.float32
    assert boxes.shape == (1, q, 4) and boxes.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert ((boxes > 0) & (boxes < 1)).all()  # sigmoid
    scores = logits.max(-1).values[0]
    assert torch.all(scores[:-1] >= scores[1:])  # queries come out sorted by score


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tiny_normal_model_has_no_ties_in_topk(seed):
    logits, boxes = _run(tiny_detector.build_model(), tiny_detector.example_input(seed))
    scores = logits.max(-1).values[0]
    assert scores.unique().numel() == tiny_detector.NUM_QUERIES
    assert torch.unique(boxes[0], dim=0).shape[0] == tiny_detector.NUM_QUERIES


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tiny_ties_variant_has_exact_ties_with_different_boxes(seed):
    logits, boxes = _run(tiny_detector.build_model_with_ties(), tiny_detector.example_input(seed))
    n = len(tiny_detector.TIE_LOCATIONS)
    scores = logits.max(-1).values[0]
    # The tied group leads the ranking, all exactly equal, strictly above the rest.
    assert torch.all(scores[:n] == scores[0])
    assert scores[n] < scores[0]
    assert scores[n:].unique().numel() == tiny_detector.NUM_QUERIES - n
    # Whole logit rows are identical, but the boxes differ: the order of these
    # rows is implementation-defined and a comparison must tolerate permutation.
    assert torch.all(logits[0, :n] == logits[0, :1])
    assert torch.unique(boxes[0, :n], dim=0).shape[0] == n


def test_tiny_ties_variant_shares_the_normal_weights():
    normal = tiny_detector.build_model().state_dict()
    ties = tiny_detector.build_model_with_ties().state_dict()
    assert set(ties) - set(normal) == {"tie_mask", "tie_lift"}
    for k, v in normal.items():
        assert torch.equal(v, ties[k]), k


# ---------------------------------------------------------------- RT-DETR demo


def test_rtdetr_demo_builds_offline_deterministically_and_runs():
    torch.manual_seed(5)
    model = rtdetr_demo.build_model()
    torch.manual_seed(6)
    again = rtdetr_demo.build_model()
    _assert_same_state_dict(model, again)
    assert not model.training

    cap = {}
    hook = model.detr.model.enc_score_head.register_forward_hook(lambda m, i, o: cap.__setitem__("scores", o))
    try:
        logits, boxes = _run(model, rtdetr_demo.example_input())
    finally:
        hook.remove()
    q = rtdetr_demo.NUM_QUERIES
    assert rtdetr_demo.INPUT_SHAPE == (1, 3, 256, 256)
    assert logits.shape == (1, q, rtdetr_demo.NUM_LABELS)
    assert boxes.shape == (1, q, 4)
    assert torch.isfinite(logits).all() and ((boxes >= 0) & (boxes <= 1)).all()
    # Top-k query selection over the encoder tokens: the selected scores are distinct.
    selected = cap["scores"].max(-1).values[0].sort(descending=True).values[:q]
    assert selected.unique().numel() == q
    assert torch.unique(boxes[0], dim=0).shape[0] == q
