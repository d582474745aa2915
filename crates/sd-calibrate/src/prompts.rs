//! Prompt sets: a text file (one prompt a line; blank lines and `#` comments ignored)
//! or YAML (a list of strings, or a map with `prompts: [...]`).

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{CalibrateError, Result};

/// The project's calibration prompts (`calibration/prompts.txt`).
pub const DEFAULT_PROMPTS: &str = include_str!("../../../calibration/prompts.txt");
/// Held-out prompts for the fidelity evaluation (`calibration/heldout.txt`).
pub const HELDOUT_PROMPTS: &str = include_str!("../../../calibration/heldout.txt");

#[derive(Clone, Debug, PartialEq)]
pub struct PromptSet {
    /// Where it came from, for messages.
    pub origin: String,
    pub prompts: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum YamlPrompts {
    List(Vec<String>),
    Map { prompts: Vec<String> },
}

impl PromptSet {
    pub fn default_set() -> Self {
        Self::parse_text("calibration/prompts.txt (built in)", DEFAULT_PROMPTS)
    }
    pub fn heldout() -> Self {
        Self::parse_text("calibration/heldout.txt (built in)", HELDOUT_PROMPTS)
    }

    pub fn parse_text(origin: &str, text: &str) -> Self {
        Self {
            origin: origin.to_string(),
            prompts: text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect(),
        }
    }

    /// Reads a prompt file; `.yaml`/`.yml` are parsed as YAML, anything else as text.
    /// An unreadable, malformed or empty file is an error.
    pub fn load(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let bytes = std::fs::read(path)
            .map_err(|e| CalibrateError::Input(format!("cannot read prompt file {origin}: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            CalibrateError::Input(format!("prompt file {origin} is not valid UTF-8"))
        })?;
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let set = if ext == "yaml" || ext == "yml" {
            let parsed: YamlPrompts = serde_norway::from_str(&text).map_err(|e| {
                CalibrateError::Input(format!(
                    "prompt file {origin} is not a YAML list of strings or {{prompts: [...]}}: {e}"
                ))
            })?;
            let list = match parsed {
                YamlPrompts::List(l) | YamlPrompts::Map { prompts: l } => l,
            };
            Self {
                origin: origin.clone(),
                prompts: list
                    .into_iter()
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            }
        } else {
            Self::parse_text(&origin, &text)
        };
        if set.prompts.is_empty() {
            return Err(CalibrateError::Input(format!(
                "prompt file {origin} contains no prompts"
            )));
        }
        Ok(set)
    }

    /// SHA-256 over the prompts, each followed by a newline (independent of the file's
    /// format and comments).
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        for p in &self.prompts {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}
