//! Deterministic, keyed masking tokens.
//!
//! Token format (printable ASCII, fits `varchar(256)` for plaintexts up to [`MAX_PLAINTEXT_BYTES`]):
//!
//! ```text
//! enc:<key_id>:<base64url(nonce[12] || ciphertext || tag[16])>   reversible (AES-256-GCM, synthetic IV)
//! hmac:<key_id>:<base64url(HMAC-SHA256[32])>                      irreversible
//! ```
//!
//! `enc`: the nonce is `HMAC-SHA256(siv_key, key_id || plaintext)[..12]`, so equal plaintexts under one key give
//! equal tokens (deterministic encryption, as in AES-SIV). The AAD binds the method and key id, and decryption
//! re-derives the nonce from the recovered plaintext and compares it, so a token whose nonce, tag, key id or
//! ciphertext was altered is refused rather than decrypted to garbage.
//!
//! Each 256-bit master key is expanded into independent subkeys by HMAC-SHA256 with distinct labels, so the
//! `hmac` method never reveals the `enc` nonce of the same value.
//!
//! Why `enc` is sound (docs/security.md, "Deterministic encryption", gives the same argument for users): it follows the
//! SIV pattern of Rogaway and Shrimpton (deterministic authenticated encryption, EUROCRYPT 2006) with HMAC-SHA256
//! as the PRF that derives the IV and AES-256-GCM as the IV-based encryption, under independent subkeys. A
//! nonce repeats for two *different* values of one key only on a 96-bit PRF collision (birthday bound
//! q²/2⁹⁷: about 2⁻³³ after all 2³² IPv4 addresses), so GCM never sees a reused nonce in practice; equal values
//! repeat nonce *and* plaintext, which reveals only their equality (the purpose of deterministic masking). A
//! forged token must pass GCM's tag and then re-derive its own nonce from the decrypted value. Leaked by design:
//! equality under one key, and the value's exact length. AES-GCM-SIV (RFC 8452) follows the same pattern (its IV
//! is AES of a POLYVAL hash); tokens keep this format because 0.3.0 tokens are stored in users' tables.

use crate::prf::PrekeyedHmac;
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// Master key length (AES-256).
pub const KEY_BYTES: usize = 32;
/// Largest value a token is guaranteed to fit `varchar(256)` for: `enc:` + 10-digit key id + 208 base64 chars.
pub const MAX_PLAINTEXT_BYTES: usize = 128;
/// Longest token [`mask`] produces for a [`MAX_PLAINTEXT_BYTES`] input and any `i32` key id.
pub const MAX_TOKEN_CHARS: usize = 4 + 10 + 1 + 208;

const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;

/// Masking method. `Encrypt` is reversible by `unmask`; `Hmac` is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Encrypt,
    Hmac,
}

impl Method {
    pub fn parse(name: &str) -> Result<Method, MaskError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "encrypt" | "enc" => Ok(Method::Encrypt),
            "hmac" => Ok(Method::Hmac),
            _ => Err(MaskError::UnknownMethod(name.chars().take(32).collect())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Encrypt => "encrypt",
            Method::Hmac => "hmac",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Method::Encrypt => "enc",
            Method::Hmac => "hmac",
        }
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum MaskError {
    #[error("unknown masking method \"{0}\"")]
    UnknownMethod(String),
    #[error("value is {0} bytes; masking accepts at most {MAX_PLAINTEXT_BYTES}")]
    PlaintextTooLong(usize),
    #[error("not a masking token: expected \"enc:<key id>:<payload>\" or \"hmac:<key id>:<payload>\"")]
    Malformed,
    #[error("token was masked with method hmac, which is irreversible")]
    Irreversible,
    #[error("token refers to key id {0}, which does not exist in this database")]
    UnknownKey(i32),
    #[error("token failed verification: it was altered, truncated, or made with another key")]
    Tampered,
    #[error("master key must be exactly {KEY_BYTES} bytes")]
    BadKeyLength,
    #[error("token is {0} characters; no valid token is longer than {MAX_TOKEN_CHARS}")]
    TokenTooLong(usize),
}

/// A parsed token: method, key id and raw payload bytes. Says nothing about validity until [`Keyring::unmask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub method: Method,
    pub key_id: i32,
    pub payload: Vec<u8>,
}

