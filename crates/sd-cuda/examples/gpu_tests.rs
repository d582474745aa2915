//! Per-op GPU test suite: every operation of the CUDA backend against the CPU backend
//! (FP32 vs FP32, BF16/FP8 vs the CPU's BF16 mode and exact FP8 simulation), FP8
//! quantization codes against sd-fp8, and whole tiny-model generations (image PSNR).
//!
//! `gpu_tests [MODEL_DIR] [OUT_DIR] [--ops-only]` (defaults: models/tiny-sd35m, $OUT or
//! .; `--ops-only` skips the tiny-model generations); with
//! `SD_GPU_TEST_CALIBRATION=CACHE.yaml` the FP8 image check of MODEL_DIR uses that
//! calibration cache's plan instead of a made-up one. Writes
//! `gpu_tests.txt` (the figures) to OUT_DIR; exits 1 when a bound fails.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use sd_checkpoint::Checkpoint;
use sd_cpu::{ComputePrecision, CpuBackend};
use sd_cuda::{ConvPath, CudaBackend, CudaPrecision, Fp8Gemm};
use sd_fp8::Fp8Format;
use sd_model::{
    Activation, ActivationQuant, AttentionParams, Backend, Conv2dParams, HostTensor, LinearQuant,
    LinearSpec, PrecisionPlan, WeightQuant, WeightSource, WeightTensor,
};
use sd_pipeline::{GenerateRequest, Sd3Pipeline};

#[path = "common/report.rs"]
mod report;
use report::Report;

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Deterministic pseudo-random numbers (xorshift64*), approximately normal.
struct Rng(u64);
impl Rng {
    fn next_u(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.next_u()).sum::<f32>() * 1.732 - 3.464
    }
    fn tensor(&mut self, shape: &[usize], scale: f32) -> HostTensor {
        HostTensor::from_fn(shape.to_vec(), |_| self.normal() * scale)
    }
}

/// (max |a - b|, max |a - b| / max |b|)
fn errs(a: &HostTensor, b: &HostTensor) -> (f32, f32) {
    assert_eq!(a.shape, b.shape);
    let scale = b.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let d = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (d, d / scale)
}

fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (1.0 / mse.max(1e-20)).log10()
}

fn fp8_quant(w: &HostTensor, act: Fp8Format, act_scale: f32) -> LinearQuant {
    let inp = w.shape[1];
    let scales = w
        .data
        .chunks(inp)
        .map(|r| {
            let m = r.iter().fold(0f32, |m, v| m.max(v.abs()));
            if m > 0.0 { m / 448.0 } else { 1.0 }
        })
        .collect();
    LinearQuant::Fp8 {
        weight: WeightQuant {
            format: Fp8Format::E4M3,
            scales,
        },
        input: ActivationQuant {
            format: act,
            scale: act_scale,
        },
    }
}

