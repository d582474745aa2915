#!/usr/bin/env python3
"""Generate the FP8 reference fixture used by `crates/sd-fp8/tests/`.

Run once (deterministic; re-running reproduces the file byte for byte):

    /work/refenv/bin/python scripts/fp8/make_fp8_fixtures.py

Sources of truth
----------------
* Decode tables: `ml_dtypes` (`np.arange(256, dtype=np.uint8).view(float8_*)
  .astype(np.float32)`), i.e. the OCP FP8 spec values.
* Quantization (f32 -> fp8 code): the ONNX reference implementation
  (`onnx.reference.ReferenceEvaluator`) running a real `QuantizeLinear` node
  (opset 21) built with `onnx.helper`, with a float32 scalar `y_scale` and a
  zero point of the FP8 type equal to 0, for `saturate=1` and `saturate=0`.
  `ml_dtypes`' plain cast is *not* used as the saturating reference (it does
  not saturate); it is only used to view the output bytes.
* If onnxruntime is importable and its CPU kernel implements the node, the
  same model is also run there and any disagreement is reported (informative
  only: the fixture always holds the onnx.reference result).

Binary layout (all integers little endian)
------------------------------------------
    magic    8 bytes  b"SDFP8REF"
    version  u32      1
    prov_len u32      length of the provenance string
    prov     bytes    UTF-8, e.g. "onnx=1.23.2 ml_dtypes=0.6.0 ..."
    n_tables u32
    n_tables x { format u8 (0 = e4m3fn, 1 = e5m2), 256 x u32 f32 bits }
    n_sect   u32
    n_sect   x { format u8, scale u32 (f32 bits), n u32,
                 n x u32 input f32 bits,
                 n x u8 expected code with saturate=1,
                 n x u8 expected code with saturate=0 }
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

OPSET = 21
SEED = 0x5D_F8_2025
OUT = (
    Path(__file__).resolve().parents[2]
    / "crates"
    / "sd-fp8"
    / "tests"
    / "fixtures"
    / "fp8_reference.bin"
)

# (format id in the fixture, name, ml_dtypes type, ONNX data type)
FORMATS = [
    (0, "e4m3fn", ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN),
    (1, "e5m2", ml_dtypes.float8_e5m2, TensorProto.FLOAT8E5M2),
]

# Non-unit scales: exact powers of two, "ugly" decimal scales whose
# reciprocal is inexact, and a typical per-tensor amax/448 scale.
SCALES = [
    0.5,
    3.0,
    0.1,
    300.0,
    2.7 / 448.0,
    1.337 * 2.0**-10,
]

F32 = np.float32


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).astype(F32)


def neighbours(x: np.ndarray) -> np.ndarray:
    """x together with its f32 nextafter towards -inf and +inf."""
    x = x.astype(F32)
    with np.errstate(over="ignore"):
        return np.concatenate(
            [x, np.nextafter(x, F32(-np.inf)), np.nextafter(x, F32(np.inf))]
        )


def decode_table(dtype) -> np.ndarray:
    return np.arange(256, dtype=np.uint8).view(dtype).astype(F32)


def positive_grid(dtype) -> np.ndarray:
    """All non-negative finite values of the format plus the would-be next
    value after max finite (as float64, sorted)."""
    vals = decode_table(dtype).astype(np.float64)
    pos = np.unique(np.abs(vals[np.isfinite(vals)]))
    ulp_max = pos[-1] - pos[-2]
    return np.append(pos, pos[-1] + ulp_max)


def sweep_points(dtype) -> np.ndarray:
    """Dense deterministic sweep around every rounding decision (magnitudes)."""
    grid = positive_grid(dtype)
    lo, hi = grid[:-1], grid[1:]
    mid = (lo + hi) / 2  # exact in f64 and in f32 (needs only M+2 bits)
    quarter = lo + (hi - lo) / 4
    three_q = lo + 3 * (hi - lo) / 4
    info = ml_dtypes.finfo(dtype)
    min_sub = float(info.smallest_subnormal)
    max_fin = float(info.max)
    tiny = np.array(
        [min_sub / 2 ** k for k in range(1, 12)]
        + [min_sub * 0.75, min_sub * 0.25, min_sub * 0.499]
        + [2.0**-126, 2.0**-149, 2.0**-140, 1e-30, 1e-20, 1e-10]
    )
    beyond = np.array(
        [
            max_fin * 1.0001,
            max_fin + (grid[-1] - max_fin) / 2,  # tie between max and next
            grid[-1],
            grid[-1] * 1.5,
            max_fin * 2,
            max_fin * 4,
            65504.0,  # f16 max
            3.0e38,
            float(np.finfo(F32).max),
        ]
    )
    mags = np.concatenate([grid, mid, quarter, three_q, tiny, beyond])
    pts = neighbours(f32(mags))
    return np.concatenate([pts, -pts])


def specials() -> np.ndarray:
    bits = np.array(
        [
            0x00000000,  # +0
            0x80000000,  # -0
            0x7F800000,  # +inf
            0xFF800000,  # -inf
            0x7FC00000,  # qNaN
            0xFFC00000,  # -qNaN
            0x7F800001,  # sNaN
            0x7FFFFFFF,  # NaN, full payload
            0xFFFFFFFF,
            0x00000001,  # smallest f32 subnormal
            0x80000001,
            0x007FFFFF,  # largest f32 subnormal
            0x00800000,  # smallest f32 normal
            0x7F7FFFFF,  # f32 max
            0xFF7FFFFF,
        ],
        dtype=np.uint32,
    )
    return bits.view(F32)


def random_in_range(rng, dtype, n: int) -> np.ndarray:
    """Random f32 bit patterns whose exponent lies in or near the format's range."""
    info = ml_dtypes.finfo(dtype)
    e_lo = int(np.log2(float(info.smallest_subnormal))) - 4
    e_hi = int(np.log2(float(info.max))) + 3
    exp = rng.integers(e_lo + 127, e_hi + 127 + 1, size=n, dtype=np.uint32)
    man = rng.integers(0, 1 << 23, size=n, dtype=np.uint32)
    sign = rng.integers(0, 2, size=n, dtype=np.uint32)
    return ((sign << 31) | (exp << 23) | man).astype(np.uint32).view(F32)


