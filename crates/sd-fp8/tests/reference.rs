//! Bit-exact agreement with the external references, from the committed
//! fixture `fixtures/fp8_reference.bin`, generated once by
//! `scripts/fp8/make_fp8_fixtures.py`:
//!
//! * decode tables: `ml_dtypes` (`float8_e4m3fn`, `float8_e5m2`) -> f32;
//! * quantization: `onnx.reference.ReferenceEvaluator` running a real
//!   `QuantizeLinear` (opset 21, float8 zero point 0, f32 scale) with
//!   `saturate=1` and `saturate=0`, at scale 1 and at several non-unit scales.
//!
//! The file layout is documented in the generator script.

use sd_fp8::{Fp8Format, decode, decode_table, encode, encode_saturating, quantize};

const FIXTURE: &[u8] = include_bytes!("fixtures/fp8_reference.bin");

struct Section {
    format: Fp8Format,
    scale: f32,
    inputs: Vec<f32>,
    saturating: Vec<u8>,
    non_saturating: Vec<u8>,
}

struct Fixture {
    provenance: String,
    tables: Vec<(Fp8Format, Vec<u32>)>,
    sections: Vec<Section>,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.buf.len() >= n, "fixture truncated");
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }

    fn u32s(&mut self, n: usize) -> Vec<u32> {
        self.take(4 * n)
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn format(&mut self) -> Fp8Format {
        match self.u8() {
            0 => Fp8Format::E4M3,
            1 => Fp8Format::E5M2,
            other => panic!("unknown format id {other}"),
        }
    }
}

fn load() -> Fixture {
    let mut r = Reader { buf: FIXTURE };
    assert_eq!(r.take(8), b"SDFP8REF", "bad magic");
    assert_eq!(r.u32(), 1, "unsupported fixture version");
    let prov_len = r.u32() as usize;
    let provenance = String::from_utf8(r.take(prov_len).to_vec()).unwrap();
    let tables = (0..r.u32())
        .map(|_| {
            let f = r.format();
            (f, r.u32s(256))
        })
        .collect();
    let sections = (0..r.u32())
        .map(|_| {
            let format = r.format();
            let scale = f32::from_bits(r.u32());
            let n = r.u32() as usize;
            let inputs = r.u32s(n).into_iter().map(f32::from_bits).collect();
            let saturating = r.take(n).to_vec();
            let non_saturating = r.take(n).to_vec();
            Section {
                format,
                scale,
                inputs,
                saturating,
                non_saturating,
            }
        })
        .collect();
    assert!(r.buf.is_empty(), "trailing bytes in fixture");
    Fixture {
        provenance,
        tables,
        sections,
    }
}

/// Codes agree if equal, or if both are NaN (ONNX does not specify which NaN
/// code or sign a NaN input produces).
fn same_code(format: Fp8Format, got: u8, want: u8) -> bool {
    got == want || (format.is_nan(got) && format.is_nan(want))
}

#[test]
fn fixture_is_well_formed_and_covers_both_formats() {
    let fx = load();
    assert!(fx.provenance.contains("onnx="), "{}", fx.provenance);
    assert!(fx.provenance.contains("ml_dtypes="), "{}", fx.provenance);
    for f in Fp8Format::ALL {
        assert_eq!(fx.tables.iter().filter(|(tf, _)| *tf == f).count(), 1);
        let unit = fx
            .sections
            .iter()
            .filter(|s| s.format == f && s.scale == 1.0)
            .count();
        let scaled = fx
            .sections
            .iter()
            .filter(|s| s.format == f && s.scale != 1.0)
            .count();
        assert_eq!(unit, 1, "{f}");
        assert!(scaled >= 4, "{f}: {scaled} scaled sections");
    }
    let total: usize = fx.sections.iter().map(|s| s.inputs.len()).sum();
    assert!(total > 30_000, "{total} inputs");
}

