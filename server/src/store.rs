//! Durable stream storage.
//!
//! [`Store`] is the engine seam: the embedded implementation here keeps
//! everything in one redb file (see docs/STORAGE.md for why); a networked
//! engine (Redis) implements the same calls. All writes go through
//! [`Store::commit`] in batches, so one fsync covers many publishes
//! (group commit).

use std::collections::HashMap;
use std::path::Path;

use ferry_core::frame::{ClientInfo, Payload, Publication, Qos};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Storage failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The engine failed.
    #[error("storage engine: {0}")]
    Engine(String),
    /// A stored record does not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

macro_rules! engine_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Engine(e.to_string())
            }
        }
    )*};
}
engine_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// The persisted state of one channel stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// Stream generation.
    pub epoch: String,
    /// Oldest retained offset (`top + 1` when nothing is retained).
    pub first: u64,
    /// Newest offset (0 = none yet).
    pub top: u64,
}

/// Where a message id was stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupEntry {
    /// Channel.
    pub channel: String,
    /// Epoch.
    pub epoch: String,
    /// Offset.
    pub offset: u64,
    /// Forget after this wall time, Unix ms.
    pub expires_ms: u64,
    /// Digest of the payload the id was first stored with (`None` for
    /// entries written before digests were kept): a reuse of the id with
    /// other data is refused instead of answered as a duplicate.
    pub digest: Option<[u8; 16]>,
}

/// The record layout before `digest` existed; still read so that ids
/// stored by an older server keep deduplicating after an upgrade.
#[derive(Deserialize)]
struct DedupEntryV0 {
    channel: String,
    epoch: String,
    offset: u64,
    expires_ms: u64,
}

impl DedupEntry {
    /// Decode either layout.
    fn decode(b: &[u8]) -> Result<DedupEntry, StoreError> {
        if let Ok(e) = postcard::from_bytes::<DedupEntry>(b) {
            return Ok(e);
        }
        let v0: DedupEntryV0 = dec(b)?;
        Ok(DedupEntry {
            channel: v0.channel,
            epoch: v0.epoch,
            offset: v0.offset,
            expires_ms: v0.expires_ms,
            digest: None,
        })
    }
}

/// A stored publication, without the fields the key carries.
#[derive(Serialize, Deserialize)]
struct StoredPub {
    epoch: String,
    message_id: String,
    qos: u8,
    publisher: Option<ClientInfo>,
    time_ms: u64,
    payload: Vec<u8>,
}

/// [`StoredPub`] borrowed from a publication, for writing: the same
/// postcard layout without copying the payload first.
#[derive(Serialize)]
struct StoredPubRef<'a> {
    epoch: &'a str,
    message_id: &'a str,
    qos: u8,
    publisher: &'a Option<ClientInfo>,
    time_ms: u64,
    payload: &'a [u8],
}

/// One durable batch.
#[derive(Default, Debug)]
pub struct Batch {
    /// New publications (payloads uncompressed).
    pub appends: Vec<Publication>,
    /// Stream headers to write.
    pub headers: Vec<(String, StreamHeader)>,
    /// Retention: delete offsets below this, per channel.
    pub trims: Vec<(String, u64)>,
    /// Dedup entries to add.
    pub dedup_put: Vec<(String, DedupEntry)>,
    /// Dedup entries to drop (QoS 2 release).
    pub dedup_del: Vec<String>,
    /// Offline cursors to write: key → (epoch, offset).
    pub cursors: Vec<(String, (String, u64))>,
}

impl Batch {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.headers.is_empty()
            && self.trims.is_empty()
            && self.dedup_put.is_empty()
            && self.dedup_del.is_empty()
            && self.cursors.is_empty()
    }
}

/// The storage engine seam.
pub trait Store: Send + Sync + 'static {
    /// Every stream header.
    fn headers(&self) -> Result<Vec<(String, StreamHeader)>, StoreError>;
    /// Apply a batch atomically and durably (fsync before returning).
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
    /// Publications of `channel` with offsets `from..`, ascending: at most
    /// `limit` of them, and no more once `max_bytes` of payload are read
    /// (always at least one).
    fn range(&self, channel: &str, from: u64, limit: usize, max_bytes: usize) -> Result<Vec<Publication>, StoreError>;
    /// A dedup entry.
    fn dedup(&self, message_id: &str) -> Result<Option<DedupEntry>, StoreError>;
    /// The dedup entries of `ids` that exist, read at one point in time
    /// (the sequencer asks once per batch).
    fn dedup_many(&self, ids: &[&str]) -> Result<HashMap<String, DedupEntry>, StoreError> {
        let mut out = HashMap::new();
        for id in ids {
            if let Some(e) = self.dedup(id)? {
                out.insert((*id).to_string(), e);
            }
        }
        Ok(out)
    }
    /// An offline cursor.
    fn cursor(&self, key: &str) -> Result<Option<(String, u64)>, StoreError>;
}

const PUBS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("pubs");
const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
const DEDUP: TableDefinition<&str, &[u8]> = TableDefinition::new("dedup");
const CURSORS: TableDefinition<&str, &[u8]> = TableDefinition::new("cursors");

/// The embedded engine: one redb file.
pub struct RedbStore {
    db: Option<Database>,
    /// Told once the file is closed (dropping a database flushes, which
    /// takes a moment; a restart in the same process must wait for it).
    closed: Option<std::sync::mpsc::Sender<()>>,
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Fields drop after this body, so close the file here first.
        drop(self.db.take());
        if let Some(tx) = self.closed.take() {
            let _ = tx.send(());
        }
    }
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("encoding a stored record cannot fail")
}

