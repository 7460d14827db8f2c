//! The one trait every engine sits behind: exactly the operations Ferry's
//! single-node store needs, nothing more.

use std::path::Path;

use anyhow::Result;

use crate::workload::{Batch, DedupEntry, Header};

pub trait Store {
    /// Writes every append, its dedup entry and the touched stream headers in
    /// one transaction, and returns only once that transaction is durable
    /// (fsynced). This is the group commit: Ferry acks the whole batch after it.
    fn commit(&mut self, batch: &Batch) -> Result<()>;

    /// Calls `f(offset, value)` for up to `limit` records of `channel` from
    /// `from` on, in offset order. Returns how many it visited.
    fn scan(&self, channel: &[u8], from: u64, limit: usize, f: &mut dyn FnMut(u64, &[u8])) -> Result<usize>;

    /// Looks a dedup entry up by message id.
    fn dedup_get(&self, msg_id: &[u8]) -> Result<Option<DedupEntry>>;

    /// Reads a stream header.
    fn header(&self, channel: &[u8]) -> Result<Option<Header>>;

    /// Retention: deletes records of `channel` below `new_first` (those from
    /// `old_first` on) and stores `header`, durably, in one transaction.
    /// Returns how many records were deleted.
    fn trim(&mut self, channel: &[u8], old_first: u64, header: Header) -> Result<u64>;

    /// Flushes and closes cleanly.
    fn close(self: Box<Self>) -> Result<()>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Redb,
    Fjall,
    /// fjall with its journal capped at 64 MiB (default 512 MiB): bounds
    /// replay on reopen and the journal's disk share, costs earlier flushes.
    FjallJ64,
    Sqlite,
}

impl Engine {
    pub const ALL: [Engine; 4] = [Engine::Redb, Engine::Fjall, Engine::FjallJ64, Engine::Sqlite];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Redb => "redb",
            Engine::Fjall => "fjall",
            Engine::FjallJ64 => "fjall-j64",
            Engine::Sqlite => "sqlite",
        }
    }

    pub fn parse(s: &str) -> Result<Engine> {
        Engine::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown engine {s:?} (redb, fjall, fjall-j64, sqlite)"))
    }

    /// Opens (creating if needed) the engine's store inside directory `dir`.
    pub fn open(self, dir: &Path) -> Result<Box<dyn Store>> {
        std::fs::create_dir_all(dir)?;
        Ok(match self {
            Engine::Redb => Box::new(crate::engines::redb::RedbStore::open(dir)?),
            Engine::Fjall => Box::new(crate::engines::fjall::FjallStore::open(dir, None)?),
            Engine::FjallJ64 => Box::new(crate::engines::fjall::FjallStore::open(dir, Some(64 << 20))?),
            Engine::Sqlite => Box::new(crate::engines::sqlite::SqliteStore::open(dir)?),
        })
    }
}

/// Same block-cache budget for every engine.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;
