//! Exact FP8 numerics (OCP 8-bit floating point: E4M3FN and E5M2).
//!
//! Everything the project does with FP8 values on the CPU — calibrating
//! scales, fake-quantizing weights to measure error, writing FP8 initializers
//! into ONNX graphs — must produce *bit-identical* codes to what the engine
//! runtime produces, or the accuracy measured offline is not the accuracy that
//! ships. This crate is the single place those numerics live, and it is tested
//! against the ONNX reference implementation on every rounding boundary.
//!
//! # Formats
//!
//! | | [`E4M3`](Fp8Format::E4M3) (ONNX `FLOAT8E4M3FN` = 17) | [`E5M2`](Fp8Format::E5M2) (ONNX `FLOAT8E5M2` = 19) |
//! |---|---|---|
//! | exponent bias | 7 | 15 |
//! | max finite | 448 (`0x7E`) | 57344 (`0x7B`) |
//! | smallest normal | 2^-6 | 2^-14 |
//! | smallest subnormal | 2^-9 | 2^-16 |
//! | infinities | none | `0x7C` / `0xFC` |
//! | NaN | `0x7F` / `0xFF` only | `0x7D..=0x7F`, `0xFD..=0xFF` |
//!
//! # Quantization semantics (what "quantize" means here)
//!
//! ONNX `QuantizeLinear` (opset 19+) with a float8 output, a float32
//! `y_scale` and a float8 `y_zero_point` (which must be 0 for float8 types)
//! is defined as
//!
//! ```text
//! y = saturate(round(x / y_scale))        // zero point 0, so nothing is added
//! ```
//!
//! where `x / y_scale` is computed in **float32** (one IEEE division), `round`
//! is round-to-nearest, ties-to-even, applied **directly to that f32 value**
//! (no intermediate f16/f64 rounding, which could round twice), and with
//! `saturate=1` (the default, and what CUDA's `__nv_cvt_float_to_fp8(..,
//! __NV_SATFINITE, ..)` does) values beyond the largest finite value —
//! including ±inf — become ±max finite. NaN stays NaN and the sign of zero is
//! preserved. [`quantize`] implements exactly that; [`encode_saturating`] is
//! the same with `y_scale = 1`.
//!
//! ONNX also defines `saturate=0`: the value is rounded as if the exponent
//! range were unbounded and anything that rounds past max finite becomes NaN
//! (E4M3FN, which has no infinity) or ±inf (E5M2). That is
//! [`encode`]`(format, x, false)`. It matches the ONNX reference
//! implementation (`onnx.reference`, i.e. `ml_dtypes` casts). Note that
//! onnxruntime's CPU kernel is known to deviate from the reference for some
//! non-saturating overflow inputs (e.g. E4M3FN `480.0` gives 448 instead of
//! NaN, E5M2 `61440.0` gives NaN instead of inf); with `saturate=1` it agrees.
//!
//! Dequantization (`DequantizeLinear`) is `decode(code) * scale` in f32
//! ([`dequantize`]); decoding is exact since every FP8 value is an f32.
//!
//! NaN inputs encode to the canonical NaN code `0x7F` with the input's sign
//! bit (`0xFF` for negative NaN); NaN codes decode to a quiet f32 NaN with the
//! code's sign. Only "is NaN" is part of the contract, not the payload.

#![forbid(unsafe_code)]

use core::fmt;
use core::str::FromStr;

/// An FP8 encoding. Named after the OCP spec; `E4M3` is the `FN` ("finite,
/// NaN only") variant that ONNX calls `FLOAT8E4M3FN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Fp8Format {
    /// 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, max 448.
    /// The usual choice for weights and activations.
    #[cfg_attr(feature = "serde", serde(alias = "e4m3fn"))]
    E4M3,
    /// 1 sign, 5 exponent (bias 15), 2 mantissa bits; IEEE-like with ±inf,
    /// max 57344. More range, less precision (gradients, wide activations).
    E5M2,
}

