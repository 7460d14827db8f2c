//! kill -9 durability check. A child process appends and prints
//! `acked <total>` after every durable commit; the parent SIGKILLs it at a
//! random moment, reopens the store and checks that every acknowledged record,
//! its dedup entry and its header position survived.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::store::Engine;
use crate::workload::{Rng, Workload, CHANNELS};

/// Stop a child that was somehow never killed.
const CHILD_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct CrashRound {
    pub batch: usize,
    pub killed_after_ms: u64,
    pub acked: u64,
    pub lost: u64,
    pub beyond_ack: u64,
    pub reopen_s: f64,
    pub error: Option<String>,
}

impl CrashRound {
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.error.is_none()
    }
}

fn round_prefix(round: usize) -> String {
    format!("k{round}/")
}

/// Entry point of the `crash-child` subcommand.
pub fn child(engine: Engine, dir: &Path, seed: u64, batch: usize, round: usize) -> Result<()> {
    let mut store = engine.open(dir)?;
    let mut w = Workload::new(seed, &round_prefix(round));
    let out = std::io::stdout();
    writeln!(out.lock(), "ready")?;
    let start = Instant::now();
    while start.elapsed() < CHILD_MAX {
        let b = w.next_batch(batch);
        store.commit(&b)?;
        // Only now is the batch acknowledged.
        let mut o = out.lock();
        writeln!(o, "acked {}", w.count())?;
        o.flush()?;
    }
    Ok(())
}

pub fn round(engine: Engine, dir: &Path, round: usize, batch: usize, rng: &mut Rng) -> Result<CrashRound> {
    let seed = rng.next_u64();
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["crash-child", engine.name()])
        .arg(dir)
        .args([seed.to_string(), batch.to_string(), round.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn crash child")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(l) if l == "ready" => {}
        other => {
            let _ = child.kill();
            bail!("crash child did not get ready: {other:?}");
        }
    }
    let killed_after_ms = 300 + rng.below(1_200);
    std::thread::sleep(Duration::from_millis(killed_after_ms));
    child.kill()?; // SIGKILL
    child.wait()?;
    reader.join().expect("reader thread");
    // `lines()` only yields complete lines: a half-written last line is ignored.
    let acked =
        rx.try_iter().filter_map(|l| l.strip_prefix("acked ").and_then(|n| n.parse::<u64>().ok())).max().unwrap_or(0);

    let t = Instant::now();
    let store = engine.open(dir)?;
    let reopen_s = t.elapsed().as_secs_f64();

    // Replay the child's deterministic stream and look every acked record up.
    let mut w = Workload::new(seed, &round_prefix(round));
    let mut lost = 0;
    let mut error = None;
    let mut max_off: Vec<Option<u64>> = vec![None; CHANNELS];
    for _ in 0..acked {
        let b = w.next_batch(1);
        let a = &b.appends[0];
        let mut found = None;
        store.scan(&a.channel, a.offset, 1, &mut |off, v| found = Some((off, v.to_vec())))?;
        let dedup = store.dedup_get(&a.msg_id)?;
        let ok_rec = found.as_ref().is_some_and(|(off, v)| *off == a.offset && *v == a.value);
        let ok_dedup = dedup.as_ref().is_some_and(|d| d.offset == a.offset && d.channel == a.channel);
        if !(ok_rec && ok_dedup) {
            lost += 1;
        }
        let ch = w.names.iter().position(|n| n.as_bytes() == a.channel.as_slice()).expect("known channel");
        max_off[ch] = Some(max_off[ch].map_or(a.offset, |m| m.max(a.offset)));
    }
    for (ch, m) in max_off.iter().enumerate() {
        if let Some(m) = m {
            let h = store.header(w.names[ch].as_bytes())?;
            if h.is_none_or(|h| h.top <= *m) {
                error = Some(format!("header of {} behind acked offset {m}: {h:?}", w.names[ch]));
            }
        }
    }
    // Records that made it to disk without their ack reaching us: fine, and
    // at most one batch.
    let mut beyond_ack = 0;
    loop {
        let b = w.next_batch(1);
        let a = &b.appends[0];
        let mut hit = false;
        store.scan(&a.channel, a.offset, 1, &mut |off, _| hit = off == a.offset)?;
        if !hit {
            break;
        }
        beyond_ack += 1;
    }
    store.close()?;
    Ok(CrashRound { batch, killed_after_ms, acked, lost, beyond_ack, reopen_s, error })
}
