//! Durable client state: where the outbox, stream positions and dedup
//! window live between app restarts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_core::client::Snapshot;

/// Where a client keeps its durable state. `save` must be durable when it
/// returns: the client acknowledges deliveries and sends publishes only
/// after the state that covers them is saved.
pub trait Storage: Send + Sync + 'static {
    /// The saved state, if any.
    fn load(&self) -> std::io::Result<Option<Snapshot>>;
    /// Replace the saved state.
    fn save(&self, snapshot: &Snapshot) -> std::io::Result<()>;
}

/// State in memory only: survives reconnects, not process restarts.
#[derive(Default)]
pub struct MemoryStorage {
    state: Mutex<Option<Snapshot>>,
}

impl Storage for MemoryStorage {
    fn load(&self) -> std::io::Result<Option<Snapshot>> {
        Ok(self.state.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
    fn save(&self, snapshot: &Snapshot) -> std::io::Result<()> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot.clone());
        Ok(())
    }
}

/// State in one JSON file, replaced atomically (write, fsync, rename).
pub struct FileStorage {
    path: PathBuf,
}

impl FileStorage {
    /// Keep the state in `dir/ferry-client-<device>.json`.
    pub fn in_dir(dir: &Path, device_id: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let safe: String =
            device_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        Ok(FileStorage { path: dir.join(format!("ferry-client-{safe}.json")) })
    }
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Storage for FileStorage {
    fn load(&self) -> std::io::Result<Option<Snapshot>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&self, snapshot: &Snapshot) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(snapshot).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        // The rename itself must survive a crash too.
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}