/// Bit-level description of a format, shared by the encoder and the
/// compile-time decode tables so that both derive from the same constants.
#[derive(Clone, Copy)]
struct Spec {
    /// Number of explicit mantissa bits.
    man_bits: u32,
    /// Exponent bias.
    bias: i32,
    /// Magnitude code (sign bit clear) of the largest finite value.
    max_code: u8,
    /// Whether `max_code + 1` is infinity (E5M2) rather than NaN (E4M3FN).
    has_inf: bool,
}

const E4M3_SPEC: Spec = Spec {
    man_bits: 3,
    bias: 7,
    max_code: 0x7E,
    has_inf: false,
};

const E5M2_SPEC: Spec = Spec {
    man_bits: 2,
    bias: 15,
    max_code: 0x7B,
    has_inf: true,
};

/// Canonical NaN magnitude code (all ones), valid in both formats.
const NAN_CODE: u8 = 0x7F;

impl Spec {
    /// Magnitude code produced by a non-saturating overflow.
    const fn overflow_code(self) -> u8 {
        if self.has_inf {
            self.max_code + 1
        } else {
            NAN_CODE
        }
    }
}

impl Fp8Format {
    /// Both formats, for exhaustive loops.
    pub const ALL: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

    const fn spec(self) -> Spec {
        match self {
            Fp8Format::E4M3 => E4M3_SPEC,
            Fp8Format::E5M2 => E5M2_SPEC,
        }
    }

    /// Short lowercase name, `"e4m3"` or `"e5m2"`; [`FromStr`] parses it back.
    pub const fn name(self) -> &'static str {
        match self {
            Fp8Format::E4M3 => "e4m3",
            Fp8Format::E5M2 => "e5m2",
        }
    }

    /// ONNX `TensorProto.DataType` of this format: `FLOAT8E4M3FN` = 17,
    /// `FLOAT8E5M2` = 19.
    pub const fn onnx_data_type(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 17,
            Fp8Format::E5M2 => 19,
        }
    }

    /// Number of explicit mantissa bits (3 or 2). A value `x` in the normal
    /// range is represented within half an ulp, `2^(floor(log2|x|) - mantissa_bits - 1)`.
    pub const fn mantissa_bits(self) -> u32 {
        self.spec().man_bits
    }

    /// Exponent bias (7 or 15).
    pub const fn exponent_bias(self) -> i32 {
        self.spec().bias
    }

    /// Largest finite value: 448 (E4M3) or 57344 (E5M2). Saturating
    /// quantization clamps to ±this, so it is the denominator of amax scaling.
    pub const fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// Smallest positive normal value: 2^-6 (E4M3) or 2^-14 (E5M2).
    pub const fn min_normal(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 1.0 / 64.0,    // 2^-6
            Fp8Format::E5M2 => 1.0 / 16384.0, // 2^-14
        }
    }

    /// Smallest positive subnormal value: 2^-9 (E4M3) or 2^-16 (E5M2).
    /// Magnitudes at or below half of it quantize to ±0.
    pub const fn min_subnormal(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 1.0 / 512.0,   // 2^-9
            Fp8Format::E5M2 => 1.0 / 65536.0, // 2^-16
        }
    }

    /// Code of +max finite (`0x7E` / `0x7B`); OR with `0x80` for the negative.
    pub const fn max_finite_code(self) -> u8 {
        self.spec().max_code
    }

    /// Whether `code` is a NaN of this format.
    pub const fn is_nan(self, code: u8) -> bool {
        let s = self.spec();
        let mag = code & 0x7F;
        mag > s.max_code && !(s.has_inf && mag == s.max_code + 1)
    }
}

impl fmt::Display for Fp8Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error returned when parsing an unknown [`Fp8Format`] name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseFp8FormatError(String);

impl fmt::Display for ParseFp8FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown FP8 format {:?} (expected \"e4m3\" or \"e5m2\")",
            self.0
        )
    }
}

impl std::error::Error for ParseFp8FormatError {}

impl FromStr for Fp8Format {
    type Err = ParseFp8FormatError;

