//! The calibration report: a per-layer table for the terminal and a self-contained
//! HTML page (inline SVG, no scripts, no downloads).

use std::fmt::Write;

use crate::cache::CalibrationCache;
use crate::fidelity::{EvalConfig, VariantScore};

/// One line per layer: role, precision, activation format/scale/amax/threshold and
/// SQNR, weight SQNR.
pub fn terminal_table(c: &CalibrationCache) -> String {
    let w = c
        .layers
        .iter()
        .map(|l| l.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w$}  {:<15} {:<5} {:<5} {:>11} {:>11} {:>8} {:>9} {:>9}",
        "layer", "role", "prec", "act", "scale", "amax", "thr/amax", "act SQNR", "w SQNR"
    );
    for l in &c.layers {
        let a = &l.activation;
        let _ = writeln!(
            s,
            "{:<w$}  {:<15} {:<5} {:<5} {:>11.4e} {:>11.4e} {:>8.3} {:>7.1}dB {:>7.1}dB",
            l.name,
            l.role,
            if l.weight_only {
                "w8"
            } else if l.quantized {
                "fp8"
            } else {
                "high"
            },
            if l.quantized && !l.weight_only {
                a.format.to_string()
            } else {
                "-".into()
            },
            a.scale,
            a.amax,
            if a.amax > 0.0 {
                a.threshold / a.amax
            } else {
                1.0
            },
            a.sqnr_db,
            l.weight.sqnr_db,
        );
    }
    let m = &c.summary;
    let _ = writeln!(
        s,
        "{} layers: {} FP8 ({} E4M3, {} E5M2 activations), {} FP8 weights only (w8), {} high precision; target {}, method {}",
        m.layers,
        m.fp8_layers,
        m.e4m3_activations,
        m.e5m2_activations,
        m.weight_only_layers,
        m.excluded,
        c.settings.target,
        c.settings.method
    );
    s
}

/// The fidelity table for the terminal.
pub fn fidelity_table(scores: &[VariantScore]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<40} {:>4} {:>11} {:>10} {:>10} {:>9}",
        "vs FP32", "fp8", "mean PSNR", "min PSNR", "mean SSIM", "min SSIM"
    );
    for v in scores {
        let _ = writeln!(
            s,
            "{:<40} {:>4} {:>9.2}dB {:>8.2}dB {:>10.5} {:>9.5}",
            v.name, v.fp8_layers, v.mean_psnr_db, v.min_psnr_db, v.mean_ssim, v.min_ssim
        );
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Heat map: one row per layer, one column per step, colour = amax(step) / amax.
fn amax_heatmap(c: &CalibrationCache) -> String {
    let steps = c
        .layers
        .iter()
        .map(|l| l.activation.step_amax.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let (cw, rh, left, top) = (18.0, 12.0, 300.0, 20.0);
    let width = left + cw * steps as f64 + 120.0;
    let height = top + rh * c.layers.len() as f64 + 30.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">"#
    );
    for (i, l) in c.layers.iter().enumerate() {
        let y = top + rh * i as f64;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 4.0,
            y + rh - 2.0,
            esc(&l.name)
        );
        let m = l.activation.amax.max(f32::MIN_POSITIVE);
        for (j, a) in l.activation.step_amax.iter().enumerate() {
            let r = (a / m).clamp(0.0, 1.0);
            let shade = (255.0 * (1.0 - r)) as u8;
            let _ = write!(
                s,
                r#"<rect x="{}" y="{y}" width="{cw}" height="{rh}" fill="rgb(255,{shade},{shade})"><title>{} step {j}: amax {a:.4e}</title></rect>"#,
                left + cw * j as f64,
                esc(&l.name)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}">{:.3e}</text>"#,
            left + cw * steps as f64 + 6.0,
            y + rh - 2.0,
            l.activation.amax
        );
    }
    let _ = write!(
        s,
        r#"<text x="{left}" y="{}">denoising step 0 .. {} (white = 0, red = the layer's overall amax)</text></svg>"#,
        height - 8.0,
        steps - 1
    );
    s
}

