//! Layer-name patterns: `*` matches any run of characters (dots included); everything
//! else matches itself. A pattern must match the whole name.

pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p = pattern.as_bytes();
    let n = name.as_bytes();
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("proj_out", "proj_out"));
        assert!(!glob_match("proj_out", "proj_out2"));
        assert!(glob_match(
            "time_text_embed.*",
            "time_text_embed.text_embedder.linear_1"
        ));
        assert!(glob_match(
            "*.norm1.linear",
            "transformer_blocks.3.norm1.linear"
        ));
        assert!(!glob_match(
            "*.norm1.linear",
            "transformer_blocks.3.norm1_context.linear"
        ));
        assert!(glob_match(
            "transformer_blocks.*.attn.to_*",
            "transformer_blocks.1.attn.to_q"
        ));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acbd"));
    }
}