fn amax(t: &HostTensor) -> f32 {
    t.data.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Runs the same operations on one backend; returns (name, result) pairs.
fn suite<B: Backend>(b: &B, fp8: bool) -> R<Vec<(String, HostTensor)>> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out: Vec<(String, HostTensor)> = Vec::new();
    let up = |t: &HostTensor| b.upload(t);

    // Linear layers: small odd, and a realistic SD3.5-medium shape.
    for (name, rows, inp, outf) in [
        ("small", 37usize, 64usize, 48usize),
        ("sd35m qkv", 1024, 1536, 1536),
    ] {
        let x = rng.tensor(&[1, rows, inp], 1.0);
        let w = rng.tensor(&[outf, inp], 0.05);
        let bias = rng.tensor(&[outf], 0.1);
        let xt = up(&x)?;
        let wt = WeightTensor::from_host("w", &w);
        let bt = WeightTensor::from_host("b", &bias);
        let mut specs = vec![(
            format!("linear {name} [{rows}x{inp}]x[{outf}]"),
            LinearQuant::None,
        )];
        if fp8 {
            specs.push((
                format!("linear fp8 e4m3xe4m3 {name}"),
                fp8_quant(&w, Fp8Format::E4M3, amax(&x) / 448.0),
            ));
            specs.push((
                format!("linear fp8 e4m3(w)xe5m2(x) {name}"),
                fp8_quant(&w, Fp8Format::E5M2, amax(&x) / 57344.0 * 64.0),
            ));
        }
        for (label, quant) in specs {
            let spec = LinearSpec {
                name: label.clone(),
                in_features: inp,
                out_features: outf,
                quant,
            };
            let l = b.load_linear(&spec, &wt, Some(&bt))?;
            out.push((label, b.download(&b.linear(&xt, &l)?)?));
        }
    }

    // Weight-only FP8 (W8A16, adaLN's default): per-channel E4M3 weights, BF16 input.
    // 2 and 5 rows run the GEMV (5: a partial group of 4 rows), 40 the dequantize + BF16
    // GEMM path; 1000 outputs leave a partial block of warps; 2,576 inputs take the GEMV
    // through more than one round of 4 preloaded warp steps, the last one partial.
    for (inp, outf) in [(256usize, 1000usize), (2576, 72)] {
        if !fp8 {
            break;
        }
        let w = rng.tensor(&[outf, inp], 0.05);
        let scales: Vec<f32> = w
            .data
            .chunks(inp)
            .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0)
            .collect();
        let bias = rng.tensor(&[outf], 0.1);
        let wt = WeightTensor::from_host("w", &w);
        let bt = WeightTensor::from_host("b", &bias);
        let spec = LinearSpec {
            name: "w8a16".into(),
            in_features: inp,
            out_features: outf,
            quant: LinearQuant::Fp8WeightOnly {
                weight: WeightQuant {
                    format: Fp8Format::E4M3,
                    scales,
                },
            },
        };
        let l = b.load_linear(&spec, &wt, Some(&bt))?;
        for rows in [2usize, 5, 40] {
            let x = up(&rng.tensor(&[rows, inp], 1.0))?;
            out.push((
                format!("linear fp8 weight-only (w8a16) {rows}x{inp}->{outf}"),
                b.download(&b.linear(&x, &l)?)?,
            ));
        }
    }

    // Norms + adaLN.
    let x = rng.tensor(&[2, 77, 320], 2.0);
    let xt = up(&x)?;
    let g = up(&rng.tensor(&[320], 1.0))?;
    let be = up(&rng.tensor(&[320], 0.5))?;
    let shift = up(&rng.tensor(&[2, 320], 0.5))?;
    let scale = up(&rng.tensor(&[2, 320], 0.5))?;
    let gate = up(&rng.tensor(&[2, 320], 0.5))?;
    let ln = b.layer_norm(&xt, None, None, 1e-6)?;
    let m = b.modulate(&ln, &shift, &scale)?;
    out.push(("layer_norm (no affine)".into(), b.download(&ln)?));
    out.push(("layer_norm + modulate".into(), b.download(&m)?));
    out.push((
        "layer_norm_modulate (fused)".into(),
        b.download(&b.layer_norm_modulate(&xt, &shift, &scale, 1e-6)?)?,
    ));
    out.push((
        "layer_norm affine".into(),
        b.download(&b.layer_norm(&xt, Some(&g), Some(&be), 1e-5)?)?,
    ));
    out.push((
        "rms_norm".into(),
        b.download(&b.rms_norm(&xt, Some(&g), 1e-6)?)?,
    ));
    out.push((
        "gated_add".into(),
        b.download(&b.gated_add(&xt, &gate, &m)?)?,
    ));
    let (res, normed) = b.gated_add_layer_norm_modulate(&xt, &gate, &m, &shift, &scale, 1e-6)?;
    out.push((
        "gated_add_layer_norm_modulate (fused): residual".into(),
        b.download(&res)?,
    ));
    out.push((
        "gated_add_layer_norm_modulate (fused): normalized".into(),
        b.download(&normed)?,
    ));
    let img = up(&rng.tensor(&[2, 64, 13, 11], 3.0))?;
    let gg = up(&rng.tensor(&[64], 1.0))?;
    let gb = up(&rng.tensor(&[64], 0.5))?;
    out.push((
        "group_norm 32 groups".into(),
        b.download(&b.group_norm(&img, 32, &gg, &gb, 1e-6)?)?,
    ));
    out.push((
        "group_norm_silu 32 groups (fused)".into(),
        b.download(&b.group_norm_silu(&img, 32, &gg, &gb, 1e-6)?)?,
    ));
    // Groups of 40960 values: the split (sum, variance, apply) kernels.
    let big = up(&rng.tensor(&[1, 64, 128, 160], 2.0))?;
    out.push((
        "group_norm 32 groups, split".into(),
        b.download(&b.group_norm(&big, 32, &gg, &gb, 1e-6)?)?,
    ));
    out.push((
        "group_norm_silu 32 groups, split (fused)".into(),
        b.download(&b.group_norm_silu(&big, 32, &gg, &gb, 1e-6)?)?,
    ));

    // Activations and elementwise.
    for act in [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
        Activation::Relu,
    ] {
        out.push((
            format!("activation {act:?}"),
            b.download(&b.activation(&xt, act)?)?,
        ));
    }
    let y = up(&rng.tensor(&[2, 77, 320], 1.0))?;
    let row = up(&rng.tensor(&[320], 1.0))?;
    let lead = up(&rng.tensor(&[1, 77, 320], 1.0))?;
    out.push(("add".into(), b.download(&b.add(&xt, &y)?)?));
    out.push(("add [C]".into(), b.download(&b.add(&xt, &row)?)?));
    out.push(("add [1,..]".into(), b.download(&b.add(&xt, &lead)?)?));
    out.push(("mul".into(), b.download(&b.mul(&xt, &y)?)?));
    out.push((
        "scale_shift".into(),
        b.download(&b.scale_shift(&xt, 0.7, -0.2)?)?,
    ));
    out.push(("guidance".into(), b.download(&b.guidance(&xt, &y, 5.0)?)?));
    out.push((
        "euler_step".into(),
        b.download(&b.euler_step(&xt, &y, -0.05)?)?,
    ));

    // Layout.
    out.push(("concat dim1".into(), b.download(&b.concat(&[&xt, &y], 1)?)?));
    out.push((
        "concat dim2".into(),
        b.download(&b.concat(&[&xt, &y, &xt], 2)?)?,
    ));
    out.push(("narrow".into(), b.download(&b.narrow(&xt, 1, 5, 33)?)?));
    // MMDiT's positional window: odd margins on both axes (centre rounded down).
    let table = up(&rng.tensor(&[13, 13, 24], 1.0))?;
    let like = up(&rng.tensor(&[1, 2, 8, 12], 1.0))?;
    out.push((
        "cropped_pos_embed 13x13 table, 4x6 patches".into(),
        b.download(&b.cropped_pos_embed(&table, &like, 2)?)?,
    ));
    // adaLN's modulation cut (one launch on the GPU; more than 16 parts: one copy each).
    for n in [5, 20] {
        for (i, part) in b.chunks(&xt, n)?.iter().enumerate() {
            out.push((format!("chunks {i}/{n}"), b.download(part)?));
        }
    }
    let r4 = b.reshape(&xt, &[2, 77, 5, 64])?;
    out.push((
        "permute 0213".into(),
        b.download(&b.permute(&r4, &[0, 2, 1, 3])?)?,
    ));
    out.push((
        "permute 3102".into(),
        b.download(&b.permute(&r4, &[3, 1, 0, 2])?)?,
    ));
    out.push(("pad_last".into(), b.download(&b.pad_last(&xt, 333)?)?));
    out.push((
        "upsample2x".into(),
        b.download(&b.upsample_nearest2x(&img)?)?,
    ));
    let table = up(&rng.tensor(&[1000, 96], 1.0))?;
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 137 % 1000) as u32).collect();
    out.push((
        "embedding".into(),
        b.download(&b.embedding(&table, &ids, 2, 9)?)?,
    ));
    out.push((
        "select_tokens".into(),
        b.download(&b.select_tokens(&xt, &[3, 76])?)?,
    ));

    // Convolutions.
    let cx = up(&rng.tensor(&[2, 8, 17, 19], 1.0))?;
    for (label, cout, k, stride, pad) in [
        ("conv 3x3 s1 p1", 16usize, 3usize, 1usize, 1usize),
        ("conv 3x3 s2 p0", 12, 3, 2, 0),
        ("conv 1x1", 24, 1, 1, 0),
    ] {
        let w = up(&rng.tensor(&[cout, 8, k, k], 0.2))?;
        let bias = up(&rng.tensor(&[cout], 0.1))?;
        let p = Conv2dParams {
            stride,
            padding: pad,
        };
        out.push((
            label.into(),
            b.download(&b.conv2d(&cx, &w, Some(&bias), p)?)?,
        ));
    }
    // A VAE stage's shape (128 channels, 3x3, padding 1: tensor-core kernels on cuDNN),
    // with and without a bias (cuDNN's beta = 1 and beta = 0).
    let vx = up(&rng.tensor(&[1, 128, 48, 40], 1.0))?;
    let vw = up(&rng.tensor(&[128, 128, 3, 3], 0.03))?;
    let vb = up(&rng.tensor(&[128], 0.1))?;
    let same = Conv2dParams {
        stride: 1,
        padding: 1,
    };
    out.push((
        "conv 3x3 128->128 48x40 (VAE-like)".into(),
        b.download(&b.conv2d(&vx, &vw, Some(&vb), same)?)?,
    ));
    out.push((
        "conv 3x3 128->128 48x40, no bias".into(),
        b.download(&b.conv2d(&vx, &vw, None, same)?)?,
    ));

    // A VAE stage end to end, as the decoder runs it: filters loaded as parameters (the
    // CUDA backend stores them channels-last), then every operation the decoder applies
    // between its convolutions (channels-last in place on the CUDA backend): group norm
    // + SiLU, the residual add, nearest upsampling, plain group norm, one-pixel patches
    // through a linear layer and back, SiLU, scaling; a last convolution to 3 channels.
    // (Each download converts a channels-last result back to NCHW.)
    let param = |name: &str, t: &HostTensor| b.load_param(&WeightTensor::from_host(name, t));
    let w1 = param("stage.conv1.weight", &rng.tensor(&[64, 32, 3, 3], 0.06))?;
    let b1 = param("stage.conv1.bias", &rng.tensor(&[64], 0.1))?;
    let w2 = param("stage.conv2.weight", &rng.tensor(&[64, 64, 3, 3], 0.04))?;
    let b2 = param("stage.conv2.bias", &rng.tensor(&[64], 0.1))?;
    let w3 = param("stage.conv_out.weight", &rng.tensor(&[3, 64, 3, 3], 0.04))?;
    let b3 = param("stage.conv_out.bias", &rng.tensor(&[3], 0.1))?;
    let gn_g = param("stage.norm.weight", &rng.tensor(&[64], 1.0))?;
    let gn_b = param("stage.norm.bias", &rng.tensor(&[64], 0.5))?;
    let tok_w = rng.tensor(&[64, 64], 0.1);
    let tok_b = rng.tensor(&[64], 0.1);
    let tok = b.load_linear(
        &LinearSpec {
            name: "stage.attn.to_out".into(),
            in_features: 64,
            out_features: 64,
            quant: LinearQuant::None,
        },
        &WeightTensor::from_host("w", &tok_w),
        Some(&WeightTensor::from_host("b", &tok_b)),
    )?;
    let sx = up(&rng.tensor(&[1, 32, 12, 10], 1.0))?;
    let h1 = b.conv2d(&sx, &w1, Some(&b1), same)?;
    let h = b.group_norm_silu(&h1, 32, &gn_g, &gn_b, 1e-6)?;
    let h = b.conv2d_add(&h, &w2, Some(&b2), same, &h1)?;
    let h = b.upsample_nearest2x(&h)?;
    out.push((
        "VAE stage: conv, gn+silu, conv + residual, upsample".into(),
        b.download(&h)?,
    ));
    // The residual add without a bias, and with a residual uploaded as NCHW.
    let r = up(&rng.tensor(&[1, 64, 12, 10], 1.0))?;
    out.push((
        "conv2d_add, no bias".into(),
        b.download(&b.conv2d_add(&h1, &w2, None, same, &h1)?)?,
    ));
    out.push((
        "conv2d_add, NCHW residual".into(),
        b.download(&b.conv2d_add(&h1, &w2, Some(&b2), same, &r)?)?,
    ));
    let n = b.group_norm(&h, 32, &gn_g, &gn_b, 1e-6)?;
    let t = b.linear(&b.patchify(&n, 1)?, &tok)?;
    let h = b.add(&h, &b.unpatchify(&t, 1, &h)?)?;
    out.push((
        "VAE stage: + gn, pixel tokens, linear, back, add".into(),
        b.download(&h)?,
    ));
    let h = b.scale_shift(&b.activation(&h, Activation::Silu)?, 0.5, 0.1)?;
    let h = b.conv2d(&h, &w3, Some(&b3), same)?;
    out.push((
        "VAE stage: silu, scale_shift, conv to 3".into(),
        b.download(&h)?,
    ));
    // Two channels-last tensors multiplied (not a conv output by itself: that squares
    // the convolution's BF16 rounding against the CPU's, past the bound).
    let c15 = b.scale_shift(&h1, 0.0, 1.5)?;
    out.push((
        "mul of a conv output".into(),
        b.download(&b.mul(&h1, &c15)?)?,
    ));
    // Wide channels (512: 64 threads a pixel in the group norm kernels), reshaped after.
    let wide = b.conv2d(
        &up(&rng.tensor(&[2, 16, 9, 7], 1.0))?,
        &param("wide.weight", &rng.tensor(&[512, 16, 3, 3], 0.1))?,
        None,
        same,
    )?;
    // A larger image (20480 pixels: the channels-last group norm's statistics split
    // over 10 blocks) after a convolution.
    let big_conv = b.conv2d(
        &up(&rng.tensor(&[1, 16, 128, 160], 1.0))?,
        &param("big.weight", &rng.tensor(&[64, 16, 3, 3], 0.1))?,
        None,
        same,
    )?;
    out.push((
        "group_norm_silu after a conv, 128x160".into(),
        b.download(&b.group_norm_silu(&big_conv, 32, &gn_g, &gn_b, 1e-6)?)?,
    ));
    let wg = up(&rng.tensor(&[512], 1.0))?;
    let wb = up(&rng.tensor(&[512], 0.5))?;
    let wn = b.group_norm_silu(&wide, 32, &wg, &wb, 1e-6)?;
    out.push((
        "group_norm_silu 512 channels after a conv".into(),
        b.download(&wn)?,
    ));
    out.push((
        "reshape of a conv output".into(),
        b.download(&b.reshape(&wn, &[2, 512, 63])?)?,
    ));

    // Attention: small odd sizes, causal (CLIP), bias (T5), joint 4096 + 333 at head dim 64,
    // single-head VAE style.
    let att = |bs: usize,
               sq: usize,
               sk: usize,
               heads: usize,
               d: usize,
               causal: bool,
               bias: bool,
               rng: &mut Rng|
     -> R<HostTensor> {
        let q = up(&rng.tensor(&[bs, sq, heads * d], 1.0))?;
        let k = up(&rng.tensor(&[bs, sk, heads * d], 1.0))?;
        let v = up(&rng.tensor(&[bs, sk, heads * d], 1.0))?;
        let bt = if bias {
            Some(up(&rng.tensor(&[heads, sq, sk], 1.0))?)
        } else {
            None
        };
        let p = AttentionParams {
            heads,
            scale: 1.0 / (d as f32).sqrt(),
            causal,
            bias: bt.as_ref(),
        };
        Ok(b.download(&b.attention(&q, &k, &v, p)?)?)
    };
    out.push((
        "attention small 2x7x5 h3 d20".into(),
        att(2, 7, 5, 3, 20, false, false, &mut rng)?,
    ));
    out.push((
        "attention causal 2x77 h4 d64 (CLIP)".into(),
        att(2, 77, 77, 4, 64, true, false, &mut rng)?,
    ));
    out.push((
        "attention bias 1x13 h4 d64 (T5)".into(),
        att(1, 13, 13, 4, 64, false, true, &mut rng)?,
    ));
    // T5's length: the bias takes the batched-GEMM path (sk a multiple of 8), two
    // batch entries sharing the bias.
    out.push((
        "attention bias 2x256 h4 d64 (T5 length, GEMM path)".into(),
        att(2, 256, 256, 4, 64, false, true, &mut rng)?,
    ));
    out.push((
        "attention vae 1x64 h1 d96".into(),
        att(1, 64, 64, 1, 96, false, false, &mut rng)?,
    ));
    out.push((
        "attention joint 4096+333 h2 d64".into(),
        att(1, 4429, 4429, 2, 64, false, false, &mut rng)?,
    ));
    // MMDiT's joint attention with each stream in its own tensor (on Hopper the
    // two-segment flash kernel reads and writes them in place; elsewhere, and on the
    // CPU, concat + attention + narrow). Odd lengths: partial tiles in both segments.
    let (si, sc, heads) = (1000usize, 77usize, 3usize);
    let streams = |s: usize, rng: &mut Rng| -> R<[<B as Backend>::Tensor; 3]> {
        Ok([
            up(&rng.tensor(&[2, s, heads * 64], 1.0))?,
            up(&rng.tensor(&[2, s, heads * 64], 1.0))?,
            up(&rng.tensor(&[2, s, heads * 64], 1.0))?,
        ])
    };
    let img_qkv = streams(si, &mut rng)?;
    let ctx_qkv = streams(sc, &mut rng)?;
    let [qi, ki, vi] = &img_qkv;
    let [qc, kc, vc] = &ctx_qkv;
    let (oi, oc) = b.joint_attention(
        [qi, ki, vi],
        [qc, kc, vc],
        AttentionParams {
            heads,
            scale: 0.125,
            causal: false,
            bias: None,
        },
    )?;
    out.push((
        format!("joint attention 2x({si}+{sc}) h{heads} d64: image rows"),
        b.download(&oi)?,
    ));
    out.push((
        format!("joint attention 2x({si}+{sc}) h{heads} d64: context rows"),
        b.download(&oc)?,
    ));
    Ok(out)
}

