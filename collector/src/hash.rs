//! A stable 64-bit hash for ids that are stored and compared across processes and
//! versions (stack ids, series ids, batch ids): an FNV-style word-at-a-time mix over
//! length-prefixed fields with a SplitMix64 finish. `std`'s hasher is not promised to be stable across Rust releases.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Builds a hash field by field; each field is length-prefixed so `("ab", "c")` and
/// `("a", "bc")` differ.
#[derive(Debug, Clone, Copy)]
pub struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        Self(FNV_OFFSET)
    }
}

impl StableHasher {
    pub fn new() -> Self {
        Self::default()
    }

    fn bytes(&mut self, bytes: &[u8]) {
        // Eight bytes per step (frame names are long; this runs for every frame of every
        // batch), then the tail byte by byte.
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0_u8; 8];
            word.copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(23) ^ u64::from_le_bytes(word))
                .wrapping_mul(FNV_PRIME | 0x9e37_79b9_0000_0000);
        }
        for &byte in chunks.remainder() {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    #[must_use]
    pub fn str(mut self, text: &str) -> Self {
        self.bytes(&(text.len() as u64).to_le_bytes());
        self.bytes(text.as_bytes());
        self
    }

    #[must_use]
    pub fn u64(mut self, value: u64) -> Self {
        self.bytes(&value.to_le_bytes());
        self
    }

    /// The finished hash, as a signed value because both databases store signed 64-bit
    /// integers most naturally (SQLite has no unsigned type).
    pub fn finish(self) -> i64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED_SHORT: i64 = 5_211_771_466_391_525_326;
    const PINNED_LONG: i64 = -4_077_905_479_644_042_575;

    #[test]
    fn fields_are_delimited_and_stable() {
        let ab_c = StableHasher::new().str("ab").str("c").finish();
        let a_bc = StableHasher::new().str("a").str("bc").finish();
        assert_ne!(ab_c, a_bc);
        // Stored ids must not change between releases: pinned values.
        assert_eq!(
            StableHasher::new().str("stallscope").u64(1).finish(),
            PINNED_SHORT
        );
        assert_eq!(
            StableHasher::new()
                .str("std::collections::hash::map::HashMap::insert")
                .finish(),
            PINNED_LONG
        );
    }
}