#[test]
fn decode_matches_ml_dtypes_for_all_256_codes() {
    let fx = load();
    for (format, want_bits) in &fx.tables {
        let table = decode_table(*format);
        for code in 0..=255u8 {
            let want = f32::from_bits(want_bits[code as usize]);
            let got = decode(*format, code);
            assert_eq!(got.to_bits(), table[code as usize].to_bits());
            if want.is_nan() {
                assert!(got.is_nan(), "{format} {code:#04x}: {got} is not NaN");
                assert!(format.is_nan(code));
            } else {
                // Bit equality also distinguishes -0.0 from +0.0.
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{format} {code:#04x}: got {got:e}, ml_dtypes {want:e}"
                );
                assert!(!format.is_nan(code));
            }
        }
    }
}

/// Checks every input of every section with `check(format, scale, x, saturate) -> code`.
fn check_sections(
    mut select: impl FnMut(&Section) -> bool,
    check: impl Fn(Fp8Format, f32, f32, bool) -> u8,
) -> usize {
    let fx = load();
    let mut checked = 0;
    let mut failures = Vec::new();
    for s in fx.sections.iter().filter(|s| select(s)) {
        for (i, &x) in s.inputs.iter().enumerate() {
            for (saturate, want) in [(true, s.saturating[i]), (false, s.non_saturating[i])] {
                let got = check(s.format, s.scale, x, saturate);
                checked += 1;
                if !same_code(s.format, got, want) {
                    failures.push(format!(
                        "{} scale={:e} saturate={saturate} x={x:e} ({:#010x}): got {got:#04x}, onnx {want:#04x}",
                        s.format,
                        s.scale,
                        x.to_bits()
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} mismatches, first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    checked
}

#[test]
fn encode_matches_onnx_quantize_linear_at_unit_scale() {
    let n = check_sections(
        |s| s.scale == 1.0,
        |f, _, x, saturate| encode(f, x, saturate),
    );
    assert!(n > 14_000, "{n}");
}

#[test]
fn encode_saturating_is_encode_with_saturate() {
    check_sections(
        |s| s.scale == 1.0,
        |f, _, x, saturate| {
            if saturate {
                encode_saturating(f, x)
            } else {
                encode(f, x, false)
            }
        },
    );
}

#[test]
fn quantize_matches_onnx_quantize_linear_at_non_unit_scales() {
    // saturate=1 through the public `quantize`; saturate=0 as encode(x / scale).
    let n = check_sections(
        |s| s.scale != 1.0,
        |f, scale, x, saturate| {
            if saturate {
                quantize(f, x, scale)
            } else {
                encode(f, x / scale, false)
            }
        },
    );
    assert!(n > 20_000, "{n}");
}

#[test]
fn quantize_slice_matches_onnx_quantize_linear() {
    let fx = load();
    for s in &fx.sections {
        let mut got = vec![0u8; s.inputs.len()];
        sd_fp8::quantize_slice(s.format, &s.inputs, s.scale, &mut got);
        for (i, (&g, &w)) in got.iter().zip(&s.saturating).enumerate() {
            assert!(
                same_code(s.format, g, w),
                "{} scale={:e} x={:e}: got {g:#04x}, onnx {w:#04x}",
                s.format,
                s.scale,
                s.inputs[i]
            );
        }
    }
}

#[test]
fn fixture_exercises_ties_overflow_and_underflow() {
    // Guard against a regenerated fixture silently losing its hard cases.
    let fx = load();
    for f in Fp8Format::ALL {
        let unit = fx
            .sections
            .iter()
            .find(|s| s.format == f && s.scale == 1.0)
            .unwrap();
        let has = |x: f32| unit.inputs.iter().any(|i| i.to_bits() == x.to_bits());
        let ulp_max = 2f32.powi(f.max_finite().log2().floor() as i32 - f.mantissa_bits() as i32);
        let cases = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f.min_subnormal() / 2.0,
            -f.min_subnormal() / 2.0,
            f.max_finite(),
            f.max_finite() + ulp_max / 2.0, // tie between max and the would-be next
            f.max_finite() + ulp_max,
            1.0 + 2f32.powi(-(f.mantissa_bits() as i32) - 1), // tie above 1.0
        ];
        for x in cases {
            assert!(has(x), "{f}: fixture lacks {x:e}");
        }
        assert!(unit.inputs.iter().any(|x| x.is_nan()));
    }
}