fn compare(
    rep: &mut Report,
    tag: &str,
    cpu: &[(String, HostTensor)],
    gpu: &[(String, HostTensor)],
    tol: f32,
) {
    for ((name, c), (_, g)) in cpu.iter().zip(gpu) {
        let (abs, rel) = errs(g, c);
        let differ = g.data.iter().zip(&c.data).filter(|(a, b)| a != b).count();
        // FP8 linears: accumulation order differs, codes are identical; bound like BF16.
        rep.check(
            &format!("[{tag}] {name}"),
            rel <= tol && g.data.iter().all(|v| v.is_finite()),
            format!(
                "max abs err {abs:.3e}, max rel err {rel:.3e} (bound {tol:.0e}); {:.3}% of values differ",
                100.0 * differ as f64 / c.data.len().max(1) as f64
            ),
        );
    }
}

/// On the channels-last path the VAE's operations must keep their outputs channels-last
/// (else every one of them pays a transposing copy; the values are checked by the suite).
fn layouts_kept(rep: &mut Report, gc: &CudaBackend) -> R<()> {
    let mut rng = Rng(5);
    let same = Conv2dParams {
        stride: 1,
        padding: 1,
    };
    let x = gc.upload(&rng.tensor(&[1, 32, 20, 16], 1.0))?;
    let w = gc.load_param(&WeightTensor::from_host(
        "k.weight",
        &rng.tensor(&[64, 32, 3, 3], 0.05),
    ))?;
    let w2 = gc.load_param(&WeightTensor::from_host(
        "k2.weight",
        &rng.tensor(&[64, 64, 3, 3], 0.05),
    ))?;
    let g = gc.upload(&rng.tensor(&[64], 1.0))?;
    let b = gc.upload(&rng.tensor(&[64], 0.1))?;
    let y = gc.conv2d(&x, &w, Some(&b), same)?;
    let n = gc.group_norm_silu(&y, 32, &g, &b, 1e-6)?;
    let r = gc.conv2d_add(&n, &w2, Some(&b), same, &y)?;
    let a = gc.add(&y, &r)?;
    let u = gc.upsample_nearest2x(&a)?;
    let s = gc.scale_shift(&u, 0.5, 0.0)?;
    let t = gc.unpatchify(&gc.patchify(&s, 1)?, 1, &s)?;
    let kept = [
        ("filter", w.is_channels_last()),
        ("conv2d", y.is_channels_last()),
        ("group_norm_silu", n.is_channels_last()),
        ("conv2d_add", r.is_channels_last()),
        ("add", a.is_channels_last()),
        ("upsample", u.is_channels_last()),
        ("scale_shift", s.is_channels_last()),
        ("unpatchify", t.is_channels_last()),
    ];
    let lost: Vec<&str> = kept.iter().filter(|(_, k)| !k).map(|(n, _)| *n).collect();
    rep.check(
        "channels-last kept through the VAE's operations",
        lost.is_empty(),
        format!("outputs not channels-last: {lost:?}"),
    );
    Ok(())
}

