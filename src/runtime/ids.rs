//! Cheap unique ids: request ids, trace and span ids.
//!
//! Drawing each id from the OS (`Uuid::new_v4`) costs a `getrandom` syscall, three per P/D
//! request once the trace ids are counted. Ids must be unique and unpredictable enough not to
//! collide across processes, not secret: so the process draws one random seed and each id is a
//! counter run through SplitMix64's finalizer, a bijection on 64 bits, so no value repeats
//! within a process until 2^64 ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A fresh 64-bit value, never zero (all-zero trace and span ids are invalid).
pub fn next_u64() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z.max(1)
}

/// `N` fresh bytes.
pub fn next_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let bytes = next_u64().to_be_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

/// `N` fresh bytes as lowercase hex, as `traceparent` and OTLP's JSON write ids.
pub fn next_hex<const N: usize>() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(N * 2);
    for b in next_bytes::<N>() {
        text.push(HEX[usize::from(b >> 4)] as char);
        text.push(HEX[usize::from(b & 15)] as char);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_do_not_repeat_and_are_hex() {
        let ids: HashSet<String> = (0..10_000).map(|_| next_hex::<16>()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.len(), 32);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        assert_eq!(next_hex::<8>().len(), 16);
    }
}