/// Horizontal bars of activation and weight SQNR per layer.
fn sqnr_bars(c: &CalibrationCache) -> String {
    let (rh, left, top, scale) = (12.0, 300.0, 20.0, 6.0);
    let max_db = 60.0;
    let width = left + scale * max_db + 80.0;
    let height = top + rh * c.layers.len() as f64 + 30.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="10">"#
    );
    for (i, l) in c.layers.iter().enumerate() {
        let y = top + rh * i as f64;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 4.0,
            y + rh - 2.0,
            esc(&l.name)
        );
        let a = l.activation.sqnr_db.clamp(0.0, max_db) * scale;
        let w = l.weight.sqnr_db.clamp(0.0, max_db) * scale;
        let col = if !l.quantized {
            "#bbbbbb"
        } else if l.activation.format == sd_fp8::Fp8Format::E5M2 {
            "#d9822b"
        } else {
            "#2b6cd9"
        };
        let _ = write!(
            s,
            r##"<rect x="{left}" y="{y}" width="{a}" height="{}" fill="{col}"><title>activation SQNR {:.2} dB</title></rect><rect x="{left}" y="{}" width="{w}" height="{}" fill="#3a3"><title>weight SQNR {:.2} dB</title></rect>"##,
            rh * 0.55,
            l.activation.sqnr_db,
            y + rh * 0.6,
            rh * 0.3,
            l.weight.sqnr_db
        );
    }
    for db in (0..=60).step_by(10) {
        let x = left + scale * db as f64;
        let _ = write!(
            s,
            r##"<line x1="{x}" x2="{x}" y1="{top}" y2="{}" stroke="#0002"/><text x="{x}" y="{}" text-anchor="middle">{db} dB</text>"##,
            height - 22.0,
            height - 10.0
        );
    }
    s.push_str("</svg>");
    s
}

/// Grouped bars of per-image PSNR for each variant.
fn fidelity_bars(scores: &[VariantScore]) -> String {
    let n = scores.first().map(|v| v.images.len()).unwrap_or(0);
    let colours = ["#2b6cd9", "#d94a2b", "#999999", "#3a3", "#a3a"];
    let (bw, gap, h, top) = (8.0, 6.0, 200.0, 20.0);
    let group = bw * scores.len() as f64 + gap;
    let width = 60.0 + group * n as f64 + 20.0;
    let max = scores
        .iter()
        .flat_map(|v| v.images.iter().map(|i| i.psnr_db))
        .fold(10.0f64, f64::max)
        .min(100.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="monospace" font-size="10">"#,
        h + top + 40.0
    );
    for (vi, v) in scores.iter().enumerate() {
        for (ii, im) in v.images.iter().enumerate() {
            let bh = (im.psnr_db / max).clamp(0.0, 1.0) * h;
            let _ = write!(
                s,
                r#"<rect x="{}" y="{}" width="{bw}" height="{bh}" fill="{}"><title>{} prompt {} seed {}: PSNR {:.2} dB, SSIM {:.4}</title></rect>"#,
                60.0 + group * ii as f64 + bw * vi as f64,
                top + h - bh,
                colours[vi % colours.len()],
                esc(&v.name),
                im.prompt,
                im.seed,
                im.psnr_db,
                im.ssim
            );
        }
        let _ = write!(
            s,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            60.0 + 160.0 * vi as f64,
            top + h + 20.0,
            colours[vi % colours.len()],
            74.0 + 160.0 * vi as f64,
            top + h + 29.0,
            esc(&v.name)
        );
    }
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let y = top + h - h * k as f64 / 4.0;
        let _ = write!(
            s,
            r##"<line x1="55" x2="{width}" y1="{y}" y2="{y}" stroke="#0002"/><text x="50" y="{}" text-anchor="end">{v:.0} dB</text>"##,
            y + 3.0
        );
    }
    s.push_str("</svg>");
    s
}

