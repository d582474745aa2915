//! T5 SentencePiece-unigram tokenizer (SD3 `tokenizer_3/`).

use std::path::Path;

use serde_json::{Map, Value};
use tokenizers::models::unigram::Unigram;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, Tokenizer};

use crate::Encoded;
use crate::error::{Result, TextError};
use crate::files::{
    AddedSpec, TokenConfig, as_object, check_dir, parse_json_added_tokens, read_json,
    register_added,
};

const NOTE_T5: &str = " (a T5 tokenizer directory needs tokenizer.json)";

/// The T5 tokenizer of SD3's third text encoder.
///
/// Produces what `T5TokenizerFast(prompt, padding="max_length",
/// max_length=L, truncation=True, add_special_tokens=True)` produces in
/// diffusers' `StableDiffusion3Pipeline`: the prompt's pieces (at most
/// `L - 1`), `</s>`, then `<pad>` up to `L` ids.
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    eos_id: u32,
    pad_id: u32,
    vocab_size: usize,
}

impl T5Tokenizer {
    /// Loads `tokenizer.json` (plus `tokenizer_config.json` /
    /// `special_tokens_map.json` if present) from a directory laid out like
    /// a diffusers checkpoint's `tokenizer_3/`.
    ///
    /// The unigram vocabulary, its precompiled SentencePiece normalization
    /// map and the added tokens come from `tokenizer.json`; the
    /// pre-tokenization (whitespace split, `▁` prepended to every word) is
    /// that of transformers' `T5Tokenizer`, which is also what transformers
    /// 5 does with a `tokenizer.json`: any other normalizer steps in the
    /// file are ignored.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        check_dir(dir)?;
        let config = TokenConfig::load(dir)?;
        let tj = dir.join("tokenizer.json");
        let root = read_json(&tj, NOTE_T5)?;
        let root = as_object(&tj, &root, "the file")?;

        let model = unigram_from_json(&tj, root)?;
        let mut tokenizer = Tokenizer::new(model);
        if let Some(precompiled) = precompiled_from_json(&tj, root)? {
            tokenizer.with_normalizer(Some(precompiled));
        }
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(
            PreTokenizerSequence::new(vec![
                WhitespaceSplit.into(),
                Metaspace::new('▁', PrependScheme::Always, true).into(),
            ]),
        )));
        tokenizer.with_decoder(Some(DecoderWrapper::Metaspace(Metaspace::new(
            '▁',
            PrependScheme::Always,
            true,
        ))));

        let eos = config.special("eos_token", "</s>")?;
        let unk = config.special("unk_token", "<unk>")?;
        let pad = config.special("pad_token", "<pad>")?;
        for (role, spec) in [("eos", &eos), ("unk", &unk), ("pad", &pad)] {
            if tokenizer.token_to_id(&spec.token.content).is_none() {
                return Err(TextError::MissingSpecialToken {
                    path: tj.clone(),
                    role,
                    token: spec.token.content.clone(),
                });
            }
        }
        let mut specs: Vec<AddedSpec> = config.added_tokens().to_vec();
        specs.extend(parse_json_added_tokens(&tj, root)?);
        specs.extend([eos.clone(), unk, pad.clone()]);
        specs.extend(config.additional_special()?);
        register_added(&mut tokenizer, &specs)?;

        let id = |spec: &AddedSpec, role: &'static str| {
            tokenizer.token_to_id(&spec.token.content).ok_or_else(|| {
                TextError::MissingSpecialToken {
                    path: tj.clone(),
                    role,
                    token: spec.token.content.clone(),
                }
            })
        };
        let eos_id = id(&eos, "eos")?;
        let pad_id = id(&pad, "pad")?;
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(Self {
            tokenizer,
            eos_id,
            pad_id,
            vocab_size,
        })
    }

    /// Tokenizes `prompt` into exactly `max_len` ids (SD3 uses 256 by
    /// default, 77 in older pipelines).
    ///
    /// `truncated` is set when the prompt did not fit (`</s>` stays last);
    /// `untruncated_len` is the length it would have had, `</s>` included.
    /// Fails if `max_len` is 0.
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<Encoded> {
        if max_len == 0 {
            return Err(TextError::InvalidMaxLen(max_len));
        }
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(TextError::tokenizer)?;
        let content = encoding.get_ids();
        let keep = content.len().min(max_len - 1);
        let mut ids = Vec::with_capacity(max_len);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos_id);
        ids.resize(max_len, self.pad_id);
        let untruncated_len = content.len() + 1;
        Ok(Encoded {
            ids,
            truncated: untruncated_len > max_len,
            untruncated_len,
        })
    }

    /// Id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of ids of the vocabulary, added tokens (e.g. `<extra_id_N>`)
    /// included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// `model` of a `tokenizer.json`: `{"type": "Unigram", "unk_id": 2,
/// "vocab": [["<pad>", 0.0], ...], "byte_fallback": false}`.
fn unigram_from_json(path: &Path, root: &Map<String, Value>) -> Result<Unigram> {
    let model = root
        .get("model")
        .ok_or_else(|| TextError::invalid(path, "no \"model\" section"))?;
    let model = as_object(path, model, "\"model\"")?;
    match model.get("type").and_then(Value::as_str) {
        None | Some("Unigram") => {}
        Some(other) => {
            return Err(TextError::invalid(
                path,
                format!("model type is {other:?}, a T5 tokenizer needs \"Unigram\""),
            ));
        }
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_array)
        .ok_or_else(|| TextError::invalid(path, "\"model.vocab\" is missing or not an array"))?;
    let vocab = vocab
        .iter()
        .enumerate()
        .map(|(i, entry)| match entry.as_array().map(Vec::as_slice) {
            Some([Value::String(piece), score]) => score
                .as_f64()
                .map(|s| (piece.clone(), s))
                .ok_or_else(|| TextError::invalid(path, format!("vocab entry #{i} has no score"))),
            _ => Err(TextError::invalid(
                path,
                format!("vocab entry #{i} is not a [piece, score] pair"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    if vocab.is_empty() {
        return Err(TextError::invalid(path, "the vocabulary is empty"));
    }
    let unk_id = match model.get("unk_id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|u| usize::try_from(u).ok())
                .ok_or_else(|| TextError::invalid(path, "\"model.unk_id\" is not an index"))?,
        ),
    };
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Unigram::from(vocab, unk_id, byte_fallback)
        .map_err(|e| TextError::invalid(path, format!("cannot build the unigram model: {e}")))
}

/// The `Precompiled` SentencePiece normalizer of a `tokenizer.json`, alone or
/// inside a `Sequence`.
fn precompiled_from_json(
    path: &Path,
    root: &Map<String, Value>,
) -> Result<Option<NormalizerWrapper>> {
    let Some(normalizer) = root.get("normalizer").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let is_precompiled = |v: &Value| {
        v.get("type").and_then(Value::as_str) == Some("Precompiled")
            // an empty map means "no normalization"
            && v.get("precompiled_charsmap").and_then(Value::as_str) != Some("")
    };
    let found = if is_precompiled(normalizer) {
        Some(normalizer)
    } else {
        normalizer
            .get("normalizers")
            .and_then(Value::as_array)
            .and_then(|list| list.iter().find(|v| is_precompiled(v)))
    };
    found
        .map(|v| {
            serde_json::from_value::<NormalizerWrapper>(v.clone())
                .map_err(|e| TextError::invalid(path, format!("bad Precompiled normalizer: {e}")))
        })
        .transpose()
}
