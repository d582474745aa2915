//! Loading errors name the file and say what is wrong.

use std::path::{Path, PathBuf};

use sd_text::{ClipTokenizer, T5Tokenizer, TextError};

fn tokenizer_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/tokenizers")
        .join(name)
}

/// A temporary copy of a tokenizer directory, minus `skip`.
fn copy_dir(name: &str, skip: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(tokenizer_dir(name)).expect("read dir") {
        let entry = entry.expect("entry");
        let file = entry.file_name();
        if skip.iter().any(|s| file == *s) {
            continue;
        }
        std::fs::copy(entry.path(), tmp.path().join(&file)).expect("copy");
    }
    tmp
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

fn clip_err(dir: &Path) -> TextError {
    ClipTokenizer::from_dir(dir).expect_err("loading should fail")
}

fn t5_err(dir: &Path) -> TextError {
    T5Tokenizer::from_dir(dir).expect_err("loading should fail")
}

#[test]
fn missing_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gone = tmp.path().join("nope");
    let err = clip_err(&gone);
    assert!(
        matches!(&err, TextError::MissingDir { path } if *path == gone),
        "{err}"
    );
    assert!(err.to_string().contains("nope"));
    let err = t5_err(&gone);
    assert!(matches!(err, TextError::MissingDir { .. }), "{err}");
    // a file is not a directory
    let file = tokenizer_dir("clip").join("vocab.json");
    assert!(matches!(clip_err(&file), TextError::MissingDir { .. }));
}

