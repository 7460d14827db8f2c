//! Latency summaries, disk usage, machine description.

use std::path::Path;
use std::time::Duration;

#[derive(Clone, Copy, Default, Debug)]
pub struct Summary {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn summarize(lat: &mut [Duration]) -> Summary {
    if lat.is_empty() {
        return Summary::default();
    }
    lat.sort_unstable();
    let at = |q: f64| {
        let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e3
    };
    Summary { p50_ms: at(0.50), p99_ms: at(0.99), max_ms: at(1.0) }
}

/// (apparent bytes, allocated bytes) of everything under `dir`.
pub fn disk_usage(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut allocated) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let md = entry.metadata()?;
        if md.is_dir() {
            let (a, b) = disk_usage(&entry.path())?;
            apparent += a;
            allocated += b;
        } else {
            apparent += md.len();
            allocated += md.blocks() * 512;
        }
    }
    Ok((apparent, allocated))
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One line per fact about the machine and the data directory's filesystem.
pub fn machine(dir: &Path) -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    // The mount whose path is the longest prefix of the data directory.
    let canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let fs = mounts
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (dev, at, ty) = (it.next()?, it.next()?, it.next()?);
            canon.starts_with(at).then(|| (at.len(), format!("{ty} on {at} ({dev})")))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, s)| s)
        .unwrap_or_else(|| "unknown".into());
    vec![
        format!("cores (nproc): {cores}"),
        format!("CPU: {model}"),
        format!("memory: {mem}"),
        format!("kernel: {}", kernel.trim()),
        format!("data dir: {} — filesystem {fs}", dir.display()),
    ]
}

/// Versions of the engines actually linked, read from the lock file at build time.
pub fn engine_versions() -> String {
    let lock = include_str!("../Cargo.lock");
    let mut out = Vec::new();
    let mut name = "";
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = n.trim_matches('"');
        } else if let Some(v) = line.strip_prefix("version = ") {
            if ["redb", "fjall", "lsm-tree", "rusqlite", "libsqlite3-sys"].contains(&name) {
                out.push(format!("{name} {}", v.trim_matches('"')));
            }
        }
    }
    out.push(format!("SQLite {}", rusqlite::version()));
    out.join(", ")
}

/// Cost of the primitive every engine pays per durable commit, measured in
/// `dir` right now: (p50, p99) ms of a 4 KiB append + fsync, and of a 4 KiB
/// overwrite of already-allocated space + fdatasync. The machine is shared,
/// so this is printed next to the results it explains.
pub fn fsync_probe(dir: &Path) -> std::io::Result<((f64, f64), (f64, f64))> {
    use std::io::{Seek, SeekFrom, Write};
    let path = dir.join("fsync-probe");
    let page = [0x5au8; 4096];
    let mut f = std::fs::File::create(&path)?;
    let mut append = Vec::new();
    for _ in 0..50 {
        f.write_all(&page)?;
        let t = std::time::Instant::now();
        f.sync_all()?;
        append.push(t.elapsed());
    }
    let mut overwrite = Vec::new();
    for i in 0..50u64 {
        f.seek(SeekFrom::Start((i * 37 % 50) * 4096))?;
        f.write_all(&page)?;
        let t = std::time::Instant::now();
        f.sync_data()?;
        overwrite.push(t.elapsed());
    }
    drop(f);
    std::fs::remove_file(&path)?;
    let (a, o) = (summarize(&mut append), summarize(&mut overwrite));
    Ok(((a.p50_ms, a.p99_ms), (o.p50_ms, o.p99_ms)))
}

/// This process's `write_bytes` from /proc/self/io: bytes it caused to be
/// sent to the block device (fsync-driven writeback, compaction, flushes).
/// Machine-independent enough to compare engines on a noisy host.
pub fn disk_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time (ns) of every thread of this process except the main one: the
/// engines' background workers (fjall's flushes and compactions).
fn background_cpu_ns() -> u64 {
    let me = std::process::id().to_string();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| t.file_name().to_str() != Some(me.as_str()))
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum()
}

/// Waits until the engine's background work has drained: no background CPU
/// (< 1 ms per 20 ms) and no disk writes for three 20 ms intervals in a row,
/// or `cap`. Returns the time until that quiet streak began, i.e. how long
/// the writes just made kept the machine busy after `commit` returned.
pub fn settle(cap: Duration) -> Duration {
    let start = std::time::Instant::now();
    let tick = Duration::from_millis(20);
    let (mut cpu, mut io) = (background_cpu_ns(), disk_write_bytes());
    let mut quiet = 0;
    let mut quiet_since = start.elapsed();
    while quiet < 3 && start.elapsed() < cap {
        std::thread::sleep(tick);
        let (c, i) = (background_cpu_ns(), disk_write_bytes());
        if c.saturating_sub(cpu) < 1_000_000 && i == io {
            if quiet == 0 {
                quiet_since = start.elapsed() - tick;
            }
            quiet += 1;
        } else {
            quiet = 0;
        }
        (cpu, io) = (c, i);
    }
    if quiet < 3 {
        return start.elapsed();
    }
    quiet_since
}

/// The 1/5/15-minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ")
}