def random_any(rng, n: int) -> np.ndarray:
    """Uniform random f32 bit patterns: every exponent, NaNs included."""
    return rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32).view(F32)


def unique_f32(x: np.ndarray) -> np.ndarray:
    return np.unique(x.astype(F32).view(np.uint32)).view(F32)


def quantize_model(
    onnx_type: int, dtype, saturate: int, cast_back: bool = False
) -> onnx.ModelProto:
    """A single QuantizeLinear node (zero point of the FP8 type = 0).

    With `cast_back`, a Cast to float32 is appended: used only for the
    onnxruntime cross-check, since onnxruntime cannot hand every float8 tensor
    back to numpy."""
    nodes = [
        helper.make_node(
            "QuantizeLinear",
            ["x", "y_scale", "y_zero_point"],
            ["y"],
            saturate=saturate,
        )
    ]
    out = helper.make_tensor_value_info("y", onnx_type, ["N"])
    if cast_back:
        nodes.append(helper.make_node("Cast", ["y"], ["y_f32"], to=TensorProto.FLOAT))
        out = helper.make_tensor_value_info("y_f32", TensorProto.FLOAT, ["N"])
    zp = numpy_helper.from_array(np.array(0, dtype=dtype), "y_zero_point")
    assert zp.data_type == onnx_type, (zp.data_type, onnx_type)
    graph = helper.make_graph(
        nodes,
        "quantize",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("y_scale", TensorProto.FLOAT, []),
        ],
        [out],
        initializer=[zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


class Reference:
    def __init__(self, name: str, onnx_type: int, dtype, saturate: int):
        self.label = f"{name} saturate={saturate}"
        self.dtype = dtype
        self.ref = ReferenceEvaluator(quantize_model(onnx_type, dtype, saturate))
        self.ort = None
        self.ort_checked = 0
        self.ort_disagreed = 0
        try:
            import onnxruntime as ort

            model = quantize_model(onnx_type, dtype, saturate, cast_back=True)
            self.ort = ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - informative only
            print(f"  {self.label}: onnxruntime unavailable: {e}", file=sys.stderr)

    def codes(self, x: np.ndarray, scale: np.float32) -> np.ndarray:
        feeds = {"x": x.astype(F32), "y_scale": np.array(scale, dtype=F32)}
        with np.errstate(all="ignore"):
            (y,) = self.ref.run(None, feeds)
        assert y.dtype == self.dtype, y.dtype
        codes = np.ascontiguousarray(y).view(np.uint8).copy()
        if self.ort is not None:
            self._cross_check(feeds, codes)
        return codes

    def _cross_check(self, feeds, codes: np.ndarray) -> None:
        (got,) = self.ort.run(None, feeds)
        want = codes.view(self.dtype).astype(F32)
        same = (want.view(np.uint32) == got.view(np.uint32)) | (
            np.isnan(want) & np.isnan(got)
        )
        self.ort_checked += codes.size
        self.ort_disagreed += int((~same).sum())
        if not same.all():
            i = np.flatnonzero(~same)[:4]
            print(
                f"  NOTE {self.label} scale={scale_str(feeds)}: onnxruntime differs "
                f"from onnx.reference on {(~same).sum()} of {codes.size} inputs, "
                f"e.g. x={feeds['x'][i]} reference={want[i]} onnxruntime={got[i]}",
                file=sys.stderr,
            )


def scale_str(feeds) -> str:
    return repr(float(feeds["y_scale"]))


def main() -> None:
    rng = np.random.default_rng(SEED)
    tables = []
    sections = []
    for fmt_id, name, dtype, onnx_type in FORMATS:
        tables.append((fmt_id, decode_table(dtype)))
        refs = {s: Reference(name, onnx_type, dtype, s) for s in (1, 0)}

        fmt_sections = []
        sweep = sweep_points(dtype)
        unit_inputs = unique_f32(
            np.concatenate(
                [
                    sweep,
                    specials(),
                    random_any(rng, 2048),
                    random_in_range(rng, dtype, 2048),
                ]
            )
        )
        fmt_sections.append((F32(1.0), unit_inputs))

        # Scaled sections: aim x / scale at the values, midpoints and overflow
        # boundaries of the sweep (x = t * scale and its f32 neighbours, so
        # some land exactly on ties after the f32 division), plus random data.
        grid = positive_grid(dtype)
        targets = np.concatenate([grid, (grid[:-1] + grid[1:]) / 2])
        targets = np.concatenate([targets, -targets])
        for scale in SCALES:
            s = F32(scale)
            x = neighbours(f32(targets * np.float64(s)))
            x = np.concatenate(
                [x, specials(), random_in_range(rng, dtype, 512) * s, random_any(rng, 64)]
            )
            fmt_sections.append((s, unique_f32(x)))

        for s, x in fmt_sections:
            sections.append((fmt_id, s, x, refs[1].codes(x, s), refs[0].codes(x, s)))
        for r in refs.values():
            if r.ort is not None:
                print(
                    f"{r.label}: onnxruntime cross-check: {r.ort_disagreed} of "
                    f"{r.ort_checked} differ (informative; fixture = onnx.reference)",
                    file=sys.stderr,
                )

    prov = (
        f"onnx={onnx.__version__} ml_dtypes={ml_dtypes.__version__} "
        f"numpy={np.__version__} QuantizeLinear opset={OPSET} "
        f"generator=scripts/fp8/make_fp8_fixtures.py seed={SEED:#x}"
    ).encode()

    out = bytearray()
    out += b"SDFP8REF"
    out += struct.pack("<II", 1, len(prov))
    out += prov
    out += struct.pack("<I", len(tables))
    for fmt_id, table in tables:
        out += struct.pack("<B", fmt_id)
        out += table.astype("<f4").view("<u4").tobytes()
    out += struct.pack("<I", len(sections))
    for fmt_id, scale, x, sat, nonsat in sections:
        out += struct.pack("<BII", fmt_id, int(np.array(scale, F32).view(np.uint32)), x.size)
        out += x.astype("<f4").view("<u4").tobytes()
        out += sat.astype(np.uint8).tobytes()
        out += nonsat.astype(np.uint8).tobytes()

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(bytes(out))
    total = sum(x.size for _, _, x, _, _ in sections)
    print(f"wrote {OUT} ({len(out)} bytes, {len(sections)} sections, {total} inputs)")


if __name__ == "__main__":
    main()