/// The downloaded `outputs` of a norm, then the output of the linear layer `l` applied to
/// the last of them.
fn outputs_and_linear(
    gpu: &CudaBackend,
    l: &sd_cuda::CudaLinear,
    outputs: &[&sd_cuda::CudaTensor],
) -> R<Vec<Vec<f32>>> {
    let mut all = outputs
        .iter()
        .map(|t| Ok(gpu.download(t)?.data))
        .collect::<R<Vec<_>>>()?;
    if let Some(last) = outputs.last() {
        all.push(gpu.download(&gpu.linear(last, l)?)?.data);
    }
    Ok(all)
}

/// The two checks of a norm that writes its linear layer's FP8 codes: the codes were used
/// (no separate quantize pass) and every output equals the unfused operations' bit for bit.
fn codes_checks(
    rep: &mut Report,
    name: &str,
    plain: &[Vec<f32>],
    fused: &[Vec<f32>],
    requantized: &[String],
    what: &str,
) {
    rep.check(
        &format!("{name}: codes used"),
        requantized.is_empty(),
        format!("separate quantize passes after the fused norm: {requantized:?}"),
    );
    let same = plain == fused;
    rep.check(
        name,
        same,
        format!(
            "{what} outputs {}identical to the unfused ops",
            if same { "" } else { "NOT " }
        ),
    );
}

/// The separate FP8 quantize passes in the profile so far, after checking the FP8 GEMM
/// ran at all (a profile without one proves nothing).
fn quantize_passes(gpu: &CudaBackend) -> R<Vec<String>> {
    let ops: Vec<String> = gpu.profile()?.into_iter().map(|(op, _, _)| op).collect();
    if !ops.iter().any(|op| op.starts_with("linear fp8 ")) {
        return Err(format!("no FP8 GEMM in the profile: {ops:?}").into());
    }
    Ok(ops
        .into_iter()
        .filter(|op| op.starts_with("quantize fp8"))
        .collect())
}

