#!/usr/bin/env python3
"""Validates exported ONNX models with the peer tools: the onnx checker (full check,
with shape inference), the project's FP8 Q/DQ conventions read back through the onnx
package, and ONNX Runtime on the CPU (graph optimizations off) against reference
outputs computed by the project's CPU backend.

Usage: onnx_check.py JOBS.json
JOBS.json: [{"model": "x.onnx", "inputs": {"name": "in.npy", ...},
             "expected": {"name": "out.npy", ...}, "tolerance": 1e-4,
             "run": true, "weight_only": ["layer", ...]}, ...]
  run: false = checker and conventions only; weight_only: layers whose MatMul takes
  an FP8 weight but an unquantized activation (no Q/DQ pair expected there).
Float32 inputs are cast to float16 where the model's input is float16.
Prints one JSON object per job on stdout; exits 1 if any job fails.
Error metric per output: max |ort - ref| / max |ref| (relative to the output's range).
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

FP8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}


def conventions(path, weight_only=()):
    """FP8 Q/DQ conventions (opset, IR, zero points, saturate, scale dtypes)."""
    weight_only = set(weight_only)
    model = onnx.load(path)  # loads external data too
    problems = []
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 19:
        problems.append(f"opset {opset} < 19")
    if model.ir_version < 9:
        problems.append(f"IR version {model.ir_version} < 9")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in model.graph.initializer}
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "fp8_weights": 0, "per_channel": 0}
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts[n.op_type] += 1
        if len(n.input) < 3 or n.input[2] not in inits:
            problems.append(f"{n.name}: no zero-point initializer")
            continue
        zp = inits[n.input[2]]
        if zp.data_type not in FP8:
            problems.append(f"{n.name}: zero point is not FLOAT8")
        elif numpy_helper.to_array(zp).astype(np.float32).any():
            problems.append(f"{n.name}: zero point is not 0")
        scale_t = types.get(n.input[1])
        if n.op_type == "QuantizeLinear":
            sat = [a.i for a in n.attribute if a.name == "saturate"]
            if sat != [1]:
                problems.append(f"{n.name}: saturate is not 1")
            if types.get(n.input[0]) != scale_t:
                problems.append(f"{n.name}: scale dtype differs from the input's")
        else:
            if n.input[0] in inits:
                counts["fp8_weights"] += 1
                if inits[n.input[0]].data_type not in FP8:
                    problems.append(f"{n.name}: weight is not FLOAT8")
            axis = [a.i for a in n.attribute if a.name == "axis"]
            if axis and len(inits[n.input[1]].dims) == 1:
                counts["per_channel"] += 1
    # Placement: a weight DequantizeLinear feeds a MatMul directly (input B), whose input A
    # is the DequantizeLinear of an activation QuantizeLinear (the pair directly before the
    # GEMM), with the same FP8 type on both sides of the pair.
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        b = producer.get(n.input[1])
        if b is None or b.op_type != "DequantizeLinear" or b.input[0] not in inits:
            continue
        a = producer.get(n.input[0])
        q = producer.get(a.input[0]) if a is not None and a.op_type == "DequantizeLinear" else None
        has_pair = q is not None and q.op_type == "QuantizeLinear"
        if n.name.split("/")[0] in weight_only:
            if has_pair:
                problems.append(f"{n.name}: weight-only layer with a Q/DQ pair on the activation")
            else:
                counts["weight_only_matmuls"] = counts.get("weight_only_matmuls", 0) + 1
        elif not has_pair:
            problems.append(f"{n.name}: FP8 weight without a Q/DQ pair on the activation")
        elif inits[q.input[2]].data_type != inits[a.input[2]].data_type:
            problems.append(f"{n.name}: Q and DQ disagree on the FP8 type")
        else:
            counts["quantized_matmuls"] = counts.get("quantized_matmuls", 0) + 1
    return problems, counts, opset, model.ir_version


def run_job(job):
    path = job["model"]
    result = {"model": path}
    onnx.checker.check_model(path, full_check=True)
    result["checker"] = "ok"
    problems, counts, opset, ir = conventions(path, job.get("weight_only", []))
    result.update(conventions=problems, qdq=counts, opset=opset, ir_version=ir)
    if not job.get("run", True):
        # bfloat16 graphs: ONNX Runtime's CPU provider lacks bfloat16 kernels (and
        # bfloat16 Q/DQ scales); the checker and the conventions are what is validated.
        result["ok"] = not problems
        return result
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    feeds = {}
    for k, v in job["inputs"].items():
        a = np.load(v)
        if types.get(k) == "tensor(float16)":
            a = a.astype(np.float16)
        feeds[k] = a
    names = list(job["expected"])
    outs = sess.run(names, feeds)
    tol = job.get("tolerance")
    ok = not problems
    result["outputs"] = {}
    for name, got in zip(names, outs):
        ref = np.load(job["expected"][name]).astype(np.float64)
        got = got.astype(np.float64)
        if got.shape != ref.shape:
            result["outputs"][name] = {"error": f"shape {got.shape} != {ref.shape}"}
            ok = False
            continue
        err = np.abs(got - ref)
        scale = float(np.abs(ref).max()) or 1.0
        rel = float(err.max()) / scale
        r = {
            "shape": list(got.shape),
            "max_abs_err": float(err.max()),
            "max_abs_ref": scale,
            "rel_err": rel,
            "frac_over_1e-4": float((err > 1e-4 * scale).mean()),
            "finite": bool(np.isfinite(got).all()),
        }
        if tol is not None and (rel > tol or not r["finite"]):
            ok = False
        result["outputs"][name] = r
    result["ok"] = ok
    return result


def main():
    jobs = json.load(open(sys.argv[1]))
    failed = False
    for job in jobs:
        try:
            r = run_job(job)
        except Exception as e:  # report and go on with the other jobs
            r = {"model": job["model"], "ok": False, "exception": f"{type(e).__name__}: {e}"}
        failed |= not r["ok"]
        print(json.dumps(r), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
