//! Redis Cluster connections that are replaced when they are stuck.
//!
//! Design: the `redis` crate's Cluster client retries a command that timed
//! out on the same node, and never asks the cluster whether that node
//! still serves the slot. A primary that hangs (its sockets open, nothing
//! answering) and is replaced by its replica therefore keeps every command
//! for its slots timing out for good; after a primary was killed, one
//! node's connections were also seen answering "timed out" to every
//! command, healthy shards included (issue 14; docs/CLUSTER.md section 7).
//! A fresh connection from the same client reads the slots anew and works.
//! So every command's outcome is observed here: a run of timeouts (or a
//! connection whose task is gone) that lasts has the connections replaced
//! by fresh ones, built from the seeds in the background; commands
//! meanwhile use the old ones and fail as before, so a replacement never
//! blocks or reorders anything. A cluster merely failing over also times
//! out for a few seconds: replacing the connections then costs one
//! reconnect and loses nothing.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

/// Consecutive timeouts before the connections are suspected.
const STUCK_AFTER: u32 = 2;
/// ... and for how long they must have lasted (a failover takes about
/// `cluster-node-timeout` plus an election, so a short run is normal).
const STUCK_FOR: Duration = Duration::from_secs(2);
/// The least time between two replacements.
const REPLACE_EVERY: Duration = Duration::from_secs(5);

/// An engine's Cluster connections (one per use) and how to replace them.
/// They are replaced together: they share the client's failure modes, and a
/// publish needs both (its id claims on one, the script on the other), so
/// one that never sees a command would never be found stuck.
pub struct ClusterLink {
    client: ClusterClient,
    conns: RwLock<Vec<ClusterConnection>>,
    /// Timeouts in a row since the last answer, on any of them.
    timeouts: AtomicU32,
    /// When the current run of timeouts began, and the last replacement.
    times: Mutex<Times>,
    replacing: AtomicBool,
    replaced: AtomicU64,
}

#[derive(Default)]
struct Times {
    run_since: Option<Instant>,
    last_replaced: Option<Instant>,
}

/// One of a link's connections.
#[derive(Clone)]
pub struct ClusterConn {
    link: Arc<ClusterLink>,
    index: usize,
}

impl ClusterLink {
    /// Open `count` connections through `client` (its seeds).
    pub async fn connect(client: ClusterClient, count: usize) -> redis::RedisResult<Vec<ClusterConn>> {
        let conns = open(&client, count).await?;
        let link = Arc::new(ClusterLink {
            client,
            conns: RwLock::new(conns),
            timeouts: AtomicU32::new(0),
            times: Mutex::new(Times::default()),
            replacing: AtomicBool::new(false),
            replaced: AtomicU64::new(0),
        });
        Ok((0..count).map(|index| ClusterConn { link: link.clone(), index }).collect())
    }

    async fn replace(&self, seen: u32) {
        let count = self.conns.read().unwrap_or_else(|p| p.into_inner()).len();
        let t0 = Instant::now();
        let r = open(&self.client, count).await;
        let took = t0.elapsed();
        {
            let mut t = self.lock_times();
            t.last_replaced = Some(Instant::now());
            t.run_since = None;
        }
        match r {
            Ok(fresh) => {
                *self.conns.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                self.timeouts.store(0, Ordering::Relaxed);
                self.replaced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    timeouts = seen,
                    took = ?took,
                    "Redis Cluster connections answered only timeouts; replaced them with fresh ones"
                );
            }
            // The cluster does not answer either: try again after the pause.
            Err(e) => tracing::info!(error = %e, took = ?took, "Redis Cluster connections not replaced yet"),
        }
        self.replacing.store(false, Ordering::Release);
    }

    fn lock_times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn open(client: &ClusterClient, count: usize) -> redis::RedisResult<Vec<ClusterConnection>> {
    let opened = futures_util::future::join_all((0..count).map(|_| client.get_async_connection())).await;
    opened.into_iter().collect()
}

impl ClusterConn {
    /// The connection to use now (a cheap handle).
    pub fn get(&self) -> ClusterConnection {
        self.link.conns.read().unwrap_or_else(|p| p.into_inner())[self.index].clone()
    }

    /// How many times the link's connections were replaced.
    pub fn replaced(&self) -> u64 {
        self.link.replaced.load(Ordering::Relaxed)
    }

    /// Note a command's outcome; a lasting run of timeouts starts a
    /// replacement in the background.
    pub fn observe<T>(&self, r: &redis::RedisResult<T>) {
        let link = &self.link;
        let e = match r {
            Ok(_) => {
                if link.timeouts.load(Ordering::Relaxed) != 0 {
                    link.timeouts.store(0, Ordering::Relaxed);
                    link.lock_times().run_since = None;
                }
                return;
            }
            Err(e) => e,
        };
        // Server replies (MOVED, TRYAGAIN, NOSCRIPT, script errors) show a
        // working connection; only the silent failures count.
        if !(e.is_timeout() || stuck_message(&e.to_string())) {
            return;
        }
        let n = link.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let due = {
            let mut t = link.lock_times();
            let since = *t.run_since.get_or_insert(now);
            n >= STUCK_AFTER
                && now.duration_since(since) >= STUCK_FOR
                && t.last_replaced.is_none_or(|l| now.duration_since(l) >= REPLACE_EVERY)
        };
        if due && !link.replacing.swap(true, Ordering::AcqRel) {
            let link = link.clone();
            tokio::spawn(async move { link.replace(n).await });
        }
    }
}

/// Errors of a connection whose node or internal task no longer answers.
fn stuck_message(s: &str) -> bool {
    s.contains("timed out") || s.contains("Unable to send command") || s.contains("Unable to receive command")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_silent_failures_count() {
        assert!(stuck_message("timed out"));
        assert!(stuck_message("broken pipe - redis_cluster: Unable to send command"));
        assert!(!stuck_message("TRYAGAIN Multiple keys request during rehashing of slot"));
        assert!(!stuck_message("NOSCRIPT No matching script"));
    }
}
