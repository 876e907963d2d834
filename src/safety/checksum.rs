//! Checksums of what a run keeps for a later one (resume journal entries and the shards they
//! name): FNV-1a 64 over bytes for small data, and a word-wise FNV-1a 64 for files, which reads
//! at memory speed. They detect corruption and edits, not forgery.

use std::path::Path;

use crate::error::{Error, Result};

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a 64 of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ b as u64).wrapping_mul(PRIME)
    })
}

/// FNV-1a 64 over the little-endian 64-bit words of `bytes` (the tail byte by byte), then its
/// length: one multiply per 8 bytes. Every change of a single word changes the result.
pub fn fnv1a_words(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let mut hash = OFFSET_BASIS;
    for word in &mut words {
        let word = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        hash = (hash ^ word).wrapping_mul(PRIME);
    }
    for &b in words.remainder() {
        hash = (hash ^ b as u64).wrapping_mul(PRIME);
    }
    (hash ^ bytes.len() as u64).wrapping_mul(PRIME)
}

/// The checksum as stored: 16 hex digits.
pub fn hex(checksum: u64) -> String {
    format!("{checksum:016x}")
}

/// The size in bytes and the [`fnv1a_words`] checksum (as [`hex`]) of the file at `path`.
pub fn file_checksum(path: &Path) -> Result<(u64, String)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok((0, hex(fnv1a_words(&[]))));
    }
    // SAFETY: the file is only read; a concurrent change shows up as a checksum mismatch.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok((len, hex(fnv1a_words(&map))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn zeroed_truncated_and_extended_data_change_the_word_checksum() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8 + 1).collect();
        let base = fnv1a_words(&data);
        let mut zeroed = data.clone();
        zeroed[400..408].fill(0);
        assert_ne!(fnv1a_words(&zeroed), base);
        assert_ne!(fnv1a_words(&data[..999]), base);
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(fnv1a_words(&longer), base);
    }
}
