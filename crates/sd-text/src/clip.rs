//! CLIP byte-level BPE tokenizer (SD3 `tokenizer/` and `tokenizer_2/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::Encoded;
use crate::error::{Result, TextError};
use crate::files::{
    AddedSpec, TokenConfig, as_object, check_dir, parse_json, parse_json_added_tokens, read_text,
    read_text_opt, register_added,
};

/// CLIP's pre-tokenization pattern (as in transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

const NOTE_VOCAB: &str =
    " (a CLIP tokenizer directory needs tokenizer.json, or vocab.json and merges.txt)";

/// The CLIP tokenizer of SD3's two CLIP text encoders.
///
/// Produces what `CLIPTokenizer(prompt, padding="max_length",
/// max_length=77, truncation=True)` produces in diffusers'
/// `StableDiffusion3Pipeline`: `<|startoftext|>`, the prompt's tokens
/// (at most 75), `<|endoftext|>`, then the pad token up to 77 ids. CLIP-L
/// (`tokenizer/`) pads with `<|endoftext|>`, CLIP-G (`tokenizer_2/`) with
/// `!`; the pad token is read from the directory's config files.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    vocab_size: usize,
}

/// Vocabulary and merges from whichever file holds them.
struct BpeParts {
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    added: Vec<AddedSpec>,
    /// The file the vocabulary came from, for error messages.
    vocab_path: PathBuf,
    /// The file the merges came from, for error messages.
    merges_path: PathBuf,
}

impl ClipTokenizer {
    /// Number of ids `encode` returns (CLIP's context length).
    pub const MAX_LEN: usize = 77;

    /// Loads a tokenizer directory laid out like a diffusers checkpoint's
    /// `tokenizer/` or `tokenizer_2/`.
    ///
    /// The vocabulary and merges come from `tokenizer.json` when present,
    /// otherwise from `vocab.json` + `merges.txt` (all that real SD3/SD3.5
    /// checkpoints ship). Either way the normalizer (NFC, whitespace
    /// collapse, lowercase), the pre-tokenizer (CLIP's regex + byte-level)
    /// and the BPE settings (`</w>` end-of-word suffix) are those of
    /// transformers' `CLIPTokenizer`, which is also what transformers 5 does
    /// with a `tokenizer.json`. Special tokens (bos, eos, pad, unk) and
    /// added tokens come from `tokenizer_config.json` /
    /// `special_tokens_map.json`, defaulting to CLIP's.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        check_dir(dir)?;
        let config = TokenConfig::load(dir)?;
        let parts = read_bpe_parts(dir)?;

        let bos = config.special("bos_token", DEFAULT_BOS)?;
        let eos = config.special("eos_token", DEFAULT_EOS)?;
        let unk = config.special("unk_token", DEFAULT_EOS)?;
        let pad = config.special("pad_token", DEFAULT_EOS)?;
        for (role, spec) in [("bos", &bos), ("eos", &eos), ("unk", &unk), ("pad", &pad)] {
            if !parts.vocab.contains_key(&spec.token.content) {
                return Err(TextError::MissingSpecialToken {
                    path: parts.vocab_path.clone(),
                    role,
                    token: spec.token.content.clone(),
                });
            }
        }

