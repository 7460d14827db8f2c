//! Ferry's write and read pattern, generated deterministically from a seed so
//! that a crash-test parent can replay exactly what its child wrote.

use serde::{Deserialize, Serialize};

/// Number of channels in the model.
pub const CHANNELS: usize = 1_000;
/// Zipf exponent for channel popularity: rank 1 gets ~13% of all writes.
pub const ZIPF_S: f64 = 1.0;
/// Dedup entries live this long past the publication time.
pub const DEDUP_TTL_MS: u64 = 120_000;

/// SplitMix64: small, fast, good enough for workload generation.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The SplitMix64 finaliser, also used to derive message ids.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Zipf sampler over ranks `0..n` by inverse CDF.
#[derive(Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// Channel names of 10-20 bytes in a few realistic shapes.
pub fn channel_name(prefix: &str, i: usize) -> String {
    match i % 5 {
        0 => format!("{prefix}chat:room-{i}"),
        1 => format!("{prefix}news:feed-{i}"),
        2 => format!("{prefix}im:user-{:05}", i * 7919 % 100_000),
        3 => format!("{prefix}game.lobby/{i}"),
        _ => format!("{prefix}orders.eu-west.{i}"),
    }
}

/// A ~30-byte message id as a publisher would mint it: publisher tag + sequence.
pub fn message_id(salt: u64, index: u64) -> String {
    format!("{:014x}-{:015x}", mix(salt ^ index.rotate_left(17)) >> 8, index)
}

/// The stored publication, postcard-encoded (~200 bytes).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Publication<'a> {
    pub id: &'a str,
    pub time_ms: u64,
    #[serde(with = "serde_bytes_compat")]
    pub payload: &'a [u8],
}

/// Serialise `&[u8]` as postcard bytes (length + raw) without pulling in serde_bytes.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'de [u8], D::Error> {
        serde::Deserialize::deserialize(d)
    }
}

/// The dedup entry: message id -> where it was stored and until when it counts.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
pub struct DedupEntry {
    pub channel: Vec<u8>,
    pub offset: u64,
    pub expiry_ms: u64,
}

/// The per-channel stream header.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone, Copy, Default)]
pub struct Header {
    pub epoch: u64,
    /// Oldest offset still stored.
    pub first: u64,
    /// Next offset to assign.
    pub top: u64,
}

/// One append as handed to a store.
pub struct Append {
    pub channel: Vec<u8>,
    pub offset: u64,
    pub msg_id: Vec<u8>,
    pub value: Vec<u8>,
    pub expiry_ms: u64,
}

/// A batch ready for one durable commit: the appends and the final header of
/// every channel they touched.
pub struct Batch {
    pub appends: Vec<Append>,
    pub headers: Vec<(Vec<u8>, Header)>,
    /// Insert the dedup entries (always, except in the experiment that
    /// measures what they cost).
    pub dedup: bool,
}

impl Batch {
    /// Bytes of user data (keys + values) this batch asks the store to hold.
    pub fn raw_bytes(&self) -> u64 {
        let a: usize = self
            .appends
            .iter()
            .map(|a| {
                // stream key + value, dedup key + (channel, offset, expiry)
                a.channel.len() + 9 + a.value.len() + a.msg_id.len() + a.channel.len() + 17
            })
            .sum();
        let h: usize = self.headers.iter().map(|(c, _)| c.len() + 25).sum();
        (a + h) as u64
    }
}

const WORDS: &[&str] = &[
    "hello",
    "ok",
    "on my way",
    "see you",
    "thanks",
    "lol",
    "meeting",
    "at",
    "the",
    "room",
    "price",
    "update",
    "order",
    "shipped",
    "score",
    "goal",
    "level",
    "ready",
    "now",
    "later",
];

/// Deterministic generator of Ferry appends.
pub struct Workload {
    rng: Rng,
    zipf: Zipf,
    pub names: Vec<String>,
    pub headers: Vec<Header>,
    salt: u64,
    next_index: u64,
    base_time_ms: u64,
}

impl Workload {
    pub fn new(seed: u64, name_prefix: &str) -> Self {
        Workload {
            rng: Rng::new(seed),
            zipf: Zipf::new(CHANNELS, ZIPF_S),
            names: (0..CHANNELS).map(|i| channel_name(name_prefix, i)).collect(),
            headers: vec![Header { epoch: seed & 0xffff, first: 0, top: 0 }; CHANNELS],
            salt: mix(seed ^ 0xFE55),
            next_index: 0,
            base_time_ms: 1_750_000_000_000,
        }
    }

    /// Records generated so far.
    pub fn count(&self) -> u64 {
        self.next_index
    }

