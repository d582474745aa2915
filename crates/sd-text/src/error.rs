//! Error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a tokenizer.
///
/// Every variant that comes from a file names that file.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The tokenizer directory does not exist (or is not a directory).
    #[error("tokenizer directory {} does not exist or is not a directory", path.display())]
    MissingDir {
        /// The directory that was asked for.
        path: PathBuf,
    },

    /// A required file is absent.
    #[error("missing tokenizer file {}{note}", path.display())]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// Extra explanation (may be empty), starting with a space.
        note: &'static str,
    },

    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON.
    #[error("malformed JSON in {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line and column).
        #[source]
        source: serde_json::Error,
    },

    /// A file is well formed but its content is not what a tokenizer needs.
    #[error("invalid tokenizer file {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A special token (bos, eos, pad, ...) is not in the vocabulary.
    #[error("{role} token {token:?} is not in the vocabulary loaded from {}", path.display())]
    MissingSpecialToken {
        /// The vocabulary file (`tokenizer.json` or `vocab.json`).
        path: PathBuf,
        /// Which special token: "bos", "eos", "pad" or "unk".
        role: &'static str,
        /// The token's text.
        token: String,
    },

    /// `max_len` must leave room for at least the end-of-sequence token.
    #[error("invalid max_len {0}: it must be at least 1")]
    InvalidMaxLen(usize),

    /// The `tokenizers` library failed while building or encoding.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TextError>;

impl TextError {
    pub(crate) fn invalid(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tokenizer(err: impl std::fmt::Display) -> Self {
        Self::Tokenizer(err.to_string())
    }
}
