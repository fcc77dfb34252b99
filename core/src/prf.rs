//! HMAC-SHA256 with the key's inner and outer pad blocks compressed once, up front.
//!
//! `hmac::Hmac<Sha256>` already caches the padded key, but every use clones and zeroes its block buffers and goes
//! through the generic `Mac` machinery. Masking runs once per value (millions of rows in a bulk `mask()`), so this
//! keeps only the two 8-word SHA-256 states and runs the compression function directly: two compressions for a
//! value shorter than 56 bytes. Checked against the `hmac` crate for every input length up to 300 bytes.

use sha2::compress256;
use sha2::digest::generic_array::GenericArray;
use zeroize::Zeroize;

const BLOCK: usize = 64;
const H0: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// An HMAC-SHA256 key, pre-processed. Never printed (no `Debug`); zeroed when dropped.
#[derive(Clone)]
pub struct PrekeyedHmac {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl Drop for PrekeyedHmac {
    fn drop(&mut self) {
        self.inner.zeroize();
        self.outer.zeroize();
    }
}

fn compress(state: &mut [u32; 8], block: &[u8; BLOCK]) {
    compress256(state, &[*GenericArray::from_slice(block)]);
}

impl PrekeyedHmac {
    /// `key` must be at most one block (64 bytes); sqs_ingest's subkeys are 32.
    pub fn new(key: &[u8]) -> PrekeyedHmac {
        assert!(key.len() <= BLOCK, "PrekeyedHmac takes keys of at most {BLOCK} bytes");
        let mut ipad = [0x36u8; BLOCK];
        let mut opad = [0x5cu8; BLOCK];
        for (i, b) in key.iter().enumerate() {
            ipad[i] ^= b;
            opad[i] ^= b;
        }
        let (mut inner, mut outer) = (H0, H0);
        compress(&mut inner, &ipad);
        compress(&mut outer, &opad);
        ipad.zeroize();
        opad.zeroize();
        PrekeyedHmac { inner, outer }
    }

    /// HMAC of the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut state = self.inner;
        let mut block = [0u8; BLOCK];
        let mut fill = 0usize;
        let mut total = BLOCK as u64; // the ipad block is already in `state`
        for part in parts {
            let mut rest = *part;
            total += rest.len() as u64;
            while !rest.is_empty() {
                let n = (BLOCK - fill).min(rest.len());
                block[fill..fill + n].copy_from_slice(&rest[..n]);
                fill += n;
                rest = &rest[n..];
                if fill == BLOCK {
                    compress(&mut state, &block);
                    fill = 0;
                }
            }
        }
        let inner_digest = finish(&mut state, &mut block, fill, total);
        let mut state = self.outer;
        let mut block = [0u8; BLOCK];
        block[..32].copy_from_slice(&inner_digest);
        finish(&mut state, &mut block, 32, (BLOCK + 32) as u64)
    }
}

/// Appends SHA-256 padding for a message of `total` bytes to the `fill` bytes in `block` and returns the digest.
fn finish(state: &mut [u32; 8], block: &mut [u8; BLOCK], fill: usize, total: u64) -> [u8; 32] {
    block[fill] = 0x80;
    block[fill + 1..].fill(0);
    if fill + 1 > BLOCK - 8 {
        compress(state, block);
        block.fill(0);
    }
    block[BLOCK - 8..].copy_from_slice(&(total * 8).to_be_bytes());
    compress(state, block);
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(state.iter()) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    fn reference(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn matches_the_hmac_crate_for_every_length_and_split() {
        let key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
        let fast = PrekeyedHmac::new(&key);
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..data.len() {
            let msg = &data[..len];
            assert_eq!(fast.mac(&[msg]), reference(&key, &[msg]), "length {len}");
            let cut = len / 3;
            assert_eq!(fast.mac(&[&msg[..cut], &msg[cut..]]), reference(&key, &[msg]), "length {len} split");
        }
    }

    #[test]
    fn rfc4231_test_case_2() {
        // Key "Jefe", data "what do ya want for nothing?".
        let mac = PrekeyedHmac::new(b"Jefe").mac(&[b"what do ya want for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn different_keys_differ() {
        assert_ne!(PrekeyedHmac::new(&[1; 32]).mac(&[b"x"]), PrekeyedHmac::new(&[2; 32]).mac(&[b"x"]));
    }
}