        let model = BPE::builder()
            .vocab_and_merges(parts.vocab.into_iter().collect::<Vocab>(), parts.merges)
            .unk_token(unk.token.content.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| {
                TextError::invalid(&parts.merges_path, format!("cannot build BPE: {e}"))
            })?;

        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_normalizer(Some(clip_normalizer()?));
        tokenizer.with_pre_tokenizer(Some(clip_pre_tokenizer()?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let mut specs: Vec<AddedSpec> = config.added_tokens().to_vec();
        specs.extend(parts.added);
        specs.extend([bos.clone(), eos.clone(), unk, pad.clone()]);
        register_added(&mut tokenizer, &specs)?;

        let id = |spec: &AddedSpec, role: &'static str| {
            tokenizer.token_to_id(&spec.token.content).ok_or_else(|| {
                TextError::MissingSpecialToken {
                    path: parts.vocab_path.clone(),
                    role,
                    token: spec.token.content.clone(),
                }
            })
        };
        let bos_id = id(&bos, "bos")?;
        let eos_id = id(&eos, "eos")?;
        let pad_id = id(&pad, "pad")?;
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            vocab_size,
        })
    }

    /// Tokenizes `prompt` into exactly [`Self::MAX_LEN`] ids.
    ///
    /// `truncated` is set when the prompt did not fit; `untruncated_len`
    /// is the length it would have had (bos and eos included), for the
    /// pipeline's "part of your input was truncated" warning.
    pub fn encode(&self, prompt: &str) -> Result<Encoded> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(TextError::tokenizer)?;
        let content = encoding.get_ids();
        let keep = content.len().min(Self::MAX_LEN - 2);
        let mut ids = Vec::with_capacity(Self::MAX_LEN);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos_id);
        ids.resize(Self::MAX_LEN, self.pad_id);
        let untruncated_len = content.len() + 2;
        Ok(Encoded {
            ids,
            truncated: untruncated_len > Self::MAX_LEN,
            untruncated_len,
        })
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>` (the largest id in real CLIP vocabularies; the
    /// text encoder's pooled output is taken at its position).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of ids of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

fn clip_normalizer() -> Result<NormalizerWrapper> {
    let replace = Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")
        .map_err(TextError::tokenizer)?;
    Ok(NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
        NFC.into(),
        replace.into(),
        Lowercase.into(),
    ])))
}

fn clip_pre_tokenizer() -> Result<PreTokenizerWrapper> {
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.to_string()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(TextError::tokenizer)?;
    Ok(PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(
        vec![split.into(), ByteLevel::new(false, true, true).into()],
    )))
}

/// Reads vocabulary, merges and added tokens from `tokenizer.json` if it
/// exists, else from `vocab.json` and `merges.txt`.
fn read_bpe_parts(dir: &Path) -> Result<BpeParts> {
    let tj = dir.join("tokenizer.json");
    if let Some(text) = read_text_opt(&tj)? {
        let root = parse_json(&tj, &text)?;
        let root = as_object(&tj, &root, "the file")?;
        let model = root
            .get("model")
            .ok_or_else(|| TextError::invalid(&tj, "no \"model\" section"))?;
        let model = as_object(&tj, model, "\"model\"")?;
        match model.get("type").and_then(Value::as_str) {
            None | Some("BPE") => {}
            Some(other) => {
                return Err(TextError::invalid(
                    &tj,
                    format!("model type is {other:?}, a CLIP tokenizer needs \"BPE\""),
                ));
            }
        }
        let vocab = model
            .get("vocab")
            .ok_or_else(|| TextError::invalid(&tj, "no \"model.vocab\""))?;
        let vocab = parse_vocab(&tj, vocab)?;
        let merges = model
            .get("merges")
            .ok_or_else(|| TextError::invalid(&tj, "no \"model.merges\""))?;
        let merges = parse_json_merges(&tj, merges)?;
        let added = parse_json_added_tokens(&tj, root)?;
        return Ok(BpeParts {
            vocab,
            merges,
            added,
            vocab_path: tj.clone(),
            merges_path: tj,
        });
    }

    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab_text = read_text(&vocab_path, NOTE_VOCAB)?;
    let merges_text = read_text(&merges_path, NOTE_VOCAB)?;
    let vocab = parse_vocab(&vocab_path, &parse_json(&vocab_path, &vocab_text)?)?;
    let merges = parse_merges_txt(&merges_path, &merges_text)?;
    Ok(BpeParts {
        vocab,
        merges,
        added: Vec::new(),
        vocab_path,
        merges_path,
    })
}

/// `{"token": id, ...}`
fn parse_vocab(path: &Path, value: &Value) -> Result<HashMap<String, u32>> {
    let obj = as_object(path, value, "the vocabulary")?;
    if obj.is_empty() {
        return Err(TextError::invalid(path, "the vocabulary is empty"));
    }
    obj.iter()
        .map(|(token, id)| {
            let id = id
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    TextError::invalid(path, format!("token {token:?} has an invalid id {id}"))
                })?;
            Ok((token.clone(), id))
        })
        .collect()
}

/// `merges.txt`: an optional `#version` line, then one `left right` pair a line.
fn parse_merges_txt(path: &Path, text: &str) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        merges.push(split_merge(line).ok_or_else(|| {
            TextError::invalid(
                path,
                format!("line {} is not a `left right` merge: {line:?}", n + 1),
            )
        })?);
    }
    Ok(merges)
}

fn split_merge(line: &str) -> Option<(String, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
            Some((a.to_string(), b.to_string()))
        }
        _ => None,
    }
}

/// `model.merges` of a `tokenizer.json`: `["a b", ...]` or `[["a", "b"], ...]`.
fn parse_json_merges(path: &Path, value: &Value) -> Result<Vec<(String, String)>> {
    let list = value
        .as_array()
        .ok_or_else(|| TextError::invalid(path, "\"model.merges\" is not an array"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                Value::String(s) => split_merge(s),
                Value::Array(p) => match p.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| {
                TextError::invalid(path, format!("merge #{i} is not a pair of tokens: {m}"))
            })
        })
        .collect()
}