    /// Message id of the `index`-th record generated (for dedup hits).
    pub fn id_of(&self, index: u64) -> String {
        message_id(self.salt, index)
    }

    /// A message id that was never generated (for dedup misses).
    pub fn missing_id(&self, index: u64) -> String {
        message_id(!self.salt, index)
    }

    pub fn channel_sample(&mut self, rng: &mut Rng) -> usize {
        self.zipf.sample(rng)
    }

    fn next_append(&mut self) -> (usize, Append) {
        let ch = self.zipf.sample(&mut self.rng);
        let index = self.next_index;
        self.next_index += 1;
        let h = &mut self.headers[ch];
        let offset = h.top;
        h.top += 1;
        let id = message_id(self.salt, index);
        let time_ms = self.base_time_ms + index;
        // A JSON-ish chat payload of 150-170 bytes: compressible like real text.
        let mut text = String::with_capacity(180);
        text.push_str(&format!("{{\"from\":\"user-{}\",\"seq\":{},\"text\":\"", self.rng.below(100_000), index));
        let target = 150 + self.rng.below(21) as usize;
        while text.len() < target - 2 {
            text.push_str(WORDS[self.rng.below(WORDS.len() as u64) as usize]);
            text.push(' ');
        }
        text.truncate(target - 2);
        text.push_str("\"}");
        let value = postcard::to_allocvec(&Publication { id: &id, time_ms, payload: text.as_bytes() })
            .expect("encode publication");
        (
            ch,
            Append {
                channel: self.names[ch].as_bytes().to_vec(),
                offset,
                msg_id: id.into_bytes(),
                value,
                expiry_ms: time_ms + DEDUP_TTL_MS,
            },
        )
    }

    /// The next `n` appends and the headers they leave behind.
    pub fn next_batch(&mut self, n: usize) -> Batch {
        let mut appends = Vec::with_capacity(n);
        let mut touched: Vec<usize> = Vec::new();
        for _ in 0..n {
            let (ch, a) = self.next_append();
            if !touched.contains(&ch) {
                touched.push(ch);
            }
            appends.push(a);
        }
        let headers = touched.into_iter().map(|ch| (self.names[ch].as_bytes().to_vec(), self.headers[ch])).collect();
        Batch { appends, headers, dedup: true }
    }
}

/// Stream key for the key-value engines: length-prefixed channel, then the
/// big-endian offset, so one channel's records are contiguous and ordered.
pub fn stream_key(channel: &[u8], offset: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(channel.len() + 9);
    k.push(channel.len() as u8);
    k.extend_from_slice(channel);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

pub fn offset_of_key(key: &[u8]) -> u64 {
    let n = key.len();
    u64::from_be_bytes(key[n - 8..].try_into().expect("8 bytes"))
}

pub fn encode_dedup(channel: &[u8], offset: u64, expiry_ms: u64) -> Vec<u8> {
    postcard::to_allocvec(&DedupEntry { channel: channel.to_vec(), offset, expiry_ms }).expect("encode dedup")
}

pub fn decode_dedup(bytes: &[u8]) -> anyhow::Result<DedupEntry> {
    Ok(postcard::from_bytes(bytes)?)
}

pub fn encode_header(h: &Header) -> Vec<u8> {
    postcard::to_allocvec(h).expect("encode header")
}

pub fn decode_header(bytes: &[u8]) -> anyhow::Result<Header> {
    Ok(postcard::from_bytes(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_model() {
        let mut w = Workload::new(7, "");
        let b = w.next_batch(1000);
        let avg = b.appends.iter().map(|a| a.value.len()).sum::<usize>() / 1000;
        assert!((180..=220).contains(&avg), "avg value {avg}");
        assert!(b.appends.iter().all(|a| a.msg_id.len() == 30));
        assert!(w.names.iter().all(|n| (10..=20).contains(&n.len())), "{:?}", w.names);
    }

    #[test]
    fn replay_is_deterministic() {
        let mut a = Workload::new(42, "x/");
        let mut b = Workload::new(42, "x/");
        for _ in 0..10 {
            let (ba, bb) = (a.next_batch(16), b.next_batch(16));
            for (x, y) in ba.appends.iter().zip(&bb.appends) {
                assert_eq!((&x.channel, x.offset, &x.value), (&y.channel, y.offset, &y.value));
            }
        }
    }

    #[test]
    fn zipf_is_skewed() {
        let z = Zipf::new(CHANNELS, ZIPF_S);
        let mut rng = Rng::new(1);
        let hot = (0..100_000).filter(|_| z.sample(&mut rng) == 0).count();
        assert!((11_000..15_000).contains(&hot), "rank-1 share {hot}");
    }
}
