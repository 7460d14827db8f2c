//! SQLite through rusqlite (bundled), WAL journal, `synchronous=FULL` so the
//! WAL is fsynced at every commit. Natural relational schema, clustered on
//! the primary keys (`WITHOUT ROWID`).

use std::path::Path;

use anyhow::Result;
use rusqlite::{params, Connection, OptionalExtension};

use crate::store::{Store, CACHE_BYTES};
use crate::workload::{Batch, DedupEntry, Header};

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let conn = Connection::open(dir.join("ferry.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "cache_size", -((CACHE_BYTES / 1024) as i64))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS streams (
                 ch BLOB NOT NULL, off INTEGER NOT NULL, val BLOB NOT NULL,
                 PRIMARY KEY (ch, off)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS dedup (
                 id BLOB PRIMARY KEY, ch BLOB NOT NULL, off INTEGER NOT NULL, exp INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS headers (
                 ch BLOB PRIMARY KEY, epoch INTEGER NOT NULL, first INTEGER NOT NULL, top INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )?;
        Ok(SqliteStore { conn })
    }
}

impl Store for SqliteStore {
    fn commit(&mut self, batch: &Batch) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached("INSERT INTO streams (ch, off, val) VALUES (?1, ?2, ?3)")?;
            let mut dd =
                tx.prepare_cached("INSERT OR REPLACE INTO dedup (id, ch, off, exp) VALUES (?1, ?2, ?3, ?4)")?;
            let mut hd =
                tx.prepare_cached("INSERT OR REPLACE INTO headers (ch, epoch, first, top) VALUES (?1, ?2, ?3, ?4)")?;
            for a in &batch.appends {
                ins.execute(params![a.channel, a.offset as i64, a.value])?;
                if batch.dedup {
                    dd.execute(params![a.msg_id, a.channel, a.offset as i64, a.expiry_ms as i64])?;
                }
            }
            for (ch, h) in &batch.headers {
                hd.execute(params![ch, h.epoch as i64, h.first as i64, h.top as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn scan(&self, channel: &[u8], from: u64, limit: usize, f: &mut dyn FnMut(u64, &[u8])) -> Result<usize> {
        let mut st = self
            .conn
            .prepare_cached("SELECT off, val FROM streams WHERE ch = ?1 AND off >= ?2 ORDER BY off LIMIT ?3")?;
        let mut rows = st.query(params![channel, from as i64, limit as i64])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            let off: i64 = row.get(0)?;
            let val = row.get_ref(1)?.as_blob()?;
            f(off as u64, val);
            n += 1;
        }
        Ok(n)
    }

    fn dedup_get(&self, msg_id: &[u8]) -> Result<Option<DedupEntry>> {
        let mut st = self.conn.prepare_cached("SELECT ch, off, exp FROM dedup WHERE id = ?1")?;
        Ok(st
            .query_row(params![msg_id], |r| {
                Ok(DedupEntry {
                    channel: r.get(0)?,
                    offset: r.get::<_, i64>(1)? as u64,
                    expiry_ms: r.get::<_, i64>(2)? as u64,
                })
            })
            .optional()?)
    }

    fn header(&self, channel: &[u8]) -> Result<Option<Header>> {
        let mut st = self.conn.prepare_cached("SELECT epoch, first, top FROM headers WHERE ch = ?1")?;
        Ok(st
            .query_row(params![channel], |r| {
                Ok(Header {
                    epoch: r.get::<_, i64>(0)? as u64,
                    first: r.get::<_, i64>(1)? as u64,
                    top: r.get::<_, i64>(2)? as u64,
                })
            })
            .optional()?)
    }

    fn trim(&mut self, channel: &[u8], old_first: u64, header: Header) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let deleted = tx.execute(
            "DELETE FROM streams WHERE ch = ?1 AND off >= ?2 AND off < ?3",
            params![channel, old_first as i64, header.first as i64],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO headers (ch, epoch, first, top) VALUES (?1, ?2, ?3, ?4)",
            params![channel, header.epoch as i64, header.first as i64, header.top as i64],
        )?;
        tx.commit()?;
        Ok(deleted as u64)
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.conn.close().map_err(|(_, e)| e)?;
        Ok(())
    }
}