    /// Accepts `"e4m3"` and `"e5m2"` (ASCII case-insensitive), and `"e4m3fn"`
    /// as an alias since that is the ONNX / ml_dtypes spelling.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("e4m3") || s.eq_ignore_ascii_case("e4m3fn") {
            Ok(Fp8Format::E4M3)
        } else if s.eq_ignore_ascii_case("e5m2") {
            Ok(Fp8Format::E5M2)
        } else {
            Err(ParseFp8FormatError(s.to_owned()))
        }
    }
}

// ---------------------------------------------------------------------------
// Encoding (f32 -> fp8)
// ---------------------------------------------------------------------------

/// `v >> s` rounded to nearest, ties to even, for `1 <= s <= 31`.
///
/// Adds just under half of the dropped range, plus one more if the kept LSB
/// is odd, so that an exact half rounds up only from an odd value.
#[inline(always)]
const fn shr_round_even(v: u32, s: u32) -> u32 {
    (v + ((1 << (s - 1)) - 1) + ((v >> s) & 1)) >> s
}

/// Bit-exact f32 -> fp8 conversion for one format; all integer arithmetic on
/// the f32 bit pattern, so the result is rounded once, from the exact input.
#[inline(always)]
const fn encode_spec(s: Spec, x: f32, saturate: bool) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return sign | NAN_CODE;
    }
    let m = s.man_bits;
    // Biased f32 exponent field of the smallest fp8 normal, 2^(1 - bias).
    let min_normal_field = (127 + 1 - s.bias) as u32;
    let mag = if abs >= min_normal_field << 23 {
        // fp8 normal range (or beyond): re-bias the exponent in place and drop
        // 23 - m mantissa bits. A rounding carry propagates into the exponent,
        // which is exactly the next binade; ±inf lands far above max_code.
        shr_round_even(abs - (((127 - s.bias) as u32) << 23), 23 - m)
    } else {
        // fp8 subnormal range: count multiples of the smallest subnormal
        // 2^(1 - bias - m). With sig = 1.f * 2^23 the value is
        // sig * 2^(e - 150), so the count is sig >> (151 - bias - m - e).
        // The shift is >= 24 - m here; above 25 the value is < 1/4 of the
        // smallest subnormal (f32 subnormals included) and rounds to 0.
        let e = (abs >> 23) as i32;
        let shift = 151 - s.bias - m as i32 - e;
        if shift > 25 {
            0
        } else {
            shr_round_even((abs & 0x007F_FFFF) | 0x0080_0000, shift as u32)
        }
    };
    if mag > s.max_code as u32 {
        // Rounded past max finite (or the input was ±inf).
        return sign
            | if saturate {
                s.max_code
            } else {
                s.overflow_code()
            };
    }
    sign | mag as u8
}

/// Converts `x` to an FP8 code with round-to-nearest-even.
///
/// With `saturate = true` out-of-range values (±inf included) become ±max
/// finite — ONNX `saturate=1`, CUDA `__NV_SATFINITE`. With `saturate = false`
/// they become NaN (E4M3, which has no inf) or ±inf (E5M2) — ONNX
/// `saturate=0`. NaN maps to NaN, `-0.0` to the negative zero code `0x80`.
#[inline]
pub const fn encode(format: Fp8Format, x: f32, saturate: bool) -> u8 {
    match format {
        Fp8Format::E4M3 => encode_spec(E4M3_SPEC, x, saturate),
        Fp8Format::E5M2 => encode_spec(E5M2_SPEC, x, saturate),
    }
}

/// `encode(format, x, true)`: the conversion every quantizer in this project
/// uses (ONNX `QuantizeLinear` default, CUDA `__NV_SATFINITE`).
#[inline]
pub const fn encode_saturating(format: Fp8Format, x: f32) -> u8 {
    encode(format, x, true)
}

// ---------------------------------------------------------------------------
// Decoding (fp8 -> f32), via tables built at compile time
// ---------------------------------------------------------------------------

