//! Reading the files of a Hugging Face tokenizer directory.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, TextError};

/// Fails unless `dir` is an existing directory.
pub(crate) fn check_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(TextError::MissingDir {
            path: dir.to_path_buf(),
        })
    }
}

/// Reads a UTF-8 file; `Ok(None)` when it does not exist.
pub(crate) fn read_text_opt(path: &Path) -> Result<Option<String>> {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|e| TextError::invalid(path, format!("not UTF-8 text ({e})"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TextError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads a UTF-8 file that must exist.
pub(crate) fn read_text(path: &Path, note: &'static str) -> Result<String> {
    read_text_opt(path)?.ok_or_else(|| TextError::MissingFile {
        path: path.to_path_buf(),
        note,
    })
}

/// Parses JSON text read from `path`.
pub(crate) fn parse_json(path: &Path, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|source| TextError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub(crate) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    read_text_opt(path)?
        .map(|text| parse_json(path, &text))
        .transpose()
}

/// Reads a JSON file that must exist.
pub(crate) fn read_json(path: &Path, note: &'static str) -> Result<Value> {
    let text = read_text(path, note)?;
    parse_json(path, &text)
}

/// Returns `value` as an object or an error naming `path` and `what`.
pub(crate) fn as_object<'a>(
    path: &Path,
    value: &'a Value,
    what: &str,
) -> Result<&'a Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| TextError::invalid(path, format!("{what} is not a JSON object")))
}

fn get_bool(path: &Path, obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(TextError::invalid(
            path,
            format!("field {key:?} of an added token is not a boolean"),
        )),
    }
}

/// Parses a serialized added token: `{"content": .., "lstrip": .., ...}`.
///
/// Defaults follow `transformers.AddedToken`: `normalized = !special`.
/// `force_special` marks the token special whatever the file says (used for
/// the bos/eos/pad/unk entries of `special_tokens_map.json`).
pub(crate) fn parse_added_token(
    path: &Path,
    value: &Value,
    force_special: bool,
) -> Result<AddedToken> {
    let obj = as_object(path, value, "an added token")?;
    let content = obj
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| TextError::invalid(path, "an added token has no string \"content\""))?;
    let special = force_special || get_bool(path, obj, "special", false)?;
    Ok(AddedToken::from(content.to_string(), special)
        .single_word(get_bool(path, obj, "single_word", false)?)
        .lstrip(get_bool(path, obj, "lstrip", false)?)
        .rstrip(get_bool(path, obj, "rstrip", false)?)
        .normalized(get_bool(path, obj, "normalized", !special)?))
}

/// An added token with the id its file says it has (if any).
#[derive(Debug, Clone)]
pub(crate) struct AddedSpec {
    pub(crate) token: AddedToken,
    pub(crate) id: Option<u32>,
    pub(crate) path: PathBuf,
}

/// Parses the `"added_tokens"` array of a `tokenizer.json`.
pub(crate) fn parse_json_added_tokens(
    path: &Path,
    root: &Map<String, Value>,
) -> Result<Vec<AddedSpec>> {
    let Some(list) = root.get("added_tokens") else {
        return Ok(Vec::new());
    };
    if list.is_null() {
        return Ok(Vec::new());
    }
    let list = list
        .as_array()
        .ok_or_else(|| TextError::invalid(path, "\"added_tokens\" is not an array"))?;
    list.iter()
        .map(|v| {
            let token = parse_added_token(path, v, false)?;
            let id = v
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    TextError::invalid(
                        path,
                        format!("added token {:?} has no valid \"id\"", token.content),
                    )
                })?;
            Ok(AddedSpec {
                token,
                id: Some(id),
                path: path.to_path_buf(),
            })
        })
        .collect()
}

/// What `tokenizer_config.json` and `special_tokens_map.json` say about
/// special and added tokens.
#[derive(Debug)]
pub(crate) struct TokenConfig {
    config_path: PathBuf,
    config: Map<String, Value>,
    map_path: PathBuf,
    map: Map<String, Value>,
    /// `added_tokens_decoder` of `tokenizer_config.json`, in id order.
    added: Vec<AddedSpec>,
    has_added_decoder: bool,
}

impl TokenConfig {
    /// Loads both files from `dir`; absent files count as empty.
    pub(crate) fn load(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = match read_json_opt(&config_path)? {
            Some(v) => as_object(&config_path, &v, "the file")?.clone(),
            None => Map::new(),
        };
        let map = match read_json_opt(&map_path)? {
            Some(v) => as_object(&map_path, &v, "the file")?.clone(),
            None => Map::new(),
        };
        let mut added = Vec::new();
        let has_added_decoder = config.contains_key("added_tokens_decoder");
        if let Some(decoder) = config.get("added_tokens_decoder") {
            let decoder = as_object(&config_path, decoder, "\"added_tokens_decoder\"")?;
            for (key, value) in decoder {
                let id: u32 = key.parse().map_err(|_| {
                    TextError::invalid(
                        &config_path,
                        format!("\"added_tokens_decoder\" key {key:?} is not a token id"),
                    )
                })?;
                added.push(AddedSpec {
                    token: parse_added_token(&config_path, value, false)?,
                    id: Some(id),
                    path: config_path.clone(),
                });
            }
            added.sort_by_key(|a| a.id);
        }
        Ok(Self {
            config_path,
            config,
            map_path,
            map,
            added,
            has_added_decoder,
        })
    }

