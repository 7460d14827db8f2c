//! fjall: LSM-tree with a shared journal. One `WriteBatch` spans the three
//! keyspaces atomically; `PersistMode::SyncAll` fsyncs the journal before
//! `commit` returns.

use std::path::Path;

use anyhow::Result;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::store::{Store, CACHE_BYTES};
use crate::workload::{
    decode_dedup, decode_header, encode_dedup, encode_header, offset_of_key, stream_key, Batch, DedupEntry, Header,
};

pub struct FjallStore {
    db: Database,
    streams: Keyspace,
    dedup: Keyspace,
    headers: Keyspace,
}

impl FjallStore {
    /// `max_journal`: cap on the journal size (fjall's default is 512 MiB).
    pub fn open(dir: &Path, max_journal: Option<u64>) -> Result<Self> {
        let mut builder = Database::builder(dir.join("fjall")).cache_size(CACHE_BYTES as u64);
        if let Some(bytes) = max_journal {
            builder = builder.max_journaling_size(bytes);
        }
        let db = builder.open()?;
        let streams = db.keyspace("streams", KeyspaceCreateOptions::default)?;
        let dedup = db.keyspace("dedup", KeyspaceCreateOptions::default)?;
        let headers = db.keyspace("headers", KeyspaceCreateOptions::default)?;
        Ok(FjallStore { db, streams, dedup, headers })
    }
}

impl Store for FjallStore {
    fn commit(&mut self, batch: &Batch) -> Result<()> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        for a in &batch.appends {
            b.insert(&self.streams, stream_key(&a.channel, a.offset), a.value.as_slice());
            if batch.dedup {
                b.insert(&self.dedup, a.msg_id.as_slice(), encode_dedup(&a.channel, a.offset, a.expiry_ms));
            }
        }
        for (ch, h) in &batch.headers {
            b.insert(&self.headers, ch.as_slice(), encode_header(h));
        }
        b.commit()?;
        Ok(())
    }

    fn scan(&self, channel: &[u8], from: u64, limit: usize, f: &mut dyn FnMut(u64, &[u8])) -> Result<usize> {
        let (lo, hi) = (stream_key(channel, from), stream_key(channel, u64::MAX));
        let mut n = 0;
        for guard in self.streams.range(lo..=hi).take(limit) {
            let (k, v) = guard.into_inner()?;
            f(offset_of_key(&k), &v);
            n += 1;
        }
        Ok(n)
    }

    fn dedup_get(&self, msg_id: &[u8]) -> Result<Option<DedupEntry>> {
        self.dedup.get(msg_id)?.map(|v| decode_dedup(&v)).transpose()
    }

    fn header(&self, channel: &[u8]) -> Result<Option<Header>> {
        self.headers.get(channel)?.map(|v| decode_header(&v)).transpose()
    }

    fn trim(&mut self, channel: &[u8], old_first: u64, header: Header) -> Result<u64> {
        // No range delete in the public API: find the keys, write tombstones.
        let (lo, hi) = (stream_key(channel, old_first), stream_key(channel, header.first));
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        let mut deleted = 0;
        for guard in self.streams.range(lo..hi) {
            b.remove(&self.streams, guard.key()?);
            deleted += 1;
        }
        b.insert(&self.headers, channel, encode_header(&header));
        b.commit()?;
        Ok(deleted)
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.db.persist(PersistMode::SyncAll)?;
        let FjallStore { db, streams, dedup, headers } = *self;
        drop((streams, dedup, headers));
        drop(db);
        Ok(())
    }
}