fn dec<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl RedbStore {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Engine(format!("{}: {e}", dir.display())))?;
        let db = Database::create(dir.join("ferry.redb"))?;
        let txn = db.begin_write()?;
        for t in [STREAMS, DEDUP, CURSORS] {
            txn.open_table(t)?;
        }
        txn.open_table(PUBS)?;
        txn.commit()?;
        Ok(RedbStore { db: Some(db), closed: None })
    }
}

impl RedbStore {
    fn db(&self) -> &Database {
        self.db.as_ref().expect("the database is open until the store is dropped")
    }

    /// A receiver told when this store's file is closed.
    pub fn on_close(&mut self) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.closed = Some(tx);
        rx
    }
}

impl Store for RedbStore {
    fn headers(&self) -> Result<Vec<(String, StreamHeader)>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(STREAMS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), dec(v.value())?));
        }
        Ok(out)
    }

    fn commit(&self, b: &Batch) -> Result<(), StoreError> {
        let mut txn = self.db().begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut pubs = txn.open_table(PUBS)?;
            let mut rec_buf = Vec::new();
            for p in &b.appends {
                let rec = StoredPubRef {
                    epoch: &p.epoch,
                    message_id: &p.message_id,
                    qos: p.qos.as_u8(),
                    publisher: &p.publisher,
                    time_ms: p.time_ms,
                    payload: &p.payload.data.0,
                };
                rec_buf.clear();
                let out = postcard::to_io(&rec, &mut rec_buf).map(|_| ());
                out.expect("encoding a stored record cannot fail");
                pubs.insert((p.channel.as_str(), p.offset), rec_buf.as_slice())?;
            }
            for (ch, below) in &b.trims {
                pubs.retain_in((ch.as_str(), 0)..(ch.as_str(), *below), |_, _| false)?;
            }
            let mut streams = txn.open_table(STREAMS)?;
            for (ch, h) in &b.headers {
                streams.insert(ch.as_str(), enc(h).as_slice())?;
            }
            let mut dedup = txn.open_table(DEDUP)?;
            for (id, e) in &b.dedup_put {
                dedup.insert(id.as_str(), enc(e).as_slice())?;
            }
            for id in &b.dedup_del {
                dedup.remove(id.as_str())?;
            }
            let mut cursors = txn.open_table(CURSORS)?;
            for (k, c) in &b.cursors {
                cursors.insert(k.as_str(), enc(c).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn range(&self, channel: &str, from: u64, limit: usize, max_bytes: usize) -> Result<Vec<Publication>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(PUBS)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in t.range((channel, from)..=(channel, u64::MAX))? {
            if out.len() >= limit || (bytes >= max_bytes && !out.is_empty()) {
                break;
            }
            let (k, v) = row?;
            let (_, offset) = k.value();
            let r: StoredPub = dec(v.value())?;
            bytes += r.payload.len();
            out.push(Publication {
                channel: channel.to_string(),
                epoch: r.epoch,
                offset,
                message_id: r.message_id,
                qos: Qos::from_u8(r.qos).unwrap_or(Qos::AtMostOnce),
                publisher: r.publisher,
                time_ms: r.time_ms,
                payload: Payload { z: false, data: r.payload.into() },
            });
        }
        Ok(out)
    }

    fn dedup(&self, message_id: &str) -> Result<Option<DedupEntry>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(DEDUP)?;
        match t.get(message_id)? {
            Some(v) => Ok(Some(DedupEntry::decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn dedup_many(&self, ids: &[&str]) -> Result<HashMap<String, DedupEntry>, StoreError> {
        let mut out = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        // One read transaction for the batch: opening one per publish was
        // a tenth of the sequencer's time.
        let txn = self.db().begin_read()?;
        let t = txn.open_table(DEDUP)?;
        for id in ids {
            if let Some(v) = t.get(*id)? {
                out.insert((*id).to_string(), DedupEntry::decode(v.value())?);
            }
        }
        Ok(out)
    }

    fn cursor(&self, key: &str) -> Result<Option<(String, u64)>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(CURSORS)?;
        match t.get(key)? {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_is_written_in_the_layout_it_is_read_in() {
        let publisher = Some(ClientInfo { client: "c1".into(), user: "u".into(), info: None });
        let rec = StoredPubRef {
            epoch: "e1",
            message_id: "m-1",
            qos: 1,
            publisher: &publisher,
            time_ms: 42,
            payload: b"\x00\xffhello",
        };
        let mut buf = Vec::new();
        postcard::to_io(&rec, &mut buf).unwrap();
        let back: StoredPub = dec(&buf).unwrap();
        assert_eq!((back.epoch.as_str(), back.message_id.as_str(), back.qos, back.time_ms), ("e1", "m-1", 1, 42));
        assert_eq!((back.publisher, back.payload.as_slice()), (publisher, &b"\x00\xffhello"[..]));
    }

    #[test]
    fn dedup_entries_written_before_digests_still_decode() {
        #[derive(Serialize)]
        struct V0<'a> {
            channel: &'a str,
            epoch: &'a str,
            offset: u64,
            expires_ms: u64,
        }
        let old = enc(&V0 { channel: "chat:1", epoch: "e1", offset: 7, expires_ms: 99 });
        let e = DedupEntry::decode(&old).unwrap();
        assert_eq!((e.channel.as_str(), e.offset, e.expires_ms, e.digest), ("chat:1", 7, 99, None));
        let new = DedupEntry { digest: Some([3; 16]), ..e };
        assert_eq!(DedupEntry::decode(&enc(&new)).unwrap(), new);
        assert!(DedupEntry::decode(b"\x05ab").is_err());
    }
}
