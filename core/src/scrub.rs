//! The one place secrets are removed from text that may reach a client, a log or a table.
//!
//! Every error or status text derived from the network or configuration passes through [`scrub`] before it is
//! raised, logged or stored. It removes the configured secret values verbatim, AWS access key ids, and the
//! signature/credential/token parts of SigV4 headers or presigned query strings.

const REDACTED: &str = "[REDACTED]";

fn is_key_id_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit()
}

/// Replaces AWS access key ids (AKIA/ASIA/AROA/AIDA... + 16 upper-case alphanumerics).
fn redact_access_key_ids(text: &str) -> String {
    const PREFIXES: [&str; 6] = ["AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA"];
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let preceded_by_word = i > 0 && is_key_id_char(bytes[i - 1]);
        if !preceded_by_word && PREFIXES.iter().any(|p| rest.starts_with(p)) {
            let run = rest.bytes().take_while(|b| is_key_id_char(*b)).count();
            if run == 20 {
                out.push_str(REDACTED);
                i += run;
                continue;
            }
        }
        let ch = rest.chars().next().expect("non-empty");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Replaces the value after each `name=` (up to a delimiter) for SigV4's sensitive fields.
fn redact_fields(text: &str) -> String {
    const FIELDS: [&str; 6] = [
        "Signature=",
        "Credential=",
        "X-Amz-Signature=",
        "X-Amz-Credential=",
        "X-Amz-Security-Token=",
        "aws_secret_access_key=",
    ];
    let mut out = text.to_string();
    for field in FIELDS {
        let mut from = 0;
        while let Some(pos) = out[from..].find(field) {
            let start = from + pos + field.len();
            let end = out[start..]
                .find(|c: char| c == ',' || c == '&' || c == '"' || c == '\'' || c.is_whitespace())
                .map_or(out.len(), |e| start + e);
            out.replace_range(start..end, REDACTED);
            from = start + REDACTED.len();
        }
    }
    out
}

/// Removes secrets from `text`. `known` are secret values currently configured (e.g. the secret access key GUC);
/// empty and very short values are ignored so that scrubbing never mangles ordinary text.
pub fn scrub(text: &str, known: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in known.iter().filter(|s| s.len() >= 8) {
        out = out.replace(secret, REDACTED);
    }
    redact_fields(&redact_access_key_ids(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_configured_secrets_verbatim() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let text = format!("request failed with secret {secret} in it");
        let s = scrub(&text, &[secret]);
        assert!(!s.contains(secret));
        assert!(s.contains(REDACTED));
    }

    #[test]
    fn removes_access_key_ids_but_not_lookalikes() {
        let s = scrub("key AKIAIOSFODNN7EXAMPLE denied", &[]);
        assert_eq!(s, "key [REDACTED] denied");
        let s = scrub("(ASIAIOSFODNN7EXAMPLE)", &[]);
        assert_eq!(s, "([REDACTED])");
        assert_eq!(scrub("AKIA is a prefix", &[]), "AKIA is a prefix");
        assert_eq!(scrub("XAKIAIOSFODNN7EXAMPLE", &[]), "XAKIAIOSFODNN7EXAMPLE");
    }

    #[test]
    fn removes_sigv4_fields() {
        let header = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
        let s = scrub(header, &[]);
        assert!(!s.contains("AKIDEXAMPLE") && !s.contains("5d672d79"), "{s}");
        assert!(s.contains("SignedHeaders=host"));
        let q = scrub("https://h/?X-Amz-Security-Token=FQoGZXIvYXdz&X-Amz-Date=1", &[]);
        assert!(!q.contains("FQoGZXIvYXdz") && q.contains("X-Amz-Date=1"), "{q}");
    }

    #[test]
    fn leaves_ordinary_text_and_short_values_alone() {
        let text = "dispatch failure: connection refused (os error 111) to http://127.0.0.1:1/000000000000/q";
        assert_eq!(scrub(text, &["", "test"]), text);
    }
}
