//! The tokenizers reproduce, id for id, what diffusers' SD3 pipeline gets
//! from transformers for the prompts of `fixtures/token_ids.json` (made by
//! `scripts/make_tiny_tokenizers.py`).

use std::path::{Path, PathBuf};

use sd_text::{ClipTokenizer, Encoded, T5Tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    clip: Specials,
    clip_g: Specials,
    t5: Specials,
    prompts: Vec<Entry>,
}

#[derive(Deserialize)]
struct Specials {
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: u32,
    pad_id: u32,
}

#[derive(Deserialize)]
struct Entry {
    prompt: String,
    clip: Expected,
    clip_g: Expected,
    t5_256: Expected,
    t5_77: Expected,
}

#[derive(Deserialize)]
struct Expected {
    ids: Vec<u32>,
    untruncated_len: usize,
    truncated: bool,
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer_dir(name: &str) -> PathBuf {
    crate_dir().join("../../models/tokenizers").join(name)
}

fn fixture() -> Fixture {
    let path = crate_dir().join("tests/fixtures/token_ids.json");
    let text = std::fs::read_to_string(&path).expect("read fixture");
    serde_json::from_str(&text).expect("parse fixture")
}

/// Copies the files of a CLIP tokenizer directory except `tokenizer.json`,
/// which leaves what real SD3 checkpoints ship.
fn without_tokenizer_json(src: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for name in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(name), tmp.path().join(name)).expect("copy");
    }
    tmp
}

fn check(what: &str, prompt: &str, got: &Encoded, want: &Expected) {
    assert_eq!(got.ids, want.ids, "{what}: ids of {prompt:?}");
    assert_eq!(
        got.truncated, want.truncated,
        "{what}: truncated flag of {prompt:?}"
    );
    assert_eq!(
        got.untruncated_len, want.untruncated_len,
        "{what}: untruncated length of {prompt:?}"
    );
}

fn check_clip(tok: &ClipTokenizer, what: &str, specials: &Specials, pick: fn(&Entry) -> &Expected) {
    assert_eq!(tok.vocab_size(), specials.vocab_size, "{what}: vocab size");
    assert_eq!(Some(tok.bos_id()), specials.bos_id, "{what}: bos id");
    assert_eq!(tok.eos_id(), specials.eos_id, "{what}: eos id");
    assert_eq!(tok.pad_id(), specials.pad_id, "{what}: pad id");
    let fx = fixture();
    assert!(fx.prompts.len() >= 40);
    for entry in &fx.prompts {
        let got = tok.encode(&entry.prompt).expect("encode");
        assert_eq!(got.ids.len(), ClipTokenizer::MAX_LEN);
        check(what, &entry.prompt, &got, pick(entry));
    }
}

#[test]
fn clip_l_from_tokenizer_json() {
    let fx = fixture();
    let tok = ClipTokenizer::from_dir(tokenizer_dir("clip")).expect("load clip");
    check_clip(&tok, "clip (tokenizer.json)", &fx.clip, |e| &e.clip);
}

#[test]
fn clip_l_from_vocab_and_merges() {
    let fx = fixture();
    let tmp = without_tokenizer_json(&tokenizer_dir("clip"));
    let tok = ClipTokenizer::from_dir(tmp.path()).expect("load clip");
    check_clip(&tok, "clip (vocab+merges)", &fx.clip, |e| &e.clip);
}

#[test]
fn clip_g_from_tokenizer_json() {
    let fx = fixture();
    let tok = ClipTokenizer::from_dir(tokenizer_dir("clip_g")).expect("load clip_g");
    check_clip(&tok, "clip_g (tokenizer.json)", &fx.clip_g, |e| &e.clip_g);
}

#[test]
fn clip_g_from_vocab_and_merges() {
    let fx = fixture();
    let tmp = without_tokenizer_json(&tokenizer_dir("clip_g"));
    let tok = ClipTokenizer::from_dir(tmp.path()).expect("load clip_g");
    check_clip(&tok, "clip_g (vocab+merges)", &fx.clip_g, |e| &e.clip_g);
}