#[test]
fn clip_missing_vocab_or_merges() {
    let tmp = copy_dir("clip", &["tokenizer.json", "vocab.json"]);
    let err = clip_err(tmp.path());
    match &err {
        TextError::MissingFile { path, .. } => assert!(path.ends_with("vocab.json")),
        other => panic!("unexpected {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("vocab.json") && msg.contains("tokenizer.json"),
        "{msg}"
    );

    let tmp = copy_dir("clip", &["tokenizer.json", "merges.txt"]);
    let err = clip_err(tmp.path());
    assert!(
        matches!(&err, TextError::MissingFile { path, .. } if path.ends_with("merges.txt")),
        "{err}"
    );
}

#[test]
fn t5_missing_tokenizer_json() {
    let tmp = copy_dir("t5", &["tokenizer.json"]);
    let err = t5_err(tmp.path());
    assert!(
        matches!(&err, TextError::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );
}

#[test]
fn corrupt_json_files() {
    // truncated tokenizer.json
    for name in ["clip", "t5"] {
        let tmp = copy_dir(name, &[]);
        let text = std::fs::read_to_string(tmp.path().join("tokenizer.json")).expect("read");
        write(tmp.path(), "tokenizer.json", &text[..text.len() / 2]);
        let err = if name == "clip" {
            clip_err(tmp.path())
        } else {
            t5_err(tmp.path())
        };
        assert!(
            matches!(&err, TextError::Json { path, .. } if path.ends_with("tokenizer.json")),
            "{name}: {err}"
        );
        assert!(err.to_string().contains("malformed JSON"), "{err}");
    }
    // vocab.json that is not JSON
    let tmp = copy_dir("clip", &["tokenizer.json"]);
    write(tmp.path(), "vocab.json", "{\"a\": 1,");
    let err = clip_err(tmp.path());
    assert!(
        matches!(&err, TextError::Json { path, .. } if path.ends_with("vocab.json")),
        "{err}"
    );
    // tokenizer_config.json that is not JSON
    let tmp = copy_dir("clip_g", &[]);
    write(tmp.path(), "tokenizer_config.json", "pad_token: !");
    let err = clip_err(tmp.path());
    assert!(
        matches!(&err, TextError::Json { path, .. } if path.ends_with("tokenizer_config.json")),
        "{err}"
    );
    // not UTF-8
    let tmp = copy_dir("clip", &["tokenizer.json"]);
    std::fs::write(tmp.path().join("merges.txt"), [0xff, 0xfe, 0x00]).expect("write");
    let err = clip_err(tmp.path());
    assert!(
        matches!(&err, TextError::Invalid { path, .. } if path.ends_with("merges.txt")),
        "{err}"
    );
}

#[test]
fn invalid_contents() {
    // a merges line with three parts
    let tmp = copy_dir("clip", &["tokenizer.json"]);
    write(tmp.path(), "merges.txt", "#version: 0.2\na b c\n");
    let err = clip_err(tmp.path());
    assert!(
        matches!(&err, TextError::Invalid { path, reason } if path.ends_with("merges.txt") && reason.contains("line 2")),
        "{err}"
    );
    // a merge of tokens the vocabulary lacks
    write(tmp.path(), "merges.txt", "#version: 0.2\nqqq zzz\n");
    let err = clip_err(tmp.path());
    assert!(matches!(err, TextError::Invalid { .. }), "{err}");
    // a vocabulary id that is not a number
    write(tmp.path(), "vocab.json", "{\"a\": \"x\"}");
    let err = clip_err(tmp.path());
    assert!(
        matches!(&err, TextError::Invalid { path, .. } if path.ends_with("vocab.json")),
        "{err}"
    );
    // T5 needs a unigram model
    let tmp = copy_dir("t5", &[]);
    let clip_json =
        std::fs::read_to_string(tokenizer_dir("clip").join("tokenizer.json")).expect("read");
    write(tmp.path(), "tokenizer.json", &clip_json);
    let err = t5_err(tmp.path());
    assert!(
        matches!(&err, TextError::Invalid { reason, .. } if reason.contains("Unigram")),
        "{err}"
    );
    // and CLIP a BPE one
    let tmp = copy_dir("clip", &[]);
    let t5_json =
        std::fs::read_to_string(tokenizer_dir("t5").join("tokenizer.json")).expect("read");
    write(tmp.path(), "tokenizer.json", &t5_json);
    let err = clip_err(tmp.path());
    assert!(
        matches!(&err, TextError::Invalid { reason, .. } if reason.contains("BPE")),
        "{err}"
    );
}

#[test]
fn missing_special_tokens() {
    // pad token not in the vocabulary (tokenizer_config.json wins)
    let tmp = copy_dir("clip_g", &["tokenizer.json"]);
    let config = std::fs::read_to_string(tmp.path().join("tokenizer_config.json")).expect("read");
    let config = config.replace("\"pad_token\": \"!\"", "\"pad_token\": \"<|padding|>\"");
    write(tmp.path(), "tokenizer_config.json", &config);
    let err = clip_err(tmp.path());
    match &err {
        TextError::MissingSpecialToken { role, token, path } => {
            assert_eq!(*role, "pad");
            assert_eq!(token, "<|padding|>");
            assert!(path.ends_with("vocab.json"));
        }
        other => panic!("unexpected {other}"),
    }
    // vocabulary without <|endoftext|>
    let tmp = copy_dir("clip", &["tokenizer.json"]);
    let vocab = std::fs::read_to_string(tmp.path().join("vocab.json")).expect("read");
    write(
        tmp.path(),
        "vocab.json",
        &vocab.replace("<|endoftext|>", "<|end|>"),
    );
    let err = clip_err(tmp.path());
    assert!(
        matches!(&err, TextError::MissingSpecialToken { token, .. } if token == "<|endoftext|>"),
        "{err}"
    );
    // T5 eos missing
    let tmp = copy_dir("t5", &[]);
    let config = std::fs::read_to_string(tmp.path().join("tokenizer_config.json")).expect("read");
    write(
        tmp.path(),
        "tokenizer_config.json",
        &config.replace("\"eos_token\": \"</s>\"", "\"eos_token\": \"<eos>\""),
    );
    let err = t5_err(tmp.path());
    assert!(
        matches!(&err, TextError::MissingSpecialToken { role: "eos", .. }),
        "{err}"
    );
}

#[test]
fn config_files_are_optional() {
    // without config files the CLIP defaults apply: pad = <|endoftext|>
    let tmp = copy_dir(
        "clip_g",
        &["tokenizer_config.json", "special_tokens_map.json"],
    );
    let tok = ClipTokenizer::from_dir(tmp.path()).expect("load");
    assert_eq!(tok.pad_id(), tok.eos_id());
    // legacy layout: special_tokens_map.json alone decides the pad token
    let tmp = copy_dir("clip_g", &["tokenizer_config.json", "tokenizer.json"]);
    let tok = ClipTokenizer::from_dir(tmp.path()).expect("load");
    assert_eq!(tok.pad_id(), 0);
    let tmp = copy_dir("t5", &["tokenizer_config.json", "special_tokens_map.json"]);
    let tok = T5Tokenizer::from_dir(tmp.path()).expect("load");
    assert_eq!((tok.pad_id(), tok.eos_id()), (0, 1));
}

#[test]
fn t5_zero_max_len() {
    let tok = T5Tokenizer::from_dir(tokenizer_dir("t5")).expect("load");
    let err = tok.encode("a cat", 0).expect_err("max_len 0");
    assert!(matches!(err, TextError::InvalidMaxLen(0)), "{err}");
}
