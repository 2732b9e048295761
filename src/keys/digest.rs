//! Key digests and the short ids that name keys everywhere a key itself
//! must not appear.

use std::fmt;
use std::hash::{Hash, Hasher};

use sha2::{Digest as _, Sha256};

/// The prefix that marks a key file entry as a digest instead of a plaintext key.
pub const DIGEST_PREFIX: &str = "sha256:";

/// The SHA-256 of a key: what the store is indexed by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Hashes a presented or plaintext key.
    pub fn of(key: &[u8]) -> KeyDigest {
        KeyDigest(Sha256::digest(key).into())
    }

    /// Parses the 64 hex digits after `sha256:`.
    pub fn from_hex(hex: &str) -> Option<KeyDigest> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let hi = hex_val(*pair.first()?)?;
            let lo = hex_val(*pair.get(1)?)?;
            *o = hi << 4 | lo;
        }
        Some(KeyDigest(out))
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            push_hex(&mut s, b);
        }
        s
    }

    /// The short id used to refer to a key in logs, errors and listings.
    pub fn id(&self) -> KeyId {
        let mut id = [0u8; KEY_ID_BYTES];
        id.copy_from_slice(&self.0[..KEY_ID_BYTES]);
        KeyId(id)
    }
}

impl fmt::Debug for KeyDigest {
    /// Shows the short id only, so a digest in a debug dump is no more
    /// revealing than a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({})", self.id())
    }
}

impl Hash for KeyDigest {
    /// A digest is already uniformly random (and a client cannot choose the
    /// digest of what it sends), so its first eight bytes are a perfectly
    /// good hash; hashing it again would only cost time on every request.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Passes the `u64` that [`KeyDigest::hash`] writes straight through.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a KeyDigest is hashed; FNV-1a
        // keeps that correct, if slower.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

const KEY_ID_BYTES: usize = 6;

/// A short, non-secret name for a key: the first 12 hex digits of its
/// digest. Logs, error messages and listings use it; the key never appears.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct KeyId([u8; KEY_ID_BYTES]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl KeyId {
    /// The id as a number, for tables keyed by it (its bytes are a
    /// digest's, so already evenly spread).
    pub fn to_u64(self) -> u64 {
        self.0.iter().fold(0u64, |n, b| n << 8 | u64::from(*b))
    }

    /// Reads an id written by [`fmt::Display`] (exactly 12 hex digits),
    /// as other instances publish it.
    pub fn parse_hex(s: &str) -> Option<KeyId> {
        let bytes = s.as_bytes();
        if bytes.len() != 2 * KEY_ID_BYTES {
            return None;
        }
        let mut id = [0u8; KEY_ID_BYTES];
        for (out, pair) in id.iter_mut().zip(bytes.chunks_exact(2)) {
            let [hi, lo] = pair else { return None };
            *out = hex_val(*hi)? << 4 | hex_val(*lo)?;
        }
        Some(KeyId(id))
    }
}

/// Hex digit values, 0xff for non-digits: a table lookup per character,
/// which matters when a million digests are decoded on a reload.
const HEX_VALUES: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

#[inline]
pub(super) fn hex_val(c: u8) -> Option<u8> {
    match HEX_VALUES[usize::from(c)] {
        0xff => None,
        v => Some(v),
    }
}

fn push_hex(s: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    s.push(char::from(HEX[usize::from(b >> 4)]));
    s.push(char::from(HEX[usize::from(b & 0xf)]));
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn ids_read_back_as_written() {
        let id = KeyDigest::of(b"agw_example").id();
        assert_eq!(KeyId::parse_hex(&id.to_string()), Some(id));
        assert_eq!(KeyId::parse_hex(&id.to_string().to_uppercase()), Some(id));
        for bad in ["", "abc", "0123456789abc", "0123456789ag", "é123456789ab"] {
            assert_eq!(KeyId::parse_hex(bad), None, "{bad}");
        }
    }
}
