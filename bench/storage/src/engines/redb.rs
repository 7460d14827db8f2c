//! redb: copy-on-write B-tree in one file. `Durability::Immediate` (the
//! default) fsyncs before `commit` returns.

use std::path::Path;

use anyhow::Result;
use redb::{Database, ReadableDatabase, TableDefinition};

use crate::store::{Store, CACHE_BYTES};
use crate::workload::{
    decode_dedup, decode_header, encode_dedup, encode_header, offset_of_key, stream_key, Batch, DedupEntry, Header,
};

const STREAMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("streams");
const DEDUP: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dedup");
const HEADERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("headers");

pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(dir.join("ferry.redb"))?;
        // Create the tables up front so readers never see them missing.
        let tx = db.begin_write()?;
        tx.open_table(STREAMS)?;
        tx.open_table(DEDUP)?;
        tx.open_table(HEADERS)?;
        tx.commit()?;
        Ok(RedbStore { db })
    }
}

impl Store for RedbStore {
    fn commit(&mut self, batch: &Batch) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut streams = tx.open_table(STREAMS)?;
            let mut dedup = tx.open_table(DEDUP)?;
            let mut headers = tx.open_table(HEADERS)?;
            for a in &batch.appends {
                streams.insert(stream_key(&a.channel, a.offset).as_slice(), a.value.as_slice())?;
                if batch.dedup {
                    dedup.insert(a.msg_id.as_slice(), encode_dedup(&a.channel, a.offset, a.expiry_ms).as_slice())?;
                }
            }
            for (ch, h) in &batch.headers {
                headers.insert(ch.as_slice(), encode_header(h).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn scan(&self, channel: &[u8], from: u64, limit: usize, f: &mut dyn FnMut(u64, &[u8])) -> Result<usize> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(STREAMS)?;
        let (lo, hi) = (stream_key(channel, from), stream_key(channel, u64::MAX));
        let mut n = 0;
        for item in t.range(lo.as_slice()..=hi.as_slice())?.take(limit) {
            let (k, v) = item?;
            f(offset_of_key(k.value()), v.value());
            n += 1;
        }
        Ok(n)
    }

    fn dedup_get(&self, msg_id: &[u8]) -> Result<Option<DedupEntry>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DEDUP)?;
        t.get(msg_id)?.map(|v| decode_dedup(v.value())).transpose()
    }

    fn header(&self, channel: &[u8]) -> Result<Option<Header>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HEADERS)?;
        t.get(channel)?.map(|v| decode_header(v.value())).transpose()
    }

    fn trim(&mut self, channel: &[u8], old_first: u64, header: Header) -> Result<u64> {
        let tx = self.db.begin_write()?;
        let mut deleted = 0;
        {
            let mut streams = tx.open_table(STREAMS)?;
            let (lo, hi) = (stream_key(channel, old_first), stream_key(channel, header.first));
            streams.retain_in(lo.as_slice()..hi.as_slice(), |_, _| {
                deleted += 1;
                false
            })?;
            tx.open_table(HEADERS)?.insert(channel, encode_header(&header).as_slice())?;
        }
        tx.commit()?;
        Ok(deleted)
    }

    fn close(self: Box<Self>) -> Result<()> {
        drop(self.db);
        Ok(())
    }
}