impl Token {
    pub fn parse(text: &str) -> Result<Token, MaskError> {
        // Bounded before any decoding: a caller must not make the server base64-decode and decrypt megabytes.
        if text.len() > MAX_TOKEN_CHARS {
            return Err(MaskError::TokenTooLong(text.len()));
        }
        let mut parts = text.splitn(3, ':');
        let (Some(prefix), Some(kid), Some(payload)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(MaskError::Malformed);
        };
        let method = match prefix {
            "enc" => Method::Encrypt,
            "hmac" => Method::Hmac,
            _ => return Err(MaskError::Malformed),
        };
        if kid.is_empty() || kid.len() > 10 || !kid.bytes().all(|b| b.is_ascii_digit()) || kid.starts_with('0') {
            return Err(MaskError::Malformed);
        }
        let key_id: i32 = kid.parse().map_err(|_| MaskError::Malformed)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| MaskError::Malformed)?;
        let well_sized = match method {
            Method::Encrypt => payload.len() >= NONCE_BYTES + TAG_BYTES,
            Method::Hmac => payload.len() == 32,
        };
        if !well_sized {
            return Err(MaskError::Malformed);
        }
        Ok(Token { method, key_id, payload })
    }
}

/// The subkeys of one master key, ready to use (AES key schedule and HMAC states precomputed).
#[derive(Clone)]
pub struct KeyMaterial {
    id: i32,
    /// "enc:<id>:" and "hmac:<id>:", formatted once.
    prefixes: [String; 2],
    siv_mac: PrekeyedHmac,
    siv_aead: Aes256Gcm,
    hmac: PrekeyedHmac,
    blob_aead: Aes256Gcm,
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key bytes, not even in debug output.
        f.debug_struct("KeyMaterial").field("id", &self.id).finish_non_exhaustive()
    }
}

fn subkey(master: &[u8], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(master).expect("HMAC accepts any key length");
    mac.update(b"sqs_ingest/v1/");
    mac.update(label);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

impl KeyMaterial {
    pub fn new(id: i32, master: &[u8]) -> Result<KeyMaterial, MaskError> {
        if master.len() != KEY_BYTES {
            return Err(MaskError::BadKeyLength);
        }
        let mac = |label: &[u8]| PrekeyedHmac::new(&*subkey(master, label));
        let aead = |label: &[u8]| Aes256Gcm::new_from_slice(&*subkey(master, label)).expect("32 bytes");
        Ok(KeyMaterial {
            id,
            prefixes: [format!("enc:{id}:"), format!("hmac:{id}:")],
            siv_mac: mac(b"siv-mac"),
            siv_aead: aead(b"siv-enc"),
            hmac: mac(b"hmac"),
            blob_aead: aead(b"blob"),
        })
    }

    pub fn id(&self) -> i32 {
        self.id
    }

    fn synthetic_nonce(&self, plaintext: &[u8]) -> [u8; NONCE_BYTES] {
        let full = self.siv_mac.mac(&[&self.id.to_be_bytes(), plaintext]);
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&full[..NONCE_BYTES]);
        nonce
    }

    fn aad(method: Method, id: i32) -> String {
        format!("{}:{}", method.prefix(), id)
    }

    /// Masks `plaintext` into a token. Deterministic for a given key, method and plaintext.
    pub fn mask(&self, method: Method, plaintext: &[u8]) -> Result<String, MaskError> {
        let mut token = String::new();
        self.mask_into(method, plaintext, &mut token)?;
        Ok(token)
    }

    /// [`KeyMaterial::mask`] into a caller's buffer (cleared first), for callers that mask millions of values.
    pub fn mask_into(&self, method: Method, plaintext: &[u8], token: &mut String) -> Result<(), MaskError> {
        if plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(MaskError::PlaintextTooLong(plaintext.len()));
        }
        token.clear();
        match method {
            Method::Hmac => {
                let digest = self.hmac.mac(&[plaintext]);
                token.push_str(&self.prefixes[1]);
                // Into a stack buffer, then appended: no growth of the token's buffer by the encoder.
                let mut encoded = [0u8; 43];
                let n = URL_SAFE_NO_PAD.encode_slice(digest, &mut encoded).expect("43 bytes hold a 32-byte digest");
                token.push_str(std::str::from_utf8(&encoded[..n]).expect("base64url is ASCII"));
            }
            Method::Encrypt => {
                let nonce = self.synthetic_nonce(plaintext);
                let aad = Self::aad(method, self.id);
                let sealed = self
                    .siv_aead
                    .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: aad.as_bytes() })
                    .expect("AES-GCM encryption of a bounded input cannot fail");
                let mut payload = Vec::with_capacity(NONCE_BYTES + sealed.len());
                payload.extend_from_slice(&nonce);
                payload.extend_from_slice(&sealed);
                token.push_str(&self.prefixes[0]);
                URL_SAFE_NO_PAD.encode_string(&payload, token);
            }
        }
        Ok(())
    }

    /// Reverses an `enc` token made with this key. Verifies the tag and that the nonce matches the plaintext.
    pub fn unmask(&self, token: &Token) -> Result<Vec<u8>, MaskError> {
        if token.method == Method::Hmac {
            return Err(MaskError::Irreversible);
        }
        if token.key_id != self.id {
            return Err(MaskError::UnknownKey(token.key_id));
        }
        let (nonce, sealed) = token.payload.split_at(NONCE_BYTES);
        let aad = Self::aad(Method::Encrypt, self.id);
        let plaintext = self
            .siv_aead
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: aad.as_bytes() })
            .map_err(|_| MaskError::Tampered)?;
        let expected = self.synthetic_nonce(&plaintext);
        if !bool::from(expected.ct_eq(nonce)) {
            return Err(MaskError::Tampered);
        }
        Ok(plaintext)
    }

    /// Encrypts an arbitrary blob (a dead letter's body) with a caller-supplied random nonce.
    pub fn seal_blob(&self, nonce: [u8; NONCE_BYTES], plaintext: &[u8]) -> Vec<u8> {
        let aad = format!("blob:{}", self.id);
        let sealed = self
            .blob_aead
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: aad.as_bytes() })
            .expect("AES-GCM encryption of an in-memory blob cannot fail");
        let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Keyed digest (HMAC-SHA256 under the HMAC subkey, domain-separated from value tokens) of a dead-letter body
    /// that is kept only in part: proves which body it was without storing or revealing it.
    pub fn body_digest(&self, body: &[u8]) -> [u8; 32] {
        self.hmac.mac(&[b"sqs_ingest dead-letter body\0", body])
    }

    /// Decrypts a blob made by [`KeyMaterial::seal_blob`] with this key.
    pub fn open_blob(&self, sealed: &[u8]) -> Result<Vec<u8>, MaskError> {
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(MaskError::Tampered);
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let aad = format!("blob:{}", self.id);
        self.blob_aead
            .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad: aad.as_bytes() })
            .map_err(|_| MaskError::Tampered)
    }
}