/// f32 bit pattern of one FP8 code (exact; NaN codes give a quiet NaN).
const fn decode_bits(s: Spec, code: u8) -> u32 {
    let sign = ((code & 0x80) as u32) << 24;
    let mag = code & 0x7F;
    if mag > s.max_code {
        return if s.has_inf && mag == s.max_code + 1 {
            sign | 0x7F80_0000
        } else {
            sign | 0x7FC0_0000
        };
    }
    let m = s.man_bits;
    let exp = (mag >> m) as i32;
    let man = (mag as u32) & ((1 << m) - 1);
    if exp != 0 {
        return sign | (((exp - s.bias + 127) as u32) << 23) | (man << (23 - m));
    }
    if man == 0 {
        return sign; // ±0
    }
    // Subnormal man * 2^(1 - bias - m): normalize around its top set bit p.
    let p = 31 - man.leading_zeros();
    let e = p as i32 + 1 - s.bias - m as i32;
    sign | (((e + 127) as u32) << 23) | ((man - (1 << p)) << (23 - p))
}

const fn build_table(s: Spec) -> [f32; 256] {
    let mut table = [0.0f32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = f32::from_bits(decode_bits(s, code as u8));
        code += 1;
    }
    table
}

static E4M3_TABLE: [f32; 256] = build_table(E4M3_SPEC);
static E5M2_TABLE: [f32; 256] = build_table(E5M2_SPEC);

/// The 256-entry decode table of `format` (indexed by code), built at
/// compile time. Useful for vectorized / gather-based dequantization.
#[inline]
pub fn decode_table(format: Fp8Format) -> &'static [f32; 256] {
    match format {
        Fp8Format::E4M3 => &E4M3_TABLE,
        Fp8Format::E5M2 => &E5M2_TABLE,
    }
}

/// Exact f32 value of an FP8 code (one table lookup).
#[inline]
pub fn decode(format: Fp8Format, code: u8) -> f32 {
    decode_table(format)[code as usize]
}

// ---------------------------------------------------------------------------
// Scaled quantization (ONNX QuantizeLinear / DequantizeLinear)
// ---------------------------------------------------------------------------

/// ONNX `QuantizeLinear` with a float8 output: `encode_saturating(x / scale)`,
/// the division done in f32 exactly as ONNX does (not `x * (1 / scale)`,
/// which rounds differently). `scale` is meant to be positive and finite;
/// other values follow IEEE division (e.g. `scale = 0` gives ±max or NaN).
#[inline]
pub fn quantize(format: Fp8Format, x: f32, scale: f32) -> u8 {
    encode_saturating(format, x / scale)
}

/// ONNX `DequantizeLinear` with a float8 input and zero point 0:
/// `decode(code) * scale` in f32.
#[inline]
pub fn dequantize(format: Fp8Format, code: u8, scale: f32) -> f32 {
    decode(format, code) * scale
}

/// `dequantize(quantize(x, scale), scale)`: the value a QDQ pair produces,
/// used to measure quantization error without leaving f32.
#[inline]
pub fn fake_quantize(format: Fp8Format, x: f32, scale: f32) -> f32 {
    dequantize(format, quantize(format, x, scale), scale)
}

/// [`quantize`] over a slice into `dst`.
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn quantize_slice(format: Fp8Format, src: &[f32], scale: f32, dst: &mut [u8]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "quantize_slice: src and dst lengths differ"
    );
    // One match outside the loop so each arm is specialized on constants.
    match format {
        Fp8Format::E4M3 => quantize_into(E4M3_SPEC, src, scale, dst),
        Fp8Format::E5M2 => quantize_into(E5M2_SPEC, src, scale, dst),
    }
}

#[inline(always)]
fn quantize_into(s: Spec, src: &[f32], scale: f32, dst: &mut [u8]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = encode_spec(s, x / scale, true);
    }
}

/// [`dequantize`] over a slice into `dst`.
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn dequantize_slice(format: Fp8Format, src: &[u8], scale: f32, dst: &mut [f32]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "dequantize_slice: src and dst lengths differ"
    );
    let table = decode_table(format);
    for (d, &c) in dst.iter_mut().zip(src) {
        *d = table[c as usize] * scale;
    }
}

