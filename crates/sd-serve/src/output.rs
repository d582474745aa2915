//! Image encoding: PNG (with the generation parameters in tEXt chunks), JPEG, WebP, raw
//! latents; and the small latent-space previews of the stream.

use image::ExtendedColorType;
use image::ImageEncoder;
use sd_model::HostTensor;
use sd_pipeline::{Generated, Image};
use sd_proto::v1 as pb;

use crate::worker::JobSpec;

pub const LATENTS_MEDIA_TYPE: &str = "application/x-sd-latents";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg { quality: u8 },
    Webp,
    Latents,
}

impl OutputFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg { .. } => "jpeg",
            Self::Webp => "webp",
            Self::Latents => "latents",
        }
    }
}

/// Encodes one finished image as the job asked.
pub fn encode_image(
    g: &Generated,
    spec: &JobSpec,
    seed: u64,
    engine_id: &str,
) -> Result<pb::Image, String> {
    let (w, h) = (g.image.width as u32, g.image.height as u32);
    let mut out = pb::Image {
        data: Vec::new(),
        media_type: String::new(),
        seed,
        width: w,
        height: h,
        shape: Vec::new(),
    };
    match spec.format {
        OutputFormat::Png => {
            let (text, json) = parameters(spec, seed, engine_id);
            out.data = encode_png_with_parameters(&g.image, &text, &json)?;
            out.media_type = "image/png".into();
        }
        OutputFormat::Jpeg { quality } => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out.data, quality)
                .write_image(&g.image.rgb, w, h, ExtendedColorType::Rgb8)
                .map_err(|e| format!("JPEG encoding: {e}"))?;
            out.media_type = "image/jpeg".into();
        }
        OutputFormat::Webp => {
            image::codecs::webp::WebPEncoder::new_lossless(&mut out.data)
                .write_image(&g.image.rgb, w, h, ExtendedColorType::Rgb8)
                .map_err(|e| format!("WebP encoding: {e}"))?;
            out.media_type = "image/webp".into();
        }
        OutputFormat::Latents => {
            out.data = g
                .latents
                .data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            out.shape = g.latents.shape.iter().map(|&d| d as u32).collect();
            out.media_type = LATENTS_MEDIA_TYPE.into();
        }
    }
    Ok(out)
}

/// PNG with `parameters` (A1111-style text: tEXt when Latin-1 can hold it, else UTF-8
/// iTXt, as A1111 does) and `sd-parameters` (JSON, ASCII-escaped, tEXt).
pub fn encode_png_with_parameters(
    image: &Image,
    text: &str,
    json: &str,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let latin1 = text.chars().all(|c| (c as u32) < 256 && c != '\0');
        let r = if latin1 {
            enc.add_text_chunk("parameters".into(), text.into())
        } else {
            enc.add_itxt_chunk("parameters".into(), text.into())
        };
        r.map_err(|e| format!("PNG parameters: {e}"))?;
        enc.add_text_chunk("sd-parameters".into(), ascii_escape(json))
            .map_err(|e| format!("PNG sd-parameters: {e}"))?;
        let mut w = enc.write_header().map_err(|e| format!("PNG header: {e}"))?;
        w.write_image_data(&image.rgb)
            .map_err(|e| format!("PNG data: {e}"))?;
    }
    Ok(out)
}

/// JSON with every non-ASCII character as `\uXXXX` (surrogate pairs above U+FFFF).
fn ascii_escape(json: &str) -> String {
    let mut s = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            s.push(c);
        } else {
            let mut buf = [0u16; 2];
            for u in c.encode_utf16(&mut buf) {
                s.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    s
}

/// The generation parameters of one image: A1111-style text and JSON.
pub fn parameters(spec: &JobSpec, seed: u64, engine_id: &str) -> (String, String) {
    let r = &spec.request;
    let mut text = r.prompt.clone();
    if !r.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", r.negative_prompt));
    }
    text.push_str(&format!(
        "\nSteps: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}, Engine: {engine_id}, Max sequence length: {}",
        r.steps, r.guidance_scale, r.width, r.height, spec.model, r.max_sequence_length
    ));
    if let Some(shift) = r.shift {
        text.push_str(&format!(", Shift: {shift}"));
    }
    let json = serde_json::json!({
        "model": spec.model,
        "engine_id": engine_id,
        "prompt": r.prompt,
        "prompt_2": r.prompt_2,
        "prompt_3": r.prompt_3,
        "negative_prompt": r.negative_prompt,
        "negative_prompt_2": r.negative_prompt_2,
        "negative_prompt_3": r.negative_prompt_3,
        "width": r.width,
        "height": r.height,
        "steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "seed": seed,
        "max_sequence_length": r.max_sequence_length,
        "shift": r.shift,
    });
    (text, json.to_string())
}

/// A PNG at latent resolution from the first three latent channels, each stretched to
/// its own min..max: cheap (no VAE), enough to watch the composition form.
pub fn preview_png(latents: &HostTensor) -> Result<pb::Image, String> {
    let s = &latents.shape;
    if s.len() != 4 || s[1] < 3 {
        return Err(format!("latents of shape {s:?} have no preview"));
    }
    let (h, w) = (s[2], s[3]);
    let plane = h * w;
    let mut rgb = vec![0u8; plane * 3];
    for c in 0..3 {
        let ch = &latents.data[c * plane..(c + 1) * plane];
        let (lo, hi) = ch
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let range = (hi - lo).max(1e-6);
        for (i, &v) in ch.iter().enumerate() {
            rgb[i * 3 + c] = (((v - lo) / range).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    let mut data = Vec::new();
    image::codecs::png::PngEncoder::new(&mut data)
        .write_image(&rgb, w as u32, h as u32, ExtendedColorType::Rgb8)
        .map_err(|e| format!("preview: {e}"))?;
    Ok(pb::Image {
        data,
        media_type: "image/png".into(),
        seed: 0,
        width: w as u32,
        height: h as u32,
        shape: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_json_round_trips() {
        let v = serde_json::json!({"prompt": "un chat 🐱 — café 猫", "n": 1});
        let escaped = ascii_escape(&v.to_string());
        assert!(escaped.is_ascii());
        let back: serde_json::Value = serde_json::from_str(&escaped).expect("valid JSON");
        assert_eq!(back, v);
    }
}