#[test]
fn t5_matches_fixture() {
    let fx = fixture();
    let tok = T5Tokenizer::from_dir(tokenizer_dir("t5")).expect("load t5");
    assert_eq!(tok.vocab_size(), fx.t5.vocab_size, "t5 vocab size");
    assert_eq!(tok.eos_id(), fx.t5.eos_id);
    assert_eq!(tok.pad_id(), fx.t5.pad_id);
    for entry in &fx.prompts {
        for (len, want) in [(256, &entry.t5_256), (77, &entry.t5_77)] {
            let got = tok.encode(&entry.prompt, len).expect("encode");
            assert_eq!(got.ids.len(), len);
            check(&format!("t5 L={len}"), &entry.prompt, &got, want);
        }
    }
}

#[test]
fn fixture_covers_truncation() {
    let fx = fixture();
    let flags = |pick: fn(&Entry) -> &Expected| {
        let n = fx.prompts.iter().filter(|e| pick(e).truncated).count();
        (n, fx.prompts.len() - n)
    };
    for (name, pick) in [
        ("clip", (|e| &e.clip) as fn(&Entry) -> &Expected),
        ("t5_256", |e| &e.t5_256),
        ("t5_77", |e| &e.t5_77),
    ] {
        let (cut, whole) = flags(pick);
        assert!(
            cut > 0 && whole > 0,
            "{name}: fixture lacks truncated or whole prompts"
        );
    }
}

#[test]
fn clip_truncation_keeps_eos_last() {
    let tok = ClipTokenizer::from_dir(tokenizer_dir("clip")).expect("load clip");
    let long = "cat ".repeat(200);
    let enc = tok.encode(&long).expect("encode");
    assert!(enc.truncated);
    assert_eq!(enc.untruncated_len, 202);
    assert_eq!(enc.ids.first(), Some(&tok.bos_id()));
    assert_eq!(enc.ids.last(), Some(&tok.eos_id()));
    // exactly 75 prompt tokens fit: not truncated
    let fits = "cat ".repeat(75);
    let enc = tok.encode(&fits).expect("encode");
    assert!(!enc.truncated);
    assert_eq!(enc.untruncated_len, 77);
}

#[test]
fn t5_short_max_len() {
    let tok = T5Tokenizer::from_dir(tokenizer_dir("t5")).expect("load t5");
    let enc = tok.encode("a photo of a cat", 1).expect("encode");
    assert_eq!(enc.ids, vec![tok.eos_id()]);
    assert!(enc.truncated);
    let enc = tok.encode("", 1).expect("encode");
    assert_eq!(enc.ids, vec![tok.eos_id()]);
    assert!(!enc.truncated);
    assert_eq!(enc.untruncated_len, 1);
    let enc = tok.encode("a photo of a cat", 3).expect("encode");
    assert_eq!(enc.ids.len(), 3);
    assert_eq!(enc.ids.last(), Some(&tok.eos_id()));
}

/// Arbitrary text never makes the tokenizers fail or panic.
#[test]
fn odd_inputs_do_not_fail() {
    let clip = ClipTokenizer::from_dir(tokenizer_dir("clip_g")).expect("load clip_g");
    let t5 = T5Tokenizer::from_dir(tokenizer_dir("t5")).expect("load t5");
    let pieces = [
        "\u{0}",
        "\u{7f}",
        "\u{200b}",
        "\u{feff}",
        "\u{fffd}",
        "\u{10ffff}",
        "\u{301}",
        "e\u{301}",
        "İ",
        "ß",
        "ﬃ",
        "\r\n",
        "\t",
        " ",
        "<|endoftext|>",
        "<pad>",
        "</s>",
        "<extra_id_5>",
        "!",
        "'s",
        "🧑‍🚀",
        "ǅ",
        "Ω",
        "℃",
        "a",
        "Z",
        "9",
        "漢",
    ];
    // deterministic pseudo-random strings built from the pieces above
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..300 {
        let mut s = String::new();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 40) as usize;
        for _ in 0..len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            s.push_str(pieces[(state % pieces.len() as u64) as usize]);
        }
        let c = clip.encode(&s).expect("clip encode");
        assert_eq!(c.ids.len(), 77);
        assert!(c.ids.iter().all(|&id| (id as usize) < clip.vocab_size()));
        let t = t5.encode(&s, 256).expect("t5 encode");
        assert_eq!(t.ids.len(), 256);
        assert!(t.ids.iter().all(|&id| (id as usize) < t5.vocab_size()));
    }
}
