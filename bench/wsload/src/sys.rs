//! What the generator reads from and asks of the operating system: CPU
//! pinning, the open-file limit, per-process CPU time and RSS from /proc,
//! and the machine facts every report carries.

use std::process::Command;
use std::time::Instant;

use serde::Serialize;

/// Linux USER_HZ, the unit of CPU times in /proc/<pid>/stat.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Pin every thread of this process to `cpu` with `taskset`, before the
/// runtime starts any. Design: the external tool rather than
/// `sched_setaffinity`, because the workspace forbids `unsafe`.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    let out = Command::new("taskset").args(["-a", "-p", "-c", &cpu.to_string(), &pid]).output()?;
    anyhow::ensure!(out.status.success(), "taskset failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Raise the soft RLIMIT_NOFILE of this process to its hard limit (with
/// `prlimit`, again to avoid `unsafe`). Children inherit it, which is how
/// the servers under test get enough descriptors too. Returns the soft
/// limit now in force.
pub fn raise_nofile() -> Option<u64> {
    let hard = limit_field(2)?;
    let pid = std::process::id().to_string();
    let _ = Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={hard}:{hard}")]).output();
    limit_field(1)
}

/// Field `i` (1 = soft, 2 = hard) of "Max open files" in /proc/self/limits.
fn limit_field(i: usize) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().nth(i - 1)?.parse().ok()
}

/// User + system CPU seconds of a process (all its threads).
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command may contain spaces; fields resume after the last ')'.
    let Some(close) = stat.rfind(')') else { return 0.0 };
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After ')': state is index 0, utime 11, stime 12 (fields 14 and 15 of proc(5)).
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (get(11) + get(12)) as f64 / CLOCK_TICKS_PER_SEC
}

/// VmRSS of a process, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Busy CPU seconds of the whole machine (every CPU, steal included).
fn machine_busy_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else { return 0.0 };
    // cpu user nice system idle iowait irq softirq steal ...
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    (get(0) + get(1) + get(2) + get(5) + get(6) + get(7)) as f64 / CLOCK_TICKS_PER_SEC
}

/// CPU use of the server, of the generator, and of everything else on
/// the machine (other builds share it) over an interval.
pub struct CpuMeter {
    server: u32,
    at: Instant,
    server_cpu: f64,
    gen_cpu: f64,
    busy: f64,
}

impl CpuMeter {
    /// Start measuring now.
    pub fn start(server: u32) -> CpuMeter {
        CpuMeter {
            server,
            at: Instant::now(),
            server_cpu: cpu_secs(server),
            gen_cpu: cpu_secs(std::process::id()),
            busy: machine_busy_secs(),
        }
    }

    /// (server, generator, everything else), each in % of one core, since
    /// `start`.
    pub fn stop(&self) -> (f64, f64, f64) {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let s = cpu_secs(self.server) - self.server_cpu;
        let g = cpu_secs(std::process::id()) - self.gen_cpu;
        let other = (machine_busy_secs() - self.busy - s - g).max(0.0);
        (s / wall * 100.0, g / wall * 100.0, other / wall * 100.0)
    }
}

/// The machine a result was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// `uname -r`.
    pub kernel: String,
    /// Total memory, MiB.
    pub mem_mib: u64,
    /// Load averages when the run started (other builds share the machine).
    pub loadavg: String,
    /// Soft open-file limit of the generator (and so of the servers).
    pub nofile: Option<u64>,
}

impl Machine {
    /// Read the facts now.
    pub fn probe(nofile: Option<u64>) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown CPU".into(), |(_, m)| m.trim().to_string());
        let mem_mib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024);
        Machine {
            // Not available_parallelism: that honours this process's
            // affinity mask, which pinning has cut to one CPU.
            nproc: read("/proc/cpuinfo").lines().filter(|l| l.starts_with("processor")).count().max(1),
            cpu,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            mem_mib,
            loadavg: read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            nofile,
        }
    }

    /// One line for tables.
    pub fn line(&self) -> String {
        format!(
            "nproc {}, {}, kernel {}, {} MiB RAM, loadavg at start {}, nofile {}",
            self.nproc,
            self.cpu,
            self.kernel,
            self.mem_mib,
            self.loadavg,
            self.nofile.map_or_else(|| "?".into(), |n| n.to_string())
        )
    }
}
