//! Payload compression: raw deflate (RFC 1951) via miniz_oxide, applied per
//! payload above a size threshold, inflated with a hard output limit.

use crate::codec::DecodeError;
use crate::frame::{Bytes, Payload};

/// Compression level: fast, since messages are small and latency matters.
const LEVEL: u8 = 3;

/// Make a payload, deflating when `min` is set, `data` is at least that
/// large, and deflate actually saves space.
pub fn pack(data: Vec<u8>, min: Option<u32>) -> Payload {
    if let Some(min) = min {
        if data.len() >= min as usize {
            let z = miniz_oxide::deflate::compress_to_vec(&data, LEVEL);
            if z.len() < data.len() {
                return Payload { z: true, data: Bytes(z) };
            }
        }
    }
    Payload { z: false, data: Bytes(data) }
}

/// The payload's bytes, inflated if needed; a payload that would inflate
/// past `limit` bytes is an error before more than `limit` bytes are held.
pub fn unpack(p: &Payload, limit: usize) -> Result<Vec<u8>, DecodeError> {
    if !p.z {
        return Ok(p.data.0.clone());
    }
    inflate(&p.data.0, limit)
}

/// Inflate raw deflate data, refusing output larger than `limit`.
pub fn inflate(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    match miniz_oxide::inflate::decompress_to_vec_with_limit(data, limit) {
        Ok(v) => Ok(v),
        Err(e) if e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput => {
            Err(DecodeError::InflateLimit { limit })
        }
        Err(_) => Err(DecodeError::BadCompression),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_stay_plain_and_large_ones_shrink() {
        assert!(!pack(b"hi".to_vec(), Some(64)).z);
        assert!(!pack(vec![7; 100], None).z);
        let p = pack(vec![7; 10_000], Some(64));
        assert!(p.z && p.data.0.len() < 200);
        assert_eq!(unpack(&p, 10_000).unwrap(), vec![7; 10_000]);
    }

    #[test]
    fn bomb_is_refused() {
        // 64 MiB of zeros deflates to ~64 KiB; a 64 KiB limit must refuse it.
        let bomb = miniz_oxide::deflate::compress_to_vec(&vec![0u8; 64 << 20], 10);
        let err = inflate(&bomb, 64 * 1024).unwrap_err();
        assert_eq!(err, DecodeError::InflateLimit { limit: 64 * 1024 });
        assert_eq!(inflate(b"\xff\xff\xff", 100), Err(DecodeError::BadCompression));
    }
}