/// The whole report as one HTML page.
pub fn html(
    c: &CalibrationCache,
    fidelity: Option<(&EvalConfig, &[VariantScore])>,
    title: &str,
) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}td:first-child,th:first-child{{text-align:left;font-family:monospace}}.high{{color:#888}}</style></head><body><h1>{t}</h1>",
        t = esc(title)
    );
    let st = &c.settings;
    let _ = write!(
        s,
        "<p>Model fingerprint <code>{}</code>; prompt set <code>{}</code> ({} prompts); target <b>{}</b>, method <b>{}</b>; {} samples x {} steps at {}x{}, guidance {}, seed {}; weights {:?}; adaLN: {}; E5M2 margin {} dB. Cache content hash <code>{}</code>.</p>",
        c.model.fingerprint,
        c.prompts.sha256,
        c.prompts.count,
        st.target,
        st.method,
        st.samples,
        st.steps,
        st.width,
        st.height,
        st.guidance,
        st.seed,
        st.weight_granularity,
        st.adaln(),
        st.e5m2_margin_db,
        c.content_hash()
    );
    if let Some((cfg, scores)) = fidelity {
        let _ = write!(
            s,
            "<h2>End-to-end fidelity vs FP32 (CPU FP8 simulation)</h2><p>{} held-out prompts x seeds {:?}, {} steps at {}x{}, guidance {}. PSNR on the float image in [0,1]; SSIM: 11x11 Gaussian window (sigma 1.5), per RGB channel, averaged.</p><table><tr><th>variant</th><th>FP8 layers</th><th>mean PSNR</th><th>min PSNR</th><th>mean SSIM</th><th>min SSIM</th></tr>",
            cfg.prompts.len(),
            cfg.seeds,
            cfg.steps,
            cfg.width,
            cfg.height,
            cfg.guidance
        );
        for v in scores {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{:.2} dB</td><td>{:.2} dB</td><td>{:.5}</td><td>{:.5}</td></tr>",
                esc(&v.name),
                v.fp8_layers,
                v.mean_psnr_db,
                v.min_psnr_db,
                v.mean_ssim,
                v.min_ssim
            );
        }
        s.push_str("</table><h3>PSNR per image</h3>");
        s.push_str(&fidelity_bars(scores));
        s.push_str("<details><summary>held-out prompts</summary><ol start=\"0\">");
        for p in &cfg.prompts {
            let _ = write!(s, "<li>{}</li>", esc(p));
        }
        s.push_str("</ol></details>");
    }
    s.push_str("<h2>Per-layer amax across denoising steps</h2>");
    s.push_str(&amax_heatmap(c));
    s.push_str("<h2>Per-layer SQNR</h2><p>Upper bar: activation SQNR at the chosen format and scale (blue E4M3, orange E5M2, grey = layer kept in high precision, shown for reference); lower green bar: weight SQNR.</p>");
    s.push_str(&sqnr_bars(c));
    s.push_str("<h2>Per-layer decisions</h2><table><tr><th>layer</th><th>role</th><th>precision</th><th>act format</th><th>act scale</th><th>amax</th><th>threshold</th><th>act SQNR</th><th>E4M3 best SQNR</th><th>E5M2 best SQNR</th><th>weight SQNR</th></tr>");
    for l in &c.layers {
        let a = &l.activation;
        let ev = |f: sd_fp8::Fp8Format| {
            a.evidence
                .iter()
                .find(|e| e.format == f)
                .map(|e| format!("{:.2} dB", e.sqnr_db))
                .unwrap_or_default()
        };
        let _ = write!(
            s,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4e}</td><td>{:.4e}</td><td>{:.4e}</td><td>{:.2} dB</td><td>{}</td><td>{}</td><td>{:.2} dB</td></tr>",
            if l.quantized { "" } else { "high" },
            esc(&l.name),
            l.role,
            if l.weight_only {
                "FP8 weights".to_string()
            } else if l.quantized {
                "FP8".to_string()
            } else {
                format!("high ({})", esc(l.excluded_by.as_deref().unwrap_or("")))
            },
            a.format,
            a.scale,
            a.amax,
            a.threshold,
            a.sqnr_db,
            ev(sd_fp8::Fp8Format::E4M3),
            ev(sd_fp8::Fp8Format::E5M2),
            l.weight.sqnr_db
        );
    }
    s.push_str("</table></body></html>\n");
    s
}