/// All keys of a database: the active one masks, every one unmasks.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<KeyMaterial>,
    active: Option<usize>,
}

impl Keyring {
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Adds a key; the one added with `active = true` last becomes the active key.
    pub fn add(&mut self, key: KeyMaterial, active: bool) {
        self.keys.push(key);
        if active {
            self.active = Some(self.keys.len() - 1);
        }
    }

    pub fn active(&self) -> Option<&KeyMaterial> {
        self.active.map(|i| &self.keys[i])
    }

    pub fn get(&self, id: i32) -> Option<&KeyMaterial> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn unmask(&self, text: &str) -> Result<(i32, Vec<u8>), MaskError> {
        let token = Token::parse(text)?;
        self.unmask_token(&token).map(|p| (token.key_id, p))
    }

    /// Reverses an already parsed token with the key it names.
    pub fn unmask_token(&self, token: &Token) -> Result<Vec<u8>, MaskError> {
        self.get(token.key_id).ok_or(MaskError::UnknownKey(token.key_id))?.unmask(token)
    }
}

/// A fresh 256-bit key from the operating system's CSPRNG.
pub fn generate_key() -> Zeroizing<[u8; KEY_BYTES]> {
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    getrandom::getrandom(&mut *key).expect("the OS random number generator is available");
    key
}