/// [`fake_quantize`] in place over a slice.
pub fn fake_quantize_slice(format: Fp8Format, data: &mut [f32], scale: f32) {
    match format {
        Fp8Format::E4M3 => fake_quantize_in_place(E4M3_SPEC, &E4M3_TABLE, data, scale),
        Fp8Format::E5M2 => fake_quantize_in_place(E5M2_SPEC, &E5M2_TABLE, data, scale),
    }
}

#[inline(always)]
fn fake_quantize_in_place(s: Spec, table: &[f32; 256], data: &mut [f32], scale: f32) {
    for x in data.iter_mut() {
        *x = table[encode_spec(s, *x / scale, true) as usize] * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_constants() {
        for f in Fp8Format::ALL {
            let m = f.mantissa_bits() as i32;
            let b = f.exponent_bias();
            assert_eq!(f.min_normal(), 2f32.powi(1 - b), "{f}");
            assert_eq!(f.min_subnormal(), 2f32.powi(1 - b - m), "{f}");
            assert_eq!(decode(f, f.max_finite_code()), f.max_finite(), "{f}");
            assert_eq!(decode(f, 0x80 | f.max_finite_code()), -f.max_finite());
            assert_eq!(decode(f, 1), f.min_subnormal());
            assert_eq!(decode(f, 1 << m), f.min_normal());
        }
        assert_eq!(Fp8Format::E4M3.max_finite(), 448.0);
        assert_eq!(Fp8Format::E5M2.max_finite(), 57344.0);
        assert_eq!(Fp8Format::E4M3.onnx_data_type(), 17);
        assert_eq!(Fp8Format::E5M2.onnx_data_type(), 19);
    }

    #[test]
    fn names_round_trip() {
        for f in Fp8Format::ALL {
            assert_eq!(f.to_string(), f.name());
            assert_eq!(f.name().parse::<Fp8Format>(), Ok(f));
            assert_eq!(f.name().to_uppercase().parse::<Fp8Format>(), Ok(f));
        }
        assert_eq!("e4m3fn".parse::<Fp8Format>(), Ok(Fp8Format::E4M3));
        let err = "fp8".parse::<Fp8Format>().unwrap_err();
        assert!(err.to_string().contains("fp8"), "{err}");
        assert!("e4m3 ".parse::<Fp8Format>().is_err());
        assert!("".parse::<Fp8Format>().is_err());
    }

    #[cfg(feature = "serde")]
    #[test]
    fn serde_uses_the_short_names() {
        for f in Fp8Format::ALL {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
            assert_eq!(serde_json::from_str::<Fp8Format>(&json).unwrap(), f);
        }
        let alias: Fp8Format = serde_json::from_str("\"e4m3fn\"").unwrap();
        assert_eq!(alias, Fp8Format::E4M3);
        assert!(serde_json::from_str::<Fp8Format>("\"fp8\"").is_err());
    }

    #[test]
    fn nan_and_inf_codes() {
        use Fp8Format::*;
        for c in 0..=255u8 {
            let mag = c & 0x7F;
            assert_eq!(E4M3.is_nan(c), mag == 0x7F, "{c:#x}");
            assert_eq!(E5M2.is_nan(c), mag >= 0x7D, "{c:#x}");
            for f in Fp8Format::ALL {
                assert_eq!(decode(f, c).is_nan(), f.is_nan(c), "{f} {c:#x}");
                // Sign bit of the code is the sign bit of the value, NaN included.
                assert_eq!(decode(f, c).is_sign_negative(), c & 0x80 != 0);
            }
        }
        assert_eq!(decode(E5M2, 0x7C), f32::INFINITY);
        assert_eq!(decode(E5M2, 0xFC), f32::NEG_INFINITY);
        assert!(!decode(E4M3, 0x7E).is_infinite());
    }

    // f32::next_up/next_down need Rust 1.86; the workspace MSRV is 1.85.
    fn up(x: f32) -> f32 {
        f32::from_bits(x.to_bits() + 1) // positive finite x only
    }

    fn down(x: f32) -> f32 {
        f32::from_bits(x.to_bits() - 1) // positive finite x only
    }

    #[test]
    fn special_inputs() {
        use Fp8Format::*;
        for f in Fp8Format::ALL {
            let max = f.max_finite_code();
            for sat in [true, false] {
                assert_eq!(encode(f, 0.0, sat), 0x00);
                assert_eq!(encode(f, -0.0, sat), 0x80);
                assert!(f.is_nan(encode(f, f32::NAN, sat)));
                assert!(f.is_nan(encode(f, -f32::NAN, sat)));
                assert_eq!(encode(f, f.max_finite(), sat), max);
                assert_eq!(encode(f, -f.max_finite(), sat), 0x80 | max);
            }
            assert_eq!(encode(f, f32::INFINITY, true), max);
            assert_eq!(encode(f, f32::NEG_INFINITY, true), 0x80 | max);
            assert_eq!(encode(f, f32::MAX, true), max);
        }
        assert_eq!(encode(E4M3, f32::INFINITY, false), 0x7F);
        assert_eq!(encode(E4M3, f32::NEG_INFINITY, false), 0xFF);
        assert_eq!(encode(E5M2, f32::INFINITY, false), 0x7C);
        assert_eq!(encode(E5M2, f32::NEG_INFINITY, false), 0xFC);
        // Overflow boundaries: ties go to the even neighbour.
        assert_eq!(encode(E4M3, 464.0, false), 0x7E); // tie 448|480 -> 448 (even)
        assert_eq!(encode(E4M3, up(464.0), false), 0x7F); // NaN
        assert_eq!(encode(E4M3, up(464.0), true), 0x7E);
        assert_eq!(encode(E5M2, down(61440.0), false), 0x7B);
        assert_eq!(encode(E5M2, 61440.0, false), 0x7C); // tie 57344|65536 -> inf (even)
        assert_eq!(encode(E5M2, 61440.0, true), 0x7B);
        // Underflow: half the smallest subnormal is a tie with 0 -> 0.
        for f in Fp8Format::ALL {
            let h = f.min_subnormal() / 2.0;
            assert_eq!(encode(f, h, true), 0x00);
            assert_eq!(encode(f, -h, true), 0x80);
            assert_eq!(encode(f, up(h), true), 0x01);
            assert_eq!(encode(f, f32::from_bits(1), true), 0x00);
            assert_eq!(encode(f, -f32::from_bits(1), true), 0x80);
        }
    }

    #[test]
    fn encode_is_const() {
        const C: u8 = encode_saturating(Fp8Format::E4M3, 1.0);
        assert_eq!(C, 0x38);
        assert_eq!(encode_saturating(Fp8Format::E5M2, 1.0), 0x3C);
    }

    #[test]
    fn slices_match_scalars() {
        let xs: Vec<f32> = (-3000..3000)
            .map(|i| i as f32 * 0.173)
            .chain([f32::NAN, f32::INFINITY, -0.0, 1e-30])
            .collect();
        for f in Fp8Format::ALL {
            for scale in [1.0f32, 0.37, 12.5] {
                let mut q = vec![0u8; xs.len()];
                quantize_slice(f, &xs, scale, &mut q);
                let mut dq = vec![0f32; xs.len()];
                dequantize_slice(f, &q, scale, &mut dq);
                let mut fq = xs.clone();
                fake_quantize_slice(f, &mut fq, scale);
                for i in 0..xs.len() {
                    assert_eq!(q[i], quantize(f, xs[i], scale));
                    let want = fake_quantize(f, xs[i], scale);
                    assert_eq!(dq[i].to_bits(), want.to_bits());
                    assert_eq!(fq[i].to_bits(), want.to_bits());
                    assert_eq!(
                        want.to_bits(),
                        dequantize(f, q[i], scale).to_bits(),
                        "{f} {}",
                        xs[i]
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn quantize_slice_length_mismatch_panics() {
        quantize_slice(Fp8Format::E4M3, &[1.0, 2.0], 1.0, &mut [0u8; 1]);
    }
}
