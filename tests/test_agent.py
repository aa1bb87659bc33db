"""The device agent: output comparison, deterministic reference files, release links."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from kiln.device_side import agent


def detections(rng, rows=10, classes=5):
    return {"logits": rng.standard_normal((1, rows, classes)).astype(np.float32),
            "pred_boxes": rng.random((1, rows, 4), dtype=np.float32)}


def test_identical_outputs_pass_without_permutation():
    ref = detections(np.random.default_rng(0))
    report = agent.compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, 1e-3, 1e-4)
    assert report["ok"] and not report["permuted"]


def test_permuted_rows_pass_only_when_allowed():
    ref = detections(np.random.default_rng(1))
    order = [3, 0, 1, 2, 4, 5, 6, 7, 9, 8]
    got = {k: v[:, order] for k, v in ref.items()}
    assert agent.compare_outputs(ref, got, 1e-3, 1e-4, rows_may_permute=True) == \
        {"ok": True, "max_abs_diff": pytest.approx(agent.compare_outputs(ref, got, 1e-3, 1e-4)["max_abs_diff"]),
         "permuted": True}
    strict = agent.compare_outputs(ref, got, 1e-3, 1e-4, rows_may_permute=False)
    assert not strict["ok"] and "logits" in strict["reason"]


def test_a_changed_value_fails_even_with_permutation():
    ref = detections(np.random.default_rng(2))
    got = {k: v[:, ::-1].copy() for k, v in ref.items()}
    got["pred_boxes"][0, 4, 2] += 0.01
    report = agent.compare_outputs(ref, got, 1e-3, 1e-4)
    assert not report["ok"] and "pred_boxes" in report["reason"]


def test_rows_are_matched_across_outputs_together():
    """Swapping boxes between two rows whose logits tie must fail: a row is logits+box together."""
    ref = detections(np.random.default_rng(3))
    ref["logits"][0, 1] = ref["logits"][0, 0]
    got = {k: v.copy() for k, v in ref.items()}
    got["pred_boxes"][0, [0, 1]] = got["pred_boxes"][0, [1, 0]]
    got["pred_boxes"][0, 0, 0] += 0.3  # and not merely swapped: one box is different
    assert not agent.compare_outputs(ref, got, 1e-3, 1e-4)["ok"]


def test_shape_and_missing_outputs_are_reported():
    ref = detections(np.random.default_rng(4))
    assert "missing outputs: pred_boxes" in agent.compare_outputs(ref, {"logits": ref["logits"]}, 1, 1)["reason"]
    bad = {**ref, "logits": ref["logits"][:, :5]}
    assert "shape" in agent.compare_outputs(ref, bad, 1, 1)["reason"]


def test_tied_tiny_model_is_accepted_by_onnxruntime(tmp_path):
    """The real case: a model with exact top-k ties, exported and run by ONNX Runtime."""
    import onnxruntime as ort
    import torch

    from examples import tiny_detector
    model = tiny_detector.build_model(ties=True)
    x = tiny_detector.example_input(0)
    with torch.no_grad():
        expected = dict(zip(["logits", "pred_boxes"], (t.numpy() for t in model(x))))
    path = tmp_path / "tied.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["pixel_values"], output_names=["logits", "pred_boxes"],
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(["logits", "pred_boxes"], session.run(None, {"pixel_values": x.numpy()})))
    assert not agent.compare_outputs(expected, got, 1e-3, 1e-4, rows_may_permute=False)["ok"]  # the ties bite
    assert agent.compare_outputs(expected, got, 1e-3, 1e-4, rows_may_permute=True)["ok"]


def test_reference_files_are_byte_deterministic(tmp_path):
    arrays = detections(np.random.default_rng(5))
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    agent.save_arrays(a, arrays)
    os.utime(a, (0, 0))
    agent.save_arrays(b, dict(reversed(list(arrays.items()))))
    assert hashlib.sha256(open(a, "rb").read()).digest() == hashlib.sha256(open(b, "rb").read()).digest()
    loaded = agent.load_arrays(a)
    assert set(loaded) == set(arrays) and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)


def test_activate_rollback_and_prune(tmp_path):
    model_dir = tmp_path / "det"
    for key in ("k1", "k2", "k3"):
        (model_dir / "releases" / key).mkdir(parents=True)
    with pytest.raises(SystemExit):
        agent.activate(str(model_dir), "missing")
    assert agent.activate(str(model_dir), "k1") == {"active": "k1", "previous": None}
    assert agent.activate(str(model_dir), "k2") == {"active": "k2", "previous": "k1"}
    assert os.readlink(model_dir / "current") == "releases/k2"
    assert os.readlink(model_dir / "previous") == "releases/k1"
    assert agent.prune(str(model_dir), [])["removed"] == ["k3"]
    assert agent.rollback(str(model_dir)) == {"active": "k1"}
    assert os.readlink(model_dir / "current") == "releases/k1" and not (model_dir / "previous").exists()
    assert agent.state(str(tmp_path), ["det", "other"]) == {"active": {"det": "k1", "other": None}}
