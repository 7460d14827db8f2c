//! Compressed payloads: raw deflate from a peer, inflated under a limit.
//!
//! Input: two bytes of little-endian output limit, then the deflate stream.
#![no_main]

use ferry_core::codec::DecodeError;
use ferry_core::compress;
use ferry_core::frame::{Bytes, Payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, z @ ..] = data else {
        return;
    };
    // Limits up to 64 KiB: small ones make "exactly at the limit" reachable.
    let limit = usize::from(u16::from_le_bytes([*a, *b]));
    let got = compress::inflate(z, limit);
    match &got {
        Ok(v) => assert!(v.len() <= limit, "{} B out, limit {limit}", v.len()),
        Err(DecodeError::InflateLimit { limit: l }) => assert_eq!(*l, limit),
        Err(DecodeError::BadCompression) => {}
        Err(e) => panic!("unexpected error {e:?}"),
    }
    // unpack of a compressed payload is the same operation.
    let p = Payload {
        z: true,
        data: Bytes(z.to_vec()),
    };
    assert_eq!(compress::unpack(&p, limit), got);
});