/// The norms that write the next FP8 linear layer's input codes in their own pass
/// (`layer_norm_modulate_for`, `gated_add_layer_norm_modulate_for`) must change nothing:
/// the normalized output and the linear layer's output bit for bit equal to the norm,
/// then the linear quantizing its input itself. E4M3 and E5M2 inputs, 1536 channels (the
/// one-warp-per-row kernels), two batch entries with their own modulation.
fn fused_input_codes(rep: &mut Report, gpu: &CudaBackend) -> R<()> {
    let mut rng = Rng(7);
    let (rows, c) = (300usize, 1536usize);
    let up = |t: &HostTensor| gpu.upload(t);
    let x = up(&rng.tensor(&[2, rows, c], 2.0))?;
    let y = up(&rng.tensor(&[2, rows, c], 1.0))?;
    let gate = up(&rng.tensor(&[2, c], 0.5))?;
    let shift = up(&rng.tensor(&[2, c], 0.3))?;
    let scale = up(&rng.tensor(&[2, c], 0.3))?;
    let w = rng.tensor(&[256, c], 0.05);
    for (act, act_scale) in [
        (Fp8Format::E4M3, 6.0 / 448.0),
        (Fp8Format::E5M2, 6.0 / 57344.0 * 64.0),
    ] {
        let spec = LinearSpec {
            name: format!("fused codes {}", act.name()),
            in_features: c,
            out_features: 256,
            quant: fp8_quant(&w, act, act_scale),
        };
        let l = gpu.load_linear(&spec, &WeightTensor::from_host("w", &w), None)?;
        let plain = gpu.layer_norm_modulate(&x, &shift, &scale, 1e-6)?;
        let plain = outputs_and_linear(gpu, &l, &[&plain])?;
        // Profiled: the linear after the fused norm must not quantize its input again.
        gpu.set_profiling(true)?;
        let fused = gpu.layer_norm_modulate_for(&x, &shift, &scale, 1e-6, &l)?;
        let fused = outputs_and_linear(gpu, &l, &[&fused])?;
        let requantized = quantize_passes(gpu)?;
        gpu.set_profiling(false)?;
        let name = format!("layer_norm_modulate_for an FP8 {} linear", act.name());
        codes_checks(rep, &name, &plain, &fused, &requantized, "norm and linear");

        let (pr, pn) = gpu.gated_add_layer_norm_modulate(&x, &gate, &y, &shift, &scale, 1e-6)?;
        let plain = outputs_and_linear(gpu, &l, &[&pr, &pn])?;
        gpu.set_profiling(true)?;
        let (fr, fnorm) =
            gpu.gated_add_layer_norm_modulate_for(&x, &gate, &y, &shift, &scale, 1e-6, &l)?;
        let fused = outputs_and_linear(gpu, &l, &[&fr, &fnorm])?;
        let requantized = quantize_passes(gpu)?;
        gpu.set_profiling(false)?;
        let name = format!(
            "gated_add_layer_norm_modulate_for an FP8 {} linear",
            act.name()
        );
        codes_checks(
            rep,
            &name,
            &plain,
            &fused,
            &requantized,
            "residual, norm and linear",
        );
    }
    Ok(())
}

fn quantize_codes(rep: &mut Report, gpu: &CudaBackend) -> R<()> {
    let mut rng = Rng(42);
    let mut vals: Vec<f32> = (0..100_000).map(|_| rng.normal() * 50.0).collect();
    vals.extend([
        0.0,
        -0.0,
        1e-9,
        -1e-9,
        1e-3,
        447.9,
        448.0,
        464.0,
        480.0,
        1e6,
        -1e6,
        57344.0,
        61440.0,
        1e30,
        -1e30,
        0.0019531,
        0.00097656,
        1.5e-5,
        2.0f32.powi(-16),
        2.0f32.powi(-17),
    ]);
    // Every representable ratio's midpoint neighbourhood via a sweep.
    for i in 0..20_000 {
        vals.push((i as f32 - 10_000.0) * 0.0371);
    }
    let x = gpu.upload(&HostTensor::new(vec![vals.len()], vals.clone())?)?;
    // upload rounds to BF16 in BF16/FP8 precision: quantize what the GPU holds.
    let held = gpu.download(&x)?.data;
    for fmt in Fp8Format::ALL {
        for scale in [1.0f32, 0.37, 0.013] {
            let codes = gpu.quantize_fp8(&x, fmt, scale)?;
            let mut want = vec![0u8; held.len()];
            sd_fp8::quantize_slice(fmt, &held, scale, &mut want);
            let bad = codes.iter().zip(&want).filter(|(a, b)| a != b).count();
            rep.check(
                &format!("fp8 quantize codes {} scale {scale}", fmt.name()),
                bad == 0,
                format!("{bad} of {} codes differ from sd-fp8", held.len()),
            );
        }
    }
    Ok(())
}

/// An FP8 plan for the tiny transformer: every linear of the joint blocks, E4M3 weights
/// with per-channel scales (channel amax / 448); activation scales: E4M3 amax 16, the MLP
/// down projections' inputs (after GELU) E5M2.
fn tiny_plan(ckpt: &Checkpoint) -> R<PrecisionPlan> {
    let w = ckpt.weights(sd_checkpoint::component::TRANSFORMER)?;
    let mut plan = PrecisionPlan::default();
    for name in w.names() {
        let Some(prefix) = name.strip_suffix(".weight") else {
            continue;
        };
        if !prefix.starts_with("transformer_blocks.") {
            continue;
        }
        let t = w.get(&name)?;
        if t.shape.len() != 2 {
            continue;
        }
        let host = t.to_host();
        let (fmt, scale) = if prefix.ends_with("ff.net.2") || prefix.ends_with("ff_context.net.2") {
            (Fp8Format::E5M2, 8.0 / 57344.0)
        } else {
            (Fp8Format::E4M3, 16.0 / 448.0)
        };
        plan.layers
            .insert(prefix.to_string(), fp8_quant(&host, fmt, scale));
    }
    Ok(plan)
}

/// The tiny-model generation every image check runs (256x256, 4 steps, seed 7).
fn tiny_request(guidance: f32) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red circle on the left, a small blue square, green background".into(),
        width: 256,
        height: 256,
        steps: 4,
        guidance_scale: guidance,
        max_sequence_length: 64,
        seed: 7,
        ..Default::default()
    }
}

fn generate<B: Backend>(ckpt: &Checkpoint, b: B, plan: &PrecisionPlan) -> R<(Vec<f32>, f64)> {
    generate_g(ckpt, b, plan, 5.0)
}

fn generate_g<B: Backend>(
    ckpt: &Checkpoint,
    b: B,
    plan: &PrecisionPlan,
    guidance: f32,
) -> R<(Vec<f32>, f64)> {
    let p = Sd3Pipeline::load(ckpt, b, plan)?;
    let t = Instant::now();
    let g = p.generate(tiny_request(guidance), &mut |_, _| {})?;
    Ok((g.image.float, t.elapsed().as_secs_f64()))
}

