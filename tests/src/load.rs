//! Load with checkable payloads: pipelined publishers, recording
//! subscribers, and the loss / duplicate / order verdict.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use ferry_client::{Client, Error, HistoryBound, HistoryRequest, Publication, PublishAck, Qos, Subscription};
use ferry_client::{StreamPosition, SubscriptionEvent};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

/// Which message this is: carried in the payload so subscribers can check
/// completeness and per-publisher order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag {
    /// Publisher number.
    pub publisher: u32,
    /// Sequence number within the publisher, counting from 0.
    pub seq: u32,
}

impl Tag {
    /// The end marker: a subscriber that sees it has seen everything
    /// stored before it, since delivery is in offset order.
    pub const END: Tag = Tag { publisher: u32::MAX, seq: u32::MAX };

    /// Payload: the tag and some filler, so frames are not trivially small.
    pub fn encode(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&self.publisher.to_be_bytes());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.resize(64, b'.');
        v
    }

    /// Read a payload back.
    pub fn decode(data: &[u8]) -> Option<Tag> {
        let p = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?);
        let s = u32::from_be_bytes(data.get(4..8)?.try_into().ok()?);
        Some(Tag { publisher: p, seq: s })
    }

    /// The tag of a publication.
    pub fn of(p: &Publication) -> Option<Tag> {
        Tag::decode(&p.payload.data.0)
    }
}

/// A publish in progress.
pub type PendingPublish = Pin<Box<dyn Future<Output = Result<PublishAck, Error>> + Send>>;

/// Hand a publish to the client now, so publishes enter its outbox in call
/// order, and return the future of its acknowledgement.
pub async fn submit(client: &Client, channel: &str, data: Vec<u8>, qos: Qos) -> PendingPublish {
    let (c, ch) = (client.clone(), channel.to_string());
    let mut fut: PendingPublish = Box::pin(async move { c.publish(&ch, data, qos).await });
    // The first poll sends the command to the client's task; the ack comes later.
    let early = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    match early {
        Poll::Ready(r) => Box::pin(async move { r }),
        Poll::Pending => fut,
    }
}

/// Publish `items` in order, keeping at most `window` unacknowledged;
/// `done(index, result)` is called as each completes. Returns when all
/// have completed.
pub async fn publish_pipelined<I>(
    client: &Client,
    items: I,
    window: usize,
    mut done: impl FnMut(usize, Result<PublishAck, Error>),
) where
    I: IntoIterator<Item = (String, Vec<u8>, Qos)>,
{
    let mut in_flight = FuturesUnordered::new();
    for (i, (channel, data, qos)) in items.into_iter().enumerate() {
        while in_flight.len() >= window {
            if let Some((j, r)) = in_flight.next().await {
                done(j, r);
            }
        }
        let fut = submit(client, &channel, data, qos).await;
        in_flight.push(async move { (i, fut.await) });
    }
    while let Some((j, r)) = in_flight.next().await {
        done(j, r);
    }
}

/// One publication as a subscriber saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Stream epoch.
    pub epoch: String,
    /// Offset.
    pub offset: u64,
    /// Message id.
    pub message_id: String,
    /// Decoded payload tag.
    pub tag: Option<Tag>,
    /// When it surfaced.
    pub at: std::time::Instant,
}

/// What one subscription delivered.
#[derive(Clone, Debug, Default)]
pub struct Record {
    /// Channel.
    pub channel: String,
    /// Publications in delivery order (the END marker excluded).
    pub seen: Vec<Seen>,
    /// `Subscribed` events after the first: one per resubscription.
    pub resubscribed: u32,
    /// When each of those arrived.
    pub resubscribed_at: Vec<std::time::Instant>,
    /// Resubscriptions that reported `recovered = false`.
    pub unrecovered: u32,
    /// Gap events.
    pub gaps: Vec<String>,
    /// The stream ended (code, reason).
    pub ended: Option<(u16, String)>,
    /// The END marker arrived.
    pub complete: bool,
}

/// Read `sub` (already past its first `Subscribed`) until the END marker,
/// the end of the stream, or `limit`.
pub async fn record(mut sub: Subscription, limit: Duration) -> Record {
    let mut r = Record { channel: sub.channel().to_string(), ..Record::default() };
    let end = tokio::time::Instant::now() + limit;
    loop {
        let e = match tokio::time::timeout_at(end, sub.next()).await {
            Ok(Some(e)) => e,
            Ok(None) | Err(_) => return r,
        };
        match e {
            SubscriptionEvent::Publication(p) => {
                let tag = Tag::of(&p);
                if tag == Some(Tag::END) {
                    r.complete = true;
                    return r;
                }
                let at = std::time::Instant::now();
                r.seen.push(Seen { epoch: p.epoch, offset: p.offset, message_id: p.message_id, tag, at });
            }
            SubscriptionEvent::Subscribed { recovered, .. } => {
                r.resubscribed += 1;
                r.resubscribed_at.push(std::time::Instant::now());
                if !recovered {
                    r.unrecovered += 1;
                }
            }
            SubscriptionEvent::Gap { from, to, reason } => r.gaps.push(format!("{from:?} -> {to:?}: {reason:?}")),
            SubscriptionEvent::Ended { code, reason } => {
                r.ended = Some((code, reason));
                return r;
            }
            SubscriptionEvent::Join(_) | SubscriptionEvent::Leave(_) => {}
        }
    }
}