/// A fresh random nonce for [`KeyMaterial::seal_blob`].
pub fn random_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::getrandom(&mut nonce).expect("the OS random number generator is available");
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AES key schedule inside each `Aes256Gcm` of a [`KeyMaterial`] is zeroed on drop (the `zeroize` feature
    /// of `aes`, set in Cargo.toml): this stops compiling if that feature is lost.
    #[test]
    fn aes_key_schedules_are_zeroed_on_drop() {
        fn zeroed_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroed_on_drop::<aes::Aes256>();
        zeroed_on_drop::<aes::Aes256Enc>();
    }

    /// Tokens minted by release 0.3.0's code (commit 12c48a8, core built and run on its own) for a fixed key:
    /// every later release must unmask them to the same values and mask those values to the same tokens.
    const TOKENS_0_3_0: [(&str, &str, &str); 5] = [
        ("203.0.113.77", "enc:7:FJhBYBYOy9ZCTBT0lpQWXAEiKsrveUTBjZI-VP-QgyH0tcaw3WfkUQ", "hmac:7:WfXJlrzj5vyB6HszQxnZ6-Nd2rNSbgyIBWl1lkesqhw"),
        ("2001:db8::1", "enc:7:_XU9Z3XgEMrHS6Odbcc6P6eArdUE1u39hIpJ-eG2sFYlpQbr-wz6", "hmac:7:uNSi1_xTubotLPPjl448Y4GrzulrtnG9PGuVXUCTfOw"),
        ("123-45-6789", "enc:7:73g3FptV2_S5t_0J3-gV2rcIUR0N1KtRKyTqquOz11iwLk765kW-", "hmac:7:bXWkRydkmVdda7ZbSs-LCSiHayBCG5oB-gaa06zymxw"),
        ("", "enc:7:-pnKfplZd4fAehE6e84MSb-PeQjLa-rGiCDjuA", "hmac:7:IaqSv7kU4EJMIWhmSdmi_qMFwxu3J611aJMhOEi1T9E"),
        (
            "a value of sixty-four bytes, longer than one block of the hash!!!",
            "enc:7:KT6qRILja7ouLArtM14wGKmyaVVR64da78vlaolN4HTbF2eUbz696-3jrKiujVxHvIGU0AFjGaEhpkU8FaQW1zwV_E90qEWZGimaArNI5G1k4vLR6RlIIK9pU5M6",
            "hmac:7:HPVnVL4yJHflVIf_wzTCuqGgic8NupvB4_8XdZi0eLM",
        ),
    ];

    #[test]
    fn tokens_minted_by_0_3_0_unmask_and_mask_the_same() {
        let master: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(29).wrapping_add(5)).collect();
        let key = KeyMaterial::new(7, &master).unwrap();
        for (value, enc, hmac) in TOKENS_0_3_0 {
            assert_eq!(key.unmask(&Token::parse(enc).unwrap()).unwrap(), value.as_bytes(), "{enc}");
            assert_eq!(key.mask(Method::Encrypt, value.as_bytes()).unwrap(), enc, "{value}");
            assert_eq!(key.mask(Method::Hmac, value.as_bytes()).unwrap(), hmac, "{value}");
        }
    }

    #[test]
    fn mask_into_overwrites_the_buffer() {
        let k = KeyMaterial::new(3, &[4; KEY_BYTES]).unwrap();
        let mut buf = String::from("left over from an earlier, much longer value that must not survive");
        for method in [Method::Hmac, Method::Encrypt] {
            k.mask_into(method, b"192.0.2.1", &mut buf).unwrap();
            assert_eq!(buf, k.mask(method, b"192.0.2.1").unwrap());
        }
        assert_eq!(k.mask_into(Method::Hmac, &[b'x'; 129], &mut buf), Err(MaskError::PlaintextTooLong(129)));
    }

    #[test]
    fn hmac_token_is_the_standard_hmac_of_the_subkey() {
        // The token format must not change with the implementation: stored tokens stay comparable.
        let master = [9u8; KEY_BYTES];
        let sub = subkey(&master, b"hmac");
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&*sub).unwrap();
        mac.update(b"10.0.0.1");
        let expected = format!("hmac:5:{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
        assert_eq!(KeyMaterial::new(5, &master).unwrap().mask(Method::Hmac, b"10.0.0.1").unwrap(), expected);
    }

    fn key(id: i32, byte: u8) -> KeyMaterial {
        KeyMaterial::new(id, &[byte; KEY_BYTES]).unwrap()
    }

    #[test]
    fn encrypt_is_deterministic_and_reversible() {
        let k = key(1, 7);
        let a = k.mask(Method::Encrypt, b"203.0.113.77").unwrap();
        let b = k.mask(Method::Encrypt, b"203.0.113.77").unwrap();
        assert_eq!(a, b);
        assert!(a.starts_with("enc:1:"));
        assert_ne!(a, k.mask(Method::Encrypt, b"203.0.113.78").unwrap());
        assert_eq!(k.unmask(&Token::parse(&a).unwrap()).unwrap(), b"203.0.113.77");
    }

    #[test]
    fn hmac_is_deterministic_and_irreversible() {
        let k = key(3, 7);
        let a = k.mask(Method::Hmac, b"318-52-7046").unwrap();
        assert_eq!(a, k.mask(Method::Hmac, b"318-52-7046").unwrap());
        assert!(a.starts_with("hmac:3:"));
        assert_eq!(k.unmask(&Token::parse(&a).unwrap()), Err(MaskError::Irreversible));
    }

    #[test]
    fn tokens_differ_between_keys_and_methods() {
        let (k1, k2) = (key(1, 1), key(2, 2));
        let v = b"10.0.0.1";
        let enc1 = k1.mask(Method::Encrypt, v).unwrap();
        let enc2 = k2.mask(Method::Encrypt, v).unwrap();
        assert_ne!(enc1[6..], enc2[6..]);
        let h = k1.mask(Method::Hmac, v).unwrap();
        let enc_nonce = &Token::parse(&enc1).unwrap().payload[..12];
        assert_ne!(&Token::parse(&h).unwrap().payload[..12], enc_nonce, "hmac must not reveal the enc nonce");
        // Same key id, other key bytes: a foreign token is refused, not decrypted to garbage.
        let foreign = key(1, 9).mask(Method::Encrypt, v).unwrap();
        assert_eq!(k1.unmask(&Token::parse(&foreign).unwrap()), Err(MaskError::Tampered));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let k = key(1, 5);
        let token = k.mask(Method::Encrypt, b"198.51.100.23").unwrap();
        let parsed = Token::parse(&token).unwrap();
        for byte in 0..parsed.payload.len() {
            for bit in 0..8 {
                let mut t = parsed.clone();
                t.payload[byte] ^= 1 << bit;
                assert_eq!(k.unmask(&t), Err(MaskError::Tampered), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn nonce_must_match_the_plaintext() {
        // Re-encrypt another plaintext under the first token's nonce: the GCM tag is valid, the SIV check is not.
        let k = key(1, 5);
        let t = Token::parse(&k.mask(Method::Encrypt, b"1.1.1.1").unwrap()).unwrap();
        let nonce = &t.payload[..12];
        let sealed = k.siv_aead.encrypt(Nonce::from_slice(nonce), Payload { msg: b"2.2.2.2", aad: b"enc:1" }).unwrap();
        let forged = Token { method: Method::Encrypt, key_id: 1, payload: [nonce, &sealed].concat() };
        assert_eq!(k.unmask(&forged), Err(MaskError::Tampered));
    }

    #[test]
    fn key_id_is_bound_to_the_token() {
        let (k1, k2) = (key(1, 5), key(2, 5));
        let mut ring = Keyring::new();
        ring.add(k1.clone(), false);
        ring.add(k2, true);
        let token = k1.mask(Method::Encrypt, b"8.8.8.8").unwrap();
        let relabelled = token.replacen("enc:1:", "enc:2:", 1);
        assert_eq!(ring.unmask(&relabelled), Err(MaskError::Tampered));
        assert_eq!(ring.unmask(&token).unwrap(), (1, b"8.8.8.8".to_vec()));
    }

    #[test]
    fn truncated_and_foreign_tokens_are_malformed() {
        let k = key(1, 5);
        let token = k.mask(Method::Encrypt, b"8.8.8.8").unwrap();
        for cut in 0..token.len() {
            let r = Token::parse(&token[..cut]).and_then(|t| k.unmask(&t));
            assert!(matches!(r, Err(MaskError::Malformed) | Err(MaskError::Tampered)), "cut at {cut}: {r:?}");
        }
        for junk in
            ["", "hello", "enc::AAAA", "enc:01:AAAA", "enc:-1:AAAA", "sha256:1:AAAA", "enc:1:***", "enc:99999999999:AA"]
        {
            assert_eq!(Token::parse(junk), Err(MaskError::Malformed), "{junk}");
        }
    }

    #[test]
    fn overlong_tokens_are_refused_before_decoding() {
        let k = key(1, 1);
        let longest = k.mask(Method::Encrypt, &[b'x'; MAX_PLAINTEXT_BYTES]).unwrap();
        assert!(longest.len() <= MAX_TOKEN_CHARS);
        assert!(Token::parse(&longest).is_ok());
        // A valid prefix with a long, well-formed base64 payload: refused by length, not by decoding it.
        let long = format!("enc:1:{}", "A".repeat(4 << 20));
        assert_eq!(Token::parse(&long), Err(MaskError::TokenTooLong(long.len())));
        let just_over = format!("enc:1:{}", "A".repeat(MAX_TOKEN_CHARS - 5));
        assert_eq!(Token::parse(&just_over), Err(MaskError::TokenTooLong(MAX_TOKEN_CHARS + 1)));
    }

    #[test]
    fn body_digest_is_keyed_and_deterministic() {
        let body = vec![b'y'; 300_000];
        assert_eq!(key(1, 1).body_digest(&body), key(1, 1).body_digest(&body));
        assert_ne!(key(1, 1).body_digest(&body), key(1, 2).body_digest(&body));
        assert_ne!(key(1, 1).body_digest(&body), key(1, 1).body_digest(&body[1..]));
    }

    #[test]
    fn rotation_keeps_old_tokens_readable() {
        let mut ring = Keyring::new();
        ring.add(key(1, 1), true);
        let old = ring.active().unwrap().mask(Method::Encrypt, b"4.4.4.4").unwrap();
        ring.add(key(2, 2), true);
        assert_eq!(ring.active().unwrap().id(), 2);
        let new = ring.active().unwrap().mask(Method::Encrypt, b"4.4.4.4").unwrap();
        assert!(new.starts_with("enc:2:"));
        assert_eq!(ring.unmask(&old).unwrap().1, b"4.4.4.4");
        assert_eq!(ring.unmask(&new).unwrap().1, b"4.4.4.4");
        assert_eq!(Keyring::new().unmask(&old), Err(MaskError::UnknownKey(1)));
    }

    #[test]
    fn longest_input_with_largest_key_id_fits_varchar_256() {
        let k = key(i32::MAX, 3);
        let v = vec![0xffu8; MAX_PLAINTEXT_BYTES];
        let enc = k.mask(Method::Encrypt, &v).unwrap();
        let h = k.mask(Method::Hmac, &v).unwrap();
        assert_eq!(enc.len(), MAX_TOKEN_CHARS);
        assert!(enc.len() <= 256 && h.len() <= 256);
        assert!(enc.bytes().chain(h.bytes()).all(|b| b.is_ascii_graphic()));
        assert_eq!(k.mask(Method::Encrypt, &[0u8; MAX_PLAINTEXT_BYTES + 1]), Err(MaskError::PlaintextTooLong(129)));
    }

    #[test]
    fn every_byte_value_round_trips() {
        let k = key(1, 42);
        for b in 0..=255u8 {
            let v = [b, b, b];
            let t = k.mask(Method::Encrypt, &v).unwrap();
            assert_eq!(k.unmask(&Token::parse(&t).unwrap()).unwrap(), v, "byte {b}");
        }
        let all: Vec<u8> = (0..=255u8).collect();
        for chunk in all.chunks(MAX_PLAINTEXT_BYTES) {
            let t = k.mask(Method::Encrypt, chunk).unwrap();
            assert_eq!(k.unmask(&Token::parse(&t).unwrap()).unwrap(), chunk);
        }
        assert_eq!(k.unmask(&Token::parse(&k.mask(Method::Encrypt, b"").unwrap()).unwrap()).unwrap(), b"");
    }

    #[test]
    fn blobs_round_trip_and_detect_tampering() {
        let k = key(4, 4);
        let body = vec![b'x'; 1 << 20];
        let sealed = k.seal_blob(random_nonce(), &body);
        assert_eq!(k.open_blob(&sealed).unwrap(), body);
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert_eq!(k.open_blob(&bad), Err(MaskError::Tampered));
        assert_eq!(key(5, 4).open_blob(&sealed), Err(MaskError::Tampered));
        assert_ne!(k.seal_blob(random_nonce(), b"a"), k.seal_blob(random_nonce(), b"a"), "blobs use random nonces");
    }

    #[test]
    fn generated_keys_are_random() {
        assert_ne!(*generate_key(), *generate_key());
    }

    #[test]
    fn debug_output_hides_key_bytes() {
        let shown = format!("{:?}", key(9, 0xAB));
        assert!(shown.contains("id: 9") && !shown.contains("171"), "{shown}");
    }

    #[test]
    fn method_names_parse() {
        assert_eq!(Method::parse("encrypt"), Ok(Method::Encrypt));
        assert_eq!(Method::parse(" HMAC "), Ok(Method::Hmac));
        assert!(matches!(Method::parse("sha256"), Err(MaskError::UnknownMethod(_))));
    }
}
