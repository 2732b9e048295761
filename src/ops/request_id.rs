//! Request ids: kept from the client's `X-Request-Id` when it is well
//! formed, otherwise made here. They go upstream, back to the client, and
//! into the audit log, so one id follows a request through every log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::HeaderValue;

/// Longest client-supplied id that is kept.
pub const MAX_LEN: usize = 128;

/// Whether a client's id is safe to pass on and to log: 1 to 128 of
/// `A-Z a-z 0-9 - _ . :`.
pub fn is_well_formed(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The id for a request that came with `client_id`.
pub fn for_request(client_id: Option<&HeaderValue>) -> HeaderValue {
    match client_id {
        Some(v) if is_well_formed(v.as_bytes()) => v.clone(),
        _ => generate(),
    }
}

/// A new 32-hex-digit id: a per-process random seed mixed with a counter,
/// so ids are unique within a process and unpredictable across processes,
/// without a system call per request.
pub fn generate() -> HeaderValue {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let mut b = [0u8; 8];
        // Falling back to the clock still gives unique ids (the counter does that).
        if getrandom::fill(&mut b).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            b = (nanos as u64).to_le_bytes();
        }
        u64::from_le_bytes(b)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hi = splitmix64(seed ^ n);
    let lo = splitmix64(hi ^ n.rotate_left(32));
    let mut buf = [0u8; 32];
    write_hex(&mut buf, hi, lo);
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn write_hex(buf: &mut [u8; 32], hi: u64, lo: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (u128::from(hi) << 64) | u128::from(lo);
    for (i, slot) in buf.iter_mut().enumerate() {
        let shift = 124 - 4 * i as u32;
        *slot = HEX[((digits >> shift) & 0xf) as usize];
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_only_when_well_formed() {
        let good = HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(for_request(Some(&good)), good);
        let bad = HeaderValue::from_static("has space");
        assert_ne!(for_request(Some(&bad)), bad);
        let long = HeaderValue::from_str(&"a".repeat(MAX_LEN + 1)).unwrap();
        assert_ne!(for_request(Some(&long)), long);
        assert!(is_well_formed("a".repeat(MAX_LEN).as_bytes()));
        assert!(!is_well_formed(b""));
        assert!(!is_well_formed(b"a\"b"));
    }

    #[test]
    fn generated_ids_are_unique_hex() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 10_000);
        let one = generate();
        assert_eq!(one.len(), 32);
        assert!(one.as_bytes().iter().all(|b| b.is_ascii_hexdigit()));
    }
}
