use sd_model::{HostTensor, ModelError};

/// An RGB image, 8 bits per channel, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    /// The same image as floats in [0, 1], `[H, W, 3]` (diffusers' `output_type="np"`).
    pub float: Vec<f32>,
}

impl Image {
    /// From the VAE's `[1, 3, H, W]` output in ~[-1, 1]: `(x / 2 + 0.5).clamp(0, 1)`, then
    /// `round(x * 255)` with ties to even, as numpy rounds.
    pub fn from_decoder_output(x: &HostTensor) -> Result<Self, ModelError> {
        let s = &x.shape;
        if s.len() != 4 || s[0] != 1 || s[1] != 3 {
            return Err(ModelError::input(format!(
                "decoder output must be [1, 3, H, W], got {s:?}"
            )));
        }
        let (h, w) = (s[2], s[3]);
        let mut float = vec![0.0f32; h * w * 3];
        for c in 0..3 {
            for i in 0..h * w {
                float[i * 3 + c] = (x.data[c * h * w + i] / 2.0 + 0.5).clamp(0.0, 1.0);
            }
        }
        let rgb = float
            .iter()
            .map(|v| (v * 255.0).round_ties_even() as u8)
            .collect();
        Ok(Self {
            width: w,
            height: h,
            rgb,
            float,
        })
    }
}

/// PNG bytes, with `text` entries stored as tEXt chunks (e.g. the generation parameters).
pub fn encode_png(image: &Image, text: &[(&str, &str)]) -> Result<Vec<u8>, ModelError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.to_string())
                .map_err(|e| ModelError::input(format!("PNG text chunk `{k}`: {e}")))?;
        }
        let mut writer = enc
            .write_header()
            .map_err(|e| ModelError::input(format!("PNG header: {e}")))?;
        writer
            .write_image_data(&image.rgb)
            .map_err(|e| ModelError::input(format!("PNG data: {e}")))?;
    }
    Ok(out)
}