/// The next `n` publications of `sub` (fewer if `limit` passes or the
/// stream ends). Panics on a gap: callers expect none.
pub async fn take(sub: &mut Subscription, n: usize, limit: Duration) -> Vec<Publication> {
    let end = tokio::time::Instant::now() + limit;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout_at(end, sub.next()).await {
            Ok(Some(SubscriptionEvent::Publication(p))) => out.push(p),
            Ok(Some(SubscriptionEvent::Gap { from, to, reason })) => {
                panic!("{}: gap {from:?} -> {to:?} ({reason:?})", sub.channel())
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// A subscriber's delivery compared with what it should have received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Publications delivered.
    pub delivered: usize,
    /// Expected messages never delivered.
    pub lost: usize,
    /// Messages delivered more than once (at any offsets).
    pub duplicates: usize,
    /// Deliveries whose (epoch, offset) did not increase.
    pub offset_regressions: usize,
    /// Deliveries of a publisher's message after a later one of it.
    pub fifo_violations: usize,
    /// Deliveries of messages not expected on this channel.
    pub unexpected: usize,
}

impl Verdict {
    /// Compare `record` with the `expected` messages.
    pub fn of(record: &Record, expected: &BTreeSet<Tag>) -> Verdict {
        let mut v = Verdict { delivered: record.seen.len(), ..Verdict::default() };
        let mut got = BTreeSet::new();
        let mut last_pos: Option<(&str, u64)> = None;
        let mut last_seq: BTreeMap<u32, u32> = BTreeMap::new();
        for s in &record.seen {
            match last_pos {
                Some((e, o)) if e == s.epoch && s.offset <= o => v.offset_regressions += 1,
                _ => {}
            }
            last_pos = Some((&s.epoch, s.offset));
            let Some(tag) = s.tag else {
                v.unexpected += 1;
                continue;
            };
            if !expected.contains(&tag) {
                v.unexpected += 1;
            }
            if !got.insert(tag) {
                v.duplicates += 1;
                continue;
            }
            if let Some(prev) = last_seq.insert(tag.publisher, tag.seq) {
                if tag.seq < prev {
                    v.fifo_violations += 1;
                }
            }
        }
        v.lost = expected.difference(&got).count();
        v
    }

    /// Sum over subscribers.
    pub fn add(&mut self, o: &Verdict) {
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.offset_regressions += o.offset_regressions;
        self.fifo_violations += o.fifo_violations;
        self.unexpected += o.unexpected;
    }
}

/// Every retained publication of `channel`, oldest first, paging through
/// history (the server caps one page), and the stream's top position.
pub async fn full_history(client: &Client, channel: &str) -> Result<(Vec<Publication>, StreamPosition), Error> {
    let mut all: Vec<Publication> = Vec::new();
    // Bounded: each page advances by at least one offset, and the loop
    // stops at the top it reports.
    for _ in 0..100_000 {
        let since = all.last().map(|p| HistoryBound::Offset(p.offset + 1));
        let req = HistoryRequest { channel: channel.into(), since, until: None, limit: 1000, reverse: false };
        let (page, top) = client.history(req).await?;
        if let Some(first) = all.first() {
            assert_eq!(first.epoch, top.epoch, "{channel}: epoch changed while paging history");
        }
        let done = page.is_empty() || page.last().is_some_and(|p| p.offset >= top.offset);
        all.extend(page);
        if done {
            return Ok((all, top));
        }
    }
    panic!("{channel}: history paging did not end");
}

/// The outcome of each publish of a [`TaggedLoad`], by its sequence number.
pub type Outcomes = Vec<Option<Result<PublishAck, Error>>>;

/// A publisher sending tagged QoS 2 / QoS 1 publishes (alternating) into
/// one channel, pipelined, until finished.
pub struct TaggedLoad {
    /// Publishes completed so far (acknowledged or failed); wait on it.
    pub acked: std::sync::Arc<tokio::sync::watch::Sender<usize>>,
    results: std::sync::Arc<std::sync::Mutex<Outcomes>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Start a [`TaggedLoad`] from `client` into `channel`, `window` in flight.
pub fn tagged_load(client: &Client, channel: &str, window: usize) -> TaggedLoad {
    use std::sync::atomic::Ordering;
    let acked = std::sync::Arc::new(tokio::sync::watch::Sender::new(0usize));
    let results: std::sync::Arc<std::sync::Mutex<Outcomes>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (client, channel) = (client.clone(), channel.to_string());
    let (r, a, s) = (results.clone(), acked.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let items = (0u32..).take_while(move |_| !s.load(Ordering::Relaxed)).map(move |seq| {
            let qos = if seq % 2 == 0 { Qos::ExactlyOnce } else { Qos::AtLeastOnce };
            (channel.clone(), Tag { publisher: 0, seq }.encode(), qos)
        });
        publish_pipelined(&client, items, window, |i, res| {
            let mut all = r.lock().unwrap();
            if all.len() <= i {
                all.resize(i + 1, None);
            }
            all[i] = Some(res);
            a.send_modify(|n| *n += 1);
        })
        .await;
    });
    TaggedLoad { acked, results, stop, task }
}

impl TaggedLoad {
    /// Stop issuing publishes, wait (at most `limit`) for those in flight
    /// to settle, and return every outcome in sequence order.
    pub async fn finish(self, limit: Duration) -> Outcomes {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(limit, self.task).await.expect("in-flight publishes settle").unwrap();
        std::mem::take(&mut *self.results.lock().unwrap())
    }
}
