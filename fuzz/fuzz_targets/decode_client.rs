//! Client-to-server messages: what a server reads from untrusted peers.
//!
//! Input: one selector byte (low bit: 0 = binary, 1 = JSON), then the message.
#![no_main]

use ferry_core::codec::{self, Encoding, DEFAULT_MAX_MESSAGE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, msg)) = data.split_first() else {
        return;
    };
    let enc = if sel & 1 == 0 {
        Encoding::Binary
    } else {
        Encoding::Json
    };
    // Decoding must never panic; accepted frames must survive a re-encode,
    // since peers and relays re-send what they decoded.
    if let Ok(frames) = codec::decode_client(enc, msg, DEFAULT_MAX_MESSAGE_SIZE) {
        let mut out = Vec::new();
        for f in &frames {
            codec::encode_into(enc, f, &mut out);
        }
        let again = codec::decode_client(enc, &out, usize::MAX);
        assert_eq!(again.as_ref(), Ok(&frames), "re-encoded: {out:02x?}");
    }
});