fn pipelines(rep: &mut Report, model: &PathBuf, fp8_ok: bool) -> R<()> {
    let ckpt = Checkpoint::open(model)?;
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let none = PrecisionPlan::full_precision();
    let (cpu_img, cpu_s) = generate(&ckpt, CpuBackend::new(ComputePrecision::Bf16), &none)?;
    let (gpu_img, gpu_s) = generate(&ckpt, CudaBackend::new(0, CudaPrecision::Bf16)?, &none)?;
    let db = psnr(&gpu_img, &cpu_img);
    rep.check(
        &format!("pipeline {name} cuda bf16 vs cpu bf16"),
        db >= 35.0,
        format!("PSNR {db:.2} dB (bound 35; cpu {cpu_s:.2}s, cuda {gpu_s:.2}s)"),
    );
    if fp8_ok {
        // A real calibration cache (SD_GPU_TEST_CALIBRATION) for the model it was made
        // for; a made-up plan otherwise.
        let cache = match std::env::var_os("SD_GPU_TEST_CALIBRATION") {
            Some(path) => Some(sd_calibrate::CalibrationCache::load(&path)?),
            None => None,
        };
        let fingerprint = sd_checkpoint::fingerprint::ModelFingerprint::compute(&ckpt)?;
        let plan = match cache {
            Some(c) if c.check_model(&fingerprint).is_ok() => c.plan(),
            _ => tiny_plan(&ckpt)?,
        };
        let (cpu8, _) = generate(&ckpt, CpuBackend::new(ComputePrecision::Bf16), &plan)?;
        let (gpu8, gpu8_s) = generate(&ckpt, CudaBackend::new(0, CudaPrecision::Fp8)?, &plan)?;
        let db8 = psnr(&gpu8, &cpu8);
        let (gx, gx_s) = generate(
            &ckpt,
            CudaBackend::new(0, CudaPrecision::Fp8)?.with_fp8_gemm(Fp8Gemm::ExactViaBf16),
            &plan,
        )?;
        let dbx = psnr(&gx, &cpu8);
        rep.check(
            &format!(
                "pipeline {name} cuda fp8 (exact via bf16 tensor cores) vs cpu fp8 simulation"
            ),
            dbx >= 35.0,
            format!("PSNR {dbx:.2} dB (bound 35; cuda {gx_s:.2}s)"),
        );
        rep.line(format!(
            "info: {name}: cuda fp8 native vs cuda fp8 exact: PSNR {:.2} dB",
            psnr(&gpu8, &gx)
        ));
        let (cpu8f, _) = generate(&ckpt, CpuBackend::new(ComputePrecision::F32), &plan)?;
        rep.line(format!(
            "info: {name}: sensitivity of the tiny model: cpu fp8 sim with BF16 vs FP32 elsewhere: PSNR {:.2} dB",
            psnr(&cpu8, &cpu8f)
        ));
        // FP8 layers with FP32 everywhere else: far fewer rounding flips upstream.
        for mode in [
            Fp8Gemm::Native,
            Fp8Gemm::NativeFastAccum,
            Fp8Gemm::ExactViaBf16,
        ] {
            let (g, _) = generate(
                &ckpt,
                CudaBackend::new(0, CudaPrecision::F32)?.with_fp8_gemm(mode),
                &plan,
            )?;
            rep.line(format!(
                "info: {name}: fp8 layers + fp32 elsewhere, cuda ({mode:?}) vs cpu simulation: PSNR {:.2} dB",
                psnr(&g, &cpu8f)
            ));
        }
        // Without classifier-free guidance (no 5x amplification of cond - uncond).
        let (c1, _) = generate_g(&ckpt, CpuBackend::new(ComputePrecision::Bf16), &plan, 1.0)?;
        for mode in [
            Fp8Gemm::Native,
            Fp8Gemm::NativeFastAccum,
            Fp8Gemm::ExactViaBf16,
        ] {
            let (g, _) = generate_g(
                &ckpt,
                CudaBackend::new(0, CudaPrecision::Fp8)?.with_fp8_gemm(mode),
                &plan,
                1.0,
            )?;
            rep.line(format!(
                "info: {name}: guidance 1.0, cuda fp8 ({mode:?}) vs cpu fp8 simulation: PSNR {:.2} dB",
                psnr(&g, &c1)
            ));
        }
        let (cb1, _) = generate_g(&ckpt, CpuBackend::new(ComputePrecision::Bf16), &none, 1.0)?;
        let (gb1, _) = generate_g(&ckpt, CudaBackend::new(0, CudaPrecision::Bf16)?, &none, 1.0)?;
        rep.line(format!(
            "info: {name}: guidance 1.0, cuda bf16 vs cpu bf16: PSNR {:.2} dB",
            psnr(&gb1, &cb1)
        ));
        rep.check(
            &format!(
                "pipeline {name} cuda fp8 vs cpu fp8 simulation ({} FP8 layers)",
                plan.fp8_layer_count()
            ),
            db8 >= 35.0,
            format!("PSNR {db8:.2} dB (bound 35; cuda {gpu8_s:.2}s)"),
        );
        graph_pipeline(rep, &ckpt, &plan, &name)?;
        let vs_bf16 = psnr(&gpu8, &cpu_img);
        rep.line(format!(
            "info: {name}: cuda fp8 image vs cpu bf16 image: PSNR {vs_bf16:.2} dB"
        ));
    }
    Ok(())
}

/// CUDA graphs of `Backend::replayable` on a small forward (an FP8 linear, SiLU, a BF16
/// linear): replays must equal eager runs bit for bit, for new input values and a
/// second shape; a forward that reads back to the host must fail to record and run
/// eagerly instead, with the same results.
fn graph_checks(rep: &mut Report, g: &CudaBackend, fp8: bool) -> R<()> {
    let mut rng = Rng(23);
    let w1 = rng.tensor(&[256, 128], 0.05);
    let w2 = rng.tensor(&[128, 256], 0.05);
    let q1 = if fp8 {
        fp8_quant(&w1, Fp8Format::E4M3, 4.0 / 448.0)
    } else {
        LinearQuant::None
    };
    let spec = |name: &str, i, o, quant| LinearSpec {
        name: name.into(),
        in_features: i,
        out_features: o,
        quant,
    };
    let l1 = g.load_linear(
        &spec("g1", 128, 256, q1),
        &WeightTensor::from_host("w1", &w1),
        None,
    )?;
    let l2 = g.load_linear(
        &spec("g2", 256, 128, LinearQuant::None),
        &WeightTensor::from_host("w2", &w2),
        None,
    )?;
    let forward = |x: &[&sd_cuda::CudaTensor]| -> sd_model::Result<sd_cuda::CudaTensor> {
        let h = g.linear(x[0], &l1)?;
        let h = g.activation(&h, Activation::Silu)?;
        let y = g.linear(&h, &l2)?;
        g.add(&y, x[1])
    };
    let reading_back = |x: &[&sd_cuda::CudaTensor]| -> sd_model::Result<sd_cuda::CudaTensor> {
        let y = forward(x)?;
        let host = g.download(&y)?;
        g.upload(&host)
    };
    let shapes: [&[usize]; 2] = [&[2, 64, 128], &[1, 48, 128]];
    let calls: Vec<(HostTensor, HostTensor)> = [0, 0, 0, 1, 1, 1, 0]
        .iter()
        .map(|&s| {
            let x = rng.tensor(shapes[s], 1.0);
            let mut rshape = shapes[s].to_vec();
            rshape[2] = 128;
            (x, rng.tensor(&rshape, 1.0))
        })
        .collect();
    let run = |f: &dyn Fn(&[&sd_cuda::CudaTensor]) -> sd_model::Result<sd_cuda::CudaTensor>,
               name: &str|
     -> R<Vec<HostTensor>> {
        calls
            .iter()
            .map(|(x, r)| {
                let (x, r) = (g.upload(x)?, g.upload(r)?);
                Ok(g.download(&g.replayable(name, &[&x, &r], f)?)?)
            })
            .collect()
    };
    g.set_cuda_graphs(false)?;
    let eager = run(&forward, "eager")?;
    g.set_cuda_graphs(true)?;
    let graphed = run(&forward, "graph check")?;
    let stats = g.graph_stats()?;
    let same = eager.iter().zip(&graphed).all(|(a, b)| a.data == b.data);
    rep.check(
        "cuda graphs: replays equal eager runs",
        same && stats.ready == 2 && stats.captures == 2 && stats.replays == 5 && stats.failed == 0,
        format!(
            "{} calls over 2 shapes, outputs {}identical; {stats:?} (expected 2 ready, 2 captures, 5 replays)",
            calls.len(),
            if same { "" } else { "NOT " }
        ),
    );
    let fallback = run(&reading_back, "reads back")?;
    let after = g.graph_stats()?;
    let same = eager.iter().zip(&fallback).all(|(a, b)| a.data == b.data);
    rep.check(
        "cuda graphs: a forward that reads back runs eagerly",
        same && after.failed == 2 && after.replays == stats.replays,
        format!(
            "outputs {}identical to eager; {after:?} (expected 2 failed, no new replays)",
            if same { "" } else { "NOT " }
        ),
    );
    // A tensor from before the recording, dropped on another thread in the middle of it:
    // its free must wait for the recording to end (inside it, the capture would break).
    let victim = std::sync::Mutex::new(Some(g.upload(&rng.tensor(&[4096], 1.0))?));
    let invocations = std::sync::atomic::AtomicUsize::new(0);
    let dropping = |x: &[&sd_cuda::CudaTensor]| -> sd_model::Result<sd_cuda::CudaTensor> {
        let y = forward(x)?;
        // The second call is the recording.
        if invocations.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            std::thread::scope(|s| {
                s.spawn(|| {
                    if let Ok(mut v) = victim.lock() {
                        drop(v.take());
                    }
                });
            });
        }
        Ok(y)
    };
    let before = g.graph_stats()?;
    let mut same = true;
    for (i, (x, r)) in calls.iter().take(3).enumerate() {
        let (x, r) = (g.upload(x)?, g.upload(r)?);
        let y = g.download(&g.replayable("drop check", &[&x, &r], &dropping)?)?;
        same &= y.data == eager[i].data;
    }
    let after_drop = g.graph_stats()?;
    let dropped = victim.lock().map(|v| v.is_none()).unwrap_or(false);
    let deferred = after_drop.deferred_frees - before.deferred_frees;
    rep.check(
        "cuda graphs: a tensor dropped on another thread while recording",
        same && dropped
            && deferred == 1
            && after_drop.failed == before.failed
            && after_drop.ready == before.ready + 1,
        format!(
            "outputs {}identical to eager; dropped: {dropped}, freed after the recording: {deferred}; {before:?} -> {after_drop:?} (expected one more ready, no new failure, 1 deferred free)",
            if same { "" } else { "NOT " }
        ),
    );
    let mem = g.memory_stats()?;
    rep.line(format!(
        "info: cuda graphs: graph memory peak {} B, reserved {} B",
        mem.graph_peak_used, mem.graph_reserved
    ));
    g.set_cuda_graphs(false)?;
    Ok(())
}

