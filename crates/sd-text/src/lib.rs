//! Tokenizers of the Stable Diffusion 3 / 3.5 text encoders.
//!
//! SD3 conditions on three text encoders, each with its own tokenizer
//! directory in a diffusers checkpoint:
//!
//! | directory      | type                | pad              | length |
//! |----------------|---------------------|------------------|--------|
//! | `tokenizer/`   | [`ClipTokenizer`]   | `<\|endoftext\|>` | 77     |
//! | `tokenizer_2/` | [`ClipTokenizer`]   | `!`              | 77     |
//! | `tokenizer_3/` | [`T5Tokenizer`]     | `<pad>`          | 256    |
//!
//! Both give the ids that diffusers' `StableDiffusion3Pipeline` feeds its
//! text encoders (`padding="max_length"`, `truncation=True`), plus whether
//! the prompt was cut so the caller can warn.
//!
//! ```no_run
//! use sd_text::{ClipTokenizer, T5Tokenizer};
//!
//! let clip_l = ClipTokenizer::from_dir("model/tokenizer")?;
//! let t5 = T5Tokenizer::from_dir("model/tokenizer_3")?;
//! let ids = clip_l.encode("a photo of a cat")?;
//! assert_eq!(ids.ids.len(), 77);
//! let ids = t5.encode("a photo of a cat", 256)?;
//! if ids.truncated {
//!     eprintln!("prompt truncated ({} tokens)", ids.untruncated_len);
//! }
//! # Ok::<(), sd_text::TextError>(())
//! ```

mod clip;
mod error;
mod files;
mod t5;

pub use clip::ClipTokenizer;
pub use error::{Result, TextError};
pub use t5::T5Tokenizer;

/// A prompt turned into a fixed number of token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly the requested number of ids, special tokens and padding
    /// included.
    pub ids: Vec<u32>,
    /// Whether tokens of the prompt were dropped to fit.
    pub truncated: bool,
    /// Length the id sequence would have without truncation or padding,
    /// special tokens (bos/eos) included.
    pub untruncated_len: usize,
}
