//! HMAC-SHA256 under one key, keyed once: the `hmac` crate's keyed state (the key's inner and outer pad blocks
//! already absorbed) is built when the key is loaded and cloned for each value, so masking a value costs the
//! compressions of the value itself and no key setup (millions of rows in a bulk `mask()`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// An HMAC-SHA256 key, pre-processed. Never printed (no `Debug`); its keyed state is zeroed when dropped.
#[derive(Clone)]
pub struct PrekeyedHmac {
    keyed: Hmac<Sha256>,
}

impl Drop for PrekeyedHmac {
    fn drop(&mut self) {
        // The keyed state stands for the key (whoever holds it can compute the HMAC), and the hmac crate does not
        // zero it. It is plain data (hash states and block buffers, no pointers, no Drop of its own), so its bytes
        // are zeroed in place.
        // SAFETY: `keyed` is a valid, exclusively borrowed value of `size_of_val(&self.keyed)` bytes; after the
        // zeroing it is never read again (only its no-op drop glue runs).
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut self.keyed as *mut Hmac<Sha256>).cast::<u8>(),
                std::mem::size_of_val(&self.keyed),
            )
        };
        zeroize::Zeroize::zeroize(bytes);
    }
}

impl PrekeyedHmac {
    /// Any key length (sqs_ingest's subkeys are 32 bytes).
    pub fn new(key: &[u8]) -> PrekeyedHmac {
        PrekeyedHmac { keyed: <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length") }
    }

    /// HMAC of the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_test_cases() {
        let hex = |mac: [u8; 32]| mac.iter().map(|b| format!("{b:02x}")).collect::<String>();
        // Test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            hex(PrekeyedHmac::new(b"Jefe").mac(&[b"what do ya want for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a 131-byte key (longer than a block, hashed first).
        assert_eq!(
            hex(PrekeyedHmac::new(&[0xaa; 131]).mac(&[b"Test Using Larger Than Block-Size Key - Hash Key First"])),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn parts_are_concatenated() {
        let key = PrekeyedHmac::new(&[7; 32]);
        assert_eq!(key.mac(&[b"ab", b"c"]), key.mac(&[b"abc"]));
        assert_ne!(key.mac(&[b"ab", b"c"]), key.mac(&[b"ab", b"d"]));
    }

    #[test]
    fn different_keys_differ() {
        assert_ne!(PrekeyedHmac::new(&[1; 32]).mac(&[b"x"]), PrekeyedHmac::new(&[2; 32]).mac(&[b"x"]));
    }
}