/// A tiny-model generation with the transformer step replayed from CUDA graphs equals
/// the eager generation bit for bit (same backend, same plan).
fn graph_pipeline(rep: &mut Report, ckpt: &Checkpoint, plan: &PrecisionPlan, name: &str) -> R<()> {
    let p = Sd3Pipeline::load(ckpt, CudaBackend::new(0, CudaPrecision::Fp8)?, plan)?;
    let request = || tiny_request(5.0);
    p.backend.set_cuda_graphs(false)?;
    let eager = p.generate(request(), &mut |_, _| {})?;
    p.backend.set_cuda_graphs(true)?;
    let first = p.generate(request(), &mut |_, _| {})?;
    let second = p.generate(request(), &mut |_, _| {})?;
    let stats = p.backend.graph_stats()?;
    let same =
        eager.latents.data == first.latents.data && eager.latents.data == second.latents.data;
    rep.check(
        &format!("pipeline {name} cuda fp8 with the step as a CUDA graph vs eager"),
        same && stats.failed == 0 && stats.captures == 1 && stats.replays == 7,
        format!(
            "final latents {}identical over 2 generations of 4 steps; {stats:?} (expected 1 capture, 7 replays: step 1 eager, step 2 recorded and replayed, then replays)",
            if same { "" } else { "NOT " }
        ),
    );
    Ok(())
}

/// GEMM throughput at SD3.5-medium shapes (batch 2 x 4,429 tokens), for information:
/// descriptors and heuristics are rebuilt on every call here.
fn bench(rep: &mut Report, g: &CudaBackend) -> R<()> {
    let mut rng = Rng(5);
    let rows = 2 * 4429;
    for (inp, outf) in [(1536usize, 1536usize), (1536, 6144), (6144, 1536)] {
        let x = g.upload(&rng.tensor(&[2, 4429, inp], 1.0))?;
        let w = rng.tensor(&[outf, inp], 0.05);
        let wt = WeightTensor::from_host("w", &w);
        for (label, quant) in [
            ("bf16", LinearQuant::None),
            ("fp8 e4m3", fp8_quant(&w, Fp8Format::E4M3, 4.0 / 448.0)),
        ] {
            let spec = LinearSpec {
                name: label.into(),
                in_features: inp,
                out_features: outf,
                quant,
            };
            let l = g.load_linear(&spec, &wt, None)?;
            for _ in 0..3 {
                g.linear(&x, &l)?;
            }
            g.synchronize()?;
            let n = 20;
            let t = Instant::now();
            for _ in 0..n {
                g.linear(&x, &l)?;
            }
            g.synchronize()?;
            let s = t.elapsed().as_secs_f64() / n as f64;
            let tflops = 2.0 * (rows * inp * outf) as f64 / s / 1e12;
            rep.line(format!(
                "bench linear {label} [{rows}x{inp}]x[{outf}]: {:.3} ms/call incl. input cast + epilogue, {tflops:.0} TFLOP/s",
                s * 1e3
            ));
        }
    }
    Ok(())
}

