//! CPU kernels against naive f64 references, and the batch-independence guarantee.

use sd_cpu::{ComputePrecision, CpuBackend, CpuTensor};
use sd_model::backend::{AttentionParams, Backend, Conv2dParams, linear_spec};
use sd_model::{HostTensor, WeightTensor};

fn det(shape: Vec<usize>, seed: u32) -> HostTensor {
    // Deterministic pseudo-random values in [-1, 1).
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    HostTensor::from_fn(shape, |_| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s as f32 / u32::MAX as f32) * 2.0 - 1.0
    })
}

fn up(b: &CpuBackend, t: &HostTensor) -> CpuTensor {
    b.upload(t).unwrap()
}

fn close(a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (*x as f64 - y).abs() <= tol * (1.0 + y.abs()),
            "element {i}: {x} vs {y}"
        );
    }
}

#[test]
fn linear_matches_naive_and_is_batch_independent() {
    let b = CpuBackend::new(ComputePrecision::F32);
    let (n, k) = (24, 40);
    let w = det(vec![n, k], 1);
    let bias = det(vec![n], 2);
    let layer = b
        .load_linear(
            &linear_spec("l", k, n),
            &WeightTensor::from_host("l.weight", &w),
            Some(&WeightTensor::from_host("l.bias", &bias)),
        )
        .unwrap();
    let x = det(vec![3, 5, k], 3);
    let y = b.download(&b.linear(&up(&b, &x), &layer).unwrap()).unwrap();
    let mut want = Vec::new();
    for r in 0..15 {
        for o in 0..n {
            let dot: f64 = (0..k)
                .map(|i| x.data[r * k + i] as f64 * w.data[o * k + i] as f64)
                .sum();
            want.push(dot + bias.data[o] as f64);
        }
    }
    close(&y.data, &want, 1e-5);
    // Each batch entry alone gives bit-identical rows.
    for e in 0..3 {
        let xe = x.slice0(e, 1).unwrap();
        let ye = b
            .download(&b.linear(&up(&b, &xe), &layer).unwrap())
            .unwrap();
        assert_eq!(ye.data, y.slice0(e, 1).unwrap().data, "entry {e}");
    }
}

#[test]
fn attention_matches_naive_with_causal_mask_and_bias() {
    let b = CpuBackend::new(ComputePrecision::F32);
    let (bs, sq, heads, d) = (2, 150, 3, 8); // more than one query block
    let c = heads * d;
    let q = det(vec![bs, sq, c], 4);
    let k = det(vec![bs, sq, c], 5);
    let v = det(vec![bs, sq, c], 6);
    let bias = det(vec![heads, sq, sq], 7);
    for (causal, with_bias) in [(false, false), (true, false), (false, true)] {
        let bt = up(&b, &bias);
        let p = AttentionParams {
            heads,
            scale: 0.3,
            causal,
            bias: with_bias.then_some(&bt),
        };
        let o = b
            .attention(&up(&b, &q), &up(&b, &k), &up(&b, &v), p)
            .unwrap();
        let o = b.download(&o).unwrap();
        let mut want = vec![0f64; bs * sq * c];
        for e in 0..bs {
            for h in 0..heads {
                for i in 0..sq {
                    let at = |t: &HostTensor, s: usize, j: usize| {
                        t.data[(e * sq + s) * c + h * d + j] as f64
                    };
                    let mut scores: Vec<f64> = (0..sq)
                        .map(|s| {
                            let mut x =
                                0.3 * (0..d).map(|j| at(&q, i, j) * at(&k, s, j)).sum::<f64>();
                            if with_bias {
                                x += bias.data[(h * sq + i) * sq + s] as f64;
                            }
                            if causal && s > i {
                                x = f64::NEG_INFINITY;
                            }
                            x
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores
                        .iter_mut()
                        .map(|x| {
                            *x = (*x - m).exp();
                            *x
                        })
                        .sum();
                    for j in 0..d {
                        want[(e * sq + i) * c + h * d + j] =
                            (0..sq).map(|s| scores[s] / sum * at(&v, s, j)).sum();
                    }
                }
            }
        }
        close(&o.data, &want, 1e-5);
    }
}

#[test]
fn conv2d_matches_naive() {
    let b = CpuBackend::new(ComputePrecision::F32);
    let (n, ci, h, w, co) = (2, 3, 7, 9, 5);
    let x = det(vec![n, ci, h, w], 8);
    let k = det(vec![co, ci, 3, 3], 9);
    let bias = det(vec![co], 10);
    let y = b
        .conv2d(
            &up(&b, &x),
            &up(&b, &k),
            Some(&up(&b, &bias)),
            Conv2dParams {
                stride: 1,
                padding: 1,
            },
        )
        .unwrap();
    let y = b.download(&y).unwrap();
    assert_eq!(y.shape, vec![n, co, h, w]);
    let mut want = Vec::new();
    for e in 0..n {
        for o in 0..co {
            for i in 0..h as isize {
                for j in 0..w as isize {
                    let mut s = bias.data[o] as f64;
                    for c in 0..ci {
                        for dy in 0..3isize {
                            for dx in 0..3isize {
                                let (yy, xx) = (i + dy - 1, j + dx - 1);
                                if yy >= 0 && yy < h as isize && xx >= 0 && xx < w as isize {
                                    s += x.data[((e * ci + c) * h + yy as usize) * w + xx as usize]
                                        as f64
                                        * k.data[((o * ci + c) * 3 + dy as usize) * 3 + dx as usize]
                                            as f64;
                                }
                            }
                        }
                    }
                    want.push(s);
                }
            }
        }
    }
    close(&y.data, &want, 1e-5);
}

#[test]
fn permute_and_norms() {
    let b = CpuBackend::new(ComputePrecision::F32);
    let x = det(vec![2, 3, 4, 5], 11);
    let p = b
        .download(&b.permute(&up(&b, &x), &[2, 0, 3, 1]).unwrap())
        .unwrap();
    assert_eq!(p.shape, vec![4, 2, 5, 3]);
    for (a, bb, c, d) in [(0, 0, 0, 0), (1, 2, 3, 4), (1, 0, 2, 3)] {
        assert_eq!(
            p.data[((c * 2 + a) * 5 + d) * 3 + bb],
            x.data[((a * 3 + bb) * 4 + c) * 5 + d]
        );
    }
    let ln = b
        .download(&b.layer_norm(&up(&b, &x), None, None, 1e-6).unwrap())
        .unwrap();
    for row in ln.data.chunks(5) {
        let mean: f32 = row.iter().sum::<f32>() / 5.0;
        let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 5.0;
        assert!(
            mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3,
            "{mean} {var}"
        );
    }
    let rms = b
        .download(&b.rms_norm(&up(&b, &x), None, 1e-6).unwrap())
        .unwrap();
    for row in rms.data.chunks(5) {
        let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 5.0;
        assert!((ms - 1.0).abs() < 1e-3, "{ms}");
    }
}

#[test]
fn bf16_mode_rounds_outputs() {
    let b = CpuBackend::new(ComputePrecision::Bf16);
    let x = det(vec![4, 8], 12);
    let y = b
        .download(&b.scale_shift(&up(&b, &x), 1.000_1, 0.0).unwrap())
        .unwrap();
    assert!(
        y.data.iter().all(|v| v.to_bits() & 0xFFFF == 0),
        "not bf16-representable"
    );
}
