"""Stage 1 of the hand-written Ansible pipeline (the baseline of bench/bench_lean.py).

What a CI job would run on the controller before the playbook: load the checkpoint into the
model, export ONNX with torch, check it with onnx.checker, upload it to S3 and hand the playbook
a presigned GET URL and the file's sha256 (stage 2 downloads it on each device).

    python bench/ansible/export_upload.py --factory examples.tiny_detector:build_model \
        --checkpoint ckpt/tiny.pt --input pixel_values=1,3,32,32 --output logits --output pred_boxes \
        --bucket B --key models/tiny/<run>.onnx --vars-out vars.json

S3 endpoint and credentials come from the environment as for any boto3 program
(AWS_ENDPOINT_URL_S3 for a non-AWS endpoint, AWS_ACCESS_KEY_ID, ...).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factory", required=True, help="module:function returning the torch.nn.Module")
    ap.add_argument("--checkpoint", required=True, help="a torch state_dict")
    ap.add_argument("--input", action="append", required=True, help="name=d0,d1,... (repeatable)")
    ap.add_argument("--output", action="append", required=True, help="output name (repeatable)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--vars-out", required=True, help="JSON file for ansible-playbook -e @FILE")
    args = ap.parse_args()

    import torch
    module_name, func = args.factory.split(":")
    sys.path.insert(0, os.getcwd())
    model = getattr(importlib.import_module(module_name), func)()
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    model.eval()
    inputs = {}
    for spec in args.input:
        name, dims = spec.split("=")
        inputs[name] = torch.zeros(*[int(d) for d in dims.split(",")])

    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, tuple(inputs.values()), path, input_names=list(inputs),
                          output_names=args.output, opset_version=args.opset, dynamo=False)
        onnx.checker.check_model(path, full_check=True)
        with open(path, "rb") as f:
            sha256 = hashlib.sha256(f.read()).hexdigest()

        import boto3
        s3 = boto3.client("s3")
        s3.upload_file(path, args.bucket, args.key)
        url = s3.generate_presigned_url("get_object", Params={"Bucket": args.bucket, "Key": args.key},
                                        ExpiresIn=3600)
    with open(args.vars_out, "w") as f:
        json.dump({"onnx_url": url, "onnx_sha256": sha256}, f)
    print(f"exported and uploaded s3://{args.bucket}/{args.key} (sha256 {sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