fn run(rep: &mut Report, model: &PathBuf, ops_only: bool) -> R<()> {
    let g32 = CudaBackend::new(0, CudaPrecision::F32)?;
    rep.line(format!(
        "device: {} (compute capability {}.{}), kernel build id {}",
        g32.gpu_name(),
        g32.compute_capability().0,
        g32.compute_capability().1,
        g32.kernel_build_id()
    ));
    let (gl, fp8_ok) = match CudaBackend::new(0, CudaPrecision::Fp8) {
        Ok(b) => (b, true),
        Err(e) => {
            rep.line(format!("FP8 unavailable ({e}); BF16 only"));
            (CudaBackend::new(0, CudaPrecision::Bf16)?, false)
        }
    };
    let t = Instant::now();
    let cpu32 = suite(&CpuBackend::new(ComputePrecision::F32), false)?;
    let gpu32 = suite(&g32, false)?;
    compare(rep, "f32", &cpu32, &gpu32, 2e-5);
    let cpu16 = suite(&CpuBackend::new(ComputePrecision::Bf16), fp8_ok)?;
    let gpu16 = suite(&gl, fp8_ok)?;
    compare(rep, "bf16", &cpu16, &gpu16, 1e-2);
    // Under SD_CUDA_CONV=nhwc (the bench's tests-nhwc stage) cuDNN must be there.
    let nhwc_asked = std::env::var("SD_CUDA_CONV").as_deref() == Ok("nhwc");
    let conv = gl.conv_stats()?;
    if conv.cudnn_version.is_some() && conv.unavailable.is_none() {
        rep.check(
            "bf16 convolutions on cuDNN",
            conv.on_im2col().is_empty(),
            format!("{conv}: {}", conv.cudnn_problems.join("; ")),
        );
    } else if nhwc_asked {
        rep.check(
            "bf16 convolutions on cuDNN (SD_CUDA_CONV=nhwc)",
            false,
            conv.to_string(),
        );
    } else {
        rep.line(format!("info: bf16 convolutions: {conv}"));
    }
    // The channels-last convolution path (`SD_CUDA_CONV=nhwc`): the whole suite again,
    // convolutions and the VAE stage on NHWC tensors, against the same CPU results.
    let gc = CudaBackend::new(0, gl.precision())?;
    gc.set_conv_path(ConvPath::CudnnNhwc)?;
    let gpuc = suite(&gc, fp8_ok)?;
    compare(rep, "bf16 channels-last convolutions", &cpu16, &gpuc, 1e-2);
    let conv = gc.conv_stats()?;
    if conv.cudnn_version.is_some() && conv.unavailable.is_none() {
        // A problem cuDNN refuses channels-last runs on its NCHW path instead; none may
        // be left to im2col, the channels-last path must have run at all, and the VAE
        // stage's conv2d_add calls must have added their residual inside cuDNN.
        let im2col = conv.on_im2col();
        let nhwc = conv
            .cudnn_problems
            .iter()
            .filter(|p| p.contains(" nhwc:"))
            .count();
        rep.check(
            "bf16 channels-last convolutions on cuDNN",
            im2col.is_empty() && nhwc > 0 && conv.fused_residual_calls > 0,
            format!(
                "{nhwc} problem(s) channels-last, {} call(s) with the residual fused; left to im2col: {im2col:?}; {conv}: {}",
                conv.fused_residual_calls,
                conv.cudnn_problems.join("; ")
            ),
        );
        layouts_kept(rep, &gc)?;
    } else if nhwc_asked {
        rep.check(
            "channels-last convolutions on cuDNN (SD_CUDA_CONV=nhwc)",
            false,
            conv.to_string(),
        );
    } else {
        rep.line(format!(
            "info: channels-last convolutions not on cuDNN: {conv}"
        ));
    }
    drop(gc);
    if fp8_ok {
        let gx = CudaBackend::new(0, CudaPrecision::Fp8)?.with_fp8_gemm(Fp8Gemm::ExactViaBf16);
        let gpux = suite(&gx, true)?;
        let lin = |v: &[(String, HostTensor)]| -> Vec<(String, HostTensor)> {
            v.iter()
                .filter(|(n, _)| n.starts_with("linear"))
                .cloned()
                .collect()
        };
        compare(rep, "fp8-exact-via-bf16", &lin(&cpu16), &lin(&gpux), 1e-2);
    }
    rep.line(format!("op suites took {:.1}s", t.elapsed().as_secs_f64()));
    if fp8_ok {
        bench(rep, &gl)?;
    }
    quantize_codes(rep, &gl)?;
    graph_checks(rep, &gl, fp8_ok)?;
    if fp8_ok {
        // Native FP8 GEMMs whatever SD_CUDA_FP8_GEMM says (exact-via-bf16 layers take no
        // codes, and the check would hold vacuously).
        let native = CudaBackend::new(0, CudaPrecision::Fp8)?.with_fp8_gemm(Fp8Gemm::Native);
        fused_input_codes(rep, &native)?;
    }
    // Several caller threads share one backend (its owner thread serializes them).
    let mut rng = Rng(11);
    let inputs: Vec<HostTensor> = (0..8).map(|_| rng.tensor(&[3, 50, 64], 1.0)).collect();
    let serial: Vec<HostTensor> = inputs
        .iter()
        .map(|x| gl.download(&gl.activation(&gl.upload(x)?, Activation::Silu)?))
        .collect::<sd_model::Result<_>>()?;
    let parallel: Vec<HostTensor> = std::thread::scope(|s| {
        let hs: Vec<_> = inputs
            .iter()
            .map(|x| {
                let g = &gl;
                s.spawn(move || g.download(&g.activation(&g.upload(x)?, Activation::Silu)?))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("caller thread"))
            .collect::<sd_model::Result<Vec<_>>>()
    })?;
    let same = serial.iter().zip(&parallel).all(|(a, b)| a.data == b.data);
    rep.check(
        "8 caller threads on one backend",
        same,
        format!(
            "results {}identical to serial calls",
            if same { "" } else { "NOT " }
        ),
    );
    if ops_only {
        rep.line("info: --ops-only: the tiny-model pipelines were not run".to_string());
    } else if model.is_dir() {
        pipelines(rep, model, fp8_ok)?;
        // The other tiny models next to it, when present.
        for other in ["tiny-sd3", "tiny-sd35l-no-t5"] {
            let dir = model.with_file_name(other);
            if dir.is_dir() && dir != *model {
                pipelines(rep, &dir, fp8_ok)?;
            }
        }
    } else {
        rep.check(
            "pipeline",
            false,
            format!("model dir {} missing", model.display()),
        );
    }
    Ok(())
}

/// Checks the test code itself on the CPU backends (no GPU): `gpu_tests --cpu-only`.
fn cpu_only(model: &PathBuf) -> R<()> {
    let a = suite(&CpuBackend::new(ComputePrecision::F32), false)?;
    let b = suite(&CpuBackend::new(ComputePrecision::Bf16), true)?;
    println!("cpu suites: {} and {} results", a.len(), b.len());
    let ckpt = Checkpoint::open(model)?;
    let plan = tiny_plan(&ckpt)?;
    let (img, s) = generate(&ckpt, CpuBackend::new(ComputePrecision::Bf16), &plan)?;
    println!(
        "cpu fp8 plan ({} layers): {} pixels in {s:.2}s",
        plan.fp8_layer_count(),
        img.len()
    );
    Ok(())
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--cpu-only") {
        let model = PathBuf::from(
            std::env::args()
                .nth(2)
                .unwrap_or_else(|| "models/tiny-sd35m".into()),
        );
        if let Err(e) = cpu_only(&model) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    // `--ops-only`: the per-op checks without the tiny-model pipelines (seconds instead
    // of half a minute: what the bench's flash-tiling stage needs per tiling).
    let ops_only = std::env::args().any(|a| a == "--ops-only");
    let mut args = std::env::args().skip(1).filter(|a| a != "--ops-only");
    let model = PathBuf::from(args.next().unwrap_or_else(|| "models/tiny-sd35m".into()));
    let out = PathBuf::from(
        args.next()
            .or_else(|| std::env::var("OUT").ok())
            .unwrap_or_else(|| ".".into()),
    );
    let mut rep = Report::new();
    if let Err(e) = run(&mut rep, &model, ops_only) {
        rep.check("suite", false, format!("error: {e}"));
    }
    let _ = writeln!(rep.text, "\n{} failure(s)", rep.failures.len());
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("gpu_tests.txt"), &rep.text);
    println!("{} failure(s)", rep.failures.len());
    for f in &rep.failures {
        println!("  {f}");
    }
    std::process::exit(i32::from(!rep.failures.is_empty()));
}