    /// The tokens of `added_tokens_decoder`.
    pub(crate) fn added_tokens(&self) -> &[AddedSpec] {
        &self.added
    }

    /// The special token stored under `key` (e.g. `"pad_token"`), or
    /// `default` when neither file names one.
    ///
    /// Like transformers: with an `added_tokens_decoder` in
    /// `tokenizer_config.json` that file wins, otherwise (legacy layout)
    /// `special_tokens_map.json` does. The token's flags come from
    /// `added_tokens_decoder` when it lists the same text.
    pub(crate) fn special(&self, key: &str, default: &str) -> Result<AddedSpec> {
        let from_config = self
            .config
            .get(key)
            .filter(|v| !v.is_null())
            .map(|v| (&self.config_path, v));
        let from_map = self
            .map
            .get(key)
            .filter(|v| !v.is_null())
            .map(|v| (&self.map_path, v));
        let chosen = if self.has_added_decoder {
            from_config.or(from_map)
        } else {
            from_map.or(from_config)
        };
        let (path, token) = match chosen {
            None => (
                self.config_path.clone(),
                AddedToken::from(default.to_string(), true),
            ),
            Some((path, Value::String(s))) => (path.clone(), AddedToken::from(s.clone(), true)),
            Some((path, v @ Value::Object(_))) => (path.clone(), parse_added_token(path, v, true)?),
            Some((path, _)) => {
                return Err(TextError::invalid(
                    path,
                    format!("{key:?} is neither a string nor a token object"),
                ));
            }
        };
        if let Some(known) = self.added.iter().find(|a| a.token.content == token.content) {
            return Ok(AddedSpec {
                token: known.token.clone(),
                id: known.id,
                path: known.path.clone(),
            });
        }
        Ok(AddedSpec {
            token,
            id: None,
            path,
        })
    }

    /// The strings of `additional_special_tokens` (either file).
    pub(crate) fn additional_special(&self) -> Result<Vec<AddedSpec>> {
        let chosen = if self.has_added_decoder {
            self.config
                .get("additional_special_tokens")
                .map(|v| (&self.config_path, v))
                .or_else(|| {
                    self.map
                        .get("additional_special_tokens")
                        .map(|v| (&self.map_path, v))
                })
        } else {
            self.map
                .get("additional_special_tokens")
                .map(|v| (&self.map_path, v))
                .or_else(|| {
                    self.config
                        .get("additional_special_tokens")
                        .map(|v| (&self.config_path, v))
                })
        };
        let Some((path, list)) = chosen else {
            return Ok(Vec::new());
        };
        if list.is_null() {
            return Ok(Vec::new());
        }
        let list = list.as_array().ok_or_else(|| {
            TextError::invalid(path, "\"additional_special_tokens\" is not an array")
        })?;
        list.iter()
            .map(|v| {
                let token = match v {
                    Value::String(s) => AddedToken::from(s.clone(), true),
                    other => parse_added_token(path, other, true)?,
                };
                let known = self.added.iter().find(|a| a.token.content == token.content);
                Ok(match known {
                    Some(k) => k.clone(),
                    None => AddedSpec {
                        token,
                        id: None,
                        path: path.clone(),
                    },
                })
            })
            .collect()
    }
}

/// Registers added tokens on `tokenizer` (first occurrence of a text wins)
/// and checks that each gets the id its file gave it.
pub(crate) fn register_added(tokenizer: &mut Tokenizer, specs: &[AddedSpec]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for spec in specs {
        if spec.token.content.is_empty() {
            return Err(TextError::invalid(&spec.path, "an added token is empty"));
        }
        if !seen.insert(spec.token.content.clone()) {
            continue;
        }
        let token = std::slice::from_ref(&spec.token);
        if spec.token.special {
            tokenizer.add_special_tokens(token);
        } else {
            tokenizer.add_tokens(token);
        }
        let got = tokenizer.token_to_id(&spec.token.content);
        if let Some(want) = spec.id {
            if got != Some(want) {
                return Err(TextError::invalid(
                    &spec.path,
                    format!(
                        "added token {:?} is listed with id {want}, but the vocabulary gives it {}",
                        spec.token.content,
                        got.map_or_else(|| "no id".to_string(), |g| format!("id {g}")),
                    ),
                ));
            }
        }
    }
    Ok(())
}
