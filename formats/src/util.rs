//! Small helpers shared by the formats: alignment and fixed-width integers.

/// Rounds `v` up to a multiple of `align` (a power of two).
pub fn align_up(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (v + align - 1) & !(align - 1)
}

/// Rounds `v` down to a multiple of `align` (a power of two).
pub fn align_down(v: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    v & !(align - 1)
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

pub fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put_le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn put_le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// True when every byte of `buf` is zero (word-at-a-time; this is on the copy hot path).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Places a new string of `len` bytes in the header area `[lo, hi)` so that it overlaps none
/// of the `live` byte ranges the current header still references. Writing there first and
/// switching the header afterwards keeps every instant consistent.
pub fn place_outside(len: u64, lo: u64, hi: u64, live: &[(u64, u64)]) -> Option<u64> {
    let mut candidates = vec![lo];
    candidates.extend(live.iter().map(|&(_, end)| align_up(end.max(lo), 8)));
    candidates.sort_unstable();
    candidates.into_iter().find(|&p| {
        p >= lo && p + len <= hi && live.iter().all(|&(s, e)| p + len <= s || p >= e || s == e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_handles_unaligned_tails() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&v[..4098]));
    }

    #[test]
    fn placement_avoids_live_ranges() {
        assert_eq!(place_outside(10, 512, 4096, &[]), Some(512));
        assert_eq!(place_outside(10, 512, 4096, &[(512, 530)]), Some(536));
        assert_eq!(place_outside(10, 512, 540, &[(512, 530)]), None);
        assert_eq!(place_outside(10, 512, 4096, &[(600, 700)]), Some(512));
    }
}
