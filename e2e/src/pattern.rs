//! The deterministic byte stream `send` writes: splitmix64 output, little endian, from a seed.
//!
//! The stream does not depend on how it is cut into chunks, so a test can compute the expected
//! crc32 of any prefix with [`crc32_of`].

/// An endless pseudo-random byte stream derived from a seed.
#[derive(Clone, Debug)]
pub struct Pattern {
    state: u64,
    /// Bytes of the last generated word not handed out yet: `word[pos..]`.
    word: [u8; 8],
    pos: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern {
            state: seed,
            word: [0; 8],
            pos: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        // splitmix64
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// Fills `out` with the next `out.len()` bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let pending = (8 - self.pos).min(out.len());
        out[..pending].copy_from_slice(&self.word[self.pos..self.pos + pending]);
        self.pos += pending;
        let rest = &mut out[pending..];
        let mut words = rest.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_word());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.pos = tail.len();
        }
    }
}

/// The crc32 (IEEE, as crc32fast computes it) of the first `len` bytes of the stream of `seed`.
pub fn crc32_of(seed: u64, len: u64) -> u32 {
    let mut pattern = Pattern::new(seed);
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_change_the_stream() {
        let mut whole = vec![0u8; 1000];
        Pattern::new(7).fill(&mut whole);
        for chunk in [1, 3, 8, 13, 64, 999] {
            let mut p = Pattern::new(7);
            let mut pieces = Vec::new();
            while pieces.len() < whole.len() {
                let mut buf = vec![0u8; chunk.min(whole.len() - pieces.len())];
                p.fill(&mut buf);
                pieces.extend_from_slice(&buf);
            }
            assert_eq!(pieces, whole, "chunk {chunk}");
        }
        assert_ne!(whole[..8], whole[8..16]);
        let mut other = vec![0u8; 1000];
        Pattern::new(8).fill(&mut other);
        assert_ne!(other, whole);
    }

    #[test]
    fn crc_of_prefix() {
        let mut buf = vec![0u8; 200_000];
        Pattern::new(1).fill(&mut buf);
        assert_eq!(crc32_of(1, 200_000), crc32fast::hash(&buf));
        assert_eq!(crc32_of(1, 0), crc32fast::hash(&[]));
    }
}
