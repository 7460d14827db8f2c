//! Storage-engine bench for Ferry's single-node store.
//!
//! Runs Ferry's own access pattern (group-committed stream appends with dedup
//! entries and stream headers, range scans, dedup lookups, retention trims,
//! kill -9 recovery) against redb, fjall and SQLite, each behind the `Store`
//! trait, and prints Markdown tables. `cargo run --release -- --help`.

mod crash;
mod engines;
mod stats;
mod store;
mod workload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::crash::CrashRound;
use crate::stats::{mib, summarize, Summary};
use crate::store::{Engine, Store};
use crate::workload::{Rng, Workload, CHANNELS, ZIPF_S};

const HELP: &str = "\
ferry-storage-bench: Ferry's store access pattern on redb, fjall, SQLite

USAGE: ferry-storage-bench [OPTIONS]

  --engines LIST      comma-separated subset, run in this order [redb,fjall,fjall-j64,sqlite]
  --records N         records bulk-loaded before the other phases [1000000]
  --window-secs S     seconds per group-commit window (N = 1, 16, 256, 256 without dedup) [4]
  --read-secs S       seconds per read phase [3]
  --trim-keep K       retention: keep the newest K records per channel [1000]
  --crash-rounds R    kill -9 rounds per engine [4]
  --seed X            workload seed [random, printed]
  --dir PATH          parent of the data directories [/tmp]
  --keep              do not delete the data directories afterwards
  --quick             smoke run: 50k records, 1 s windows, 3 crash rounds
";

struct Opts {
    engines: Vec<Engine>,
    records: u64,
    window: Duration,
    read: Duration,
    trim_keep: u64,
    crash_rounds: usize,
    seed: u64,
    dir: PathBuf,
    keep: bool,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        engines: Engine::ALL.to_vec(),
        records: 1_000_000,
        window: Duration::from_secs(4),
        read: Duration::from_secs(3),
        trim_keep: 1_000,
        crash_rounds: 4,
        seed: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64,
        dir: PathBuf::from("/tmp"),
        keep: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--engines" => o.engines = val()?.split(',').map(Engine::parse).collect::<Result<_>>()?,
            "--records" => o.records = val()?.parse()?,
            "--window-secs" => o.window = Duration::from_secs_f64(val()?.parse()?),
            "--read-secs" => o.read = Duration::from_secs_f64(val()?.parse()?),
            "--trim-keep" => o.trim_keep = val()?.parse()?,
            "--crash-rounds" => o.crash_rounds = val()?.parse()?,
            "--seed" => o.seed = val()?.parse()?,
            "--dir" => o.dir = PathBuf::from(val()?),
            "--keep" => o.keep = true,
            "--quick" => {
                o.records = 50_000;
                o.window = Duration::from_secs(1);
                o.read = Duration::from_secs(1);
                o.crash_rounds = 3;
            }
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n\n{HELP}"),
        }
    }
    Ok(o)
}

#[derive(Clone, Copy, Default)]
struct WriteRun {
    batch: usize,
    records: u64,
    commits: u64,
    /// Time inside `commit` plus time the engine's background work kept
    /// running afterwards (`settle_s`): the sustained cost of the writes.
    secs: f64,
    settle_s: f64,
    lat: Summary,
    /// Bytes sent to the block device, per record (background work included).
    disk_bytes_per_rec: f64,
    /// Lowest and highest p50 ms of the plain fsync probe taken between the
    /// engines' turns: shows whether the shared disk had a slow spell.
    probe: (f64, f64),
}

impl WriteRun {
    fn rec_s(&self) -> f64 {
        self.records as f64 / self.secs
    }
    fn commits_s(&self) -> f64 {
        self.commits as f64 / self.secs
    }
}

/// A write phase being accumulated over several turns.
struct WriteAcc {
    batch: usize,
    dedup: bool,
    records: u64,
    lat: Vec<Duration>,
    busy: Duration,
    settle: Duration,
    io: u64,
    probes: Vec<f64>,
}

impl WriteAcc {
    fn new(batch: usize, dedup: bool) -> Self {
        WriteAcc {
            batch,
            dedup,
            records: 0,
            lat: Vec::new(),
            busy: Duration::ZERO,
            settle: Duration::ZERO,
            io: 0,
            probes: Vec::new(),
        }
    }

    fn finish(mut self) -> WriteRun {
        let secs = (self.busy + self.settle).as_secs_f64();
        let lo = self.probes.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self.probes.iter().copied().fold(0.0, f64::max);
        WriteRun {
            batch: self.batch,
            records: self.records,
            commits: self.lat.len() as u64,
            secs,
            settle_s: self.settle.as_secs_f64(),
            lat: summarize(&mut self.lat),
            disk_bytes_per_rec: self.io as f64 / self.records.max(1) as f64,
            probe: (lo, hi),
        }
    }
}

#[derive(Clone, Copy, Default)]
struct ReadRun {
    ops: u64,
    items: u64,
    secs: f64,
}

impl ReadRun {
    fn ops_s(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn items_s(&self) -> f64 {
        self.items as f64 / self.secs
    }
}

#[derive(Default)]
struct TrimRun {
    channels: u64,
    deleted: u64,
    secs: f64,
    settle_s: f64,
    lat: Summary,
}

#[derive(Default)]
struct EngineResult {
    load: WriteRun,
    windows: Vec<WriteRun>,
    /// N = 256 with the dedup inserts left out: what the dedup index costs.
    no_dedup: WriteRun,
    /// User bytes (keys + values) written by the bulk load.
    raw_bytes: u64,
    disk_apparent: u64,
    disk_allocated: u64,
    close_s: f64,
    reopen_s: f64,
    scans: ReadRun,
    dedup_hit: ReadRun,
    dedup_miss: ReadRun,
    head_before: ReadRun,
    head_after: ReadRun,
    trim: TrimRun,
    crash: Vec<CrashRound>,
}

/// One engine under test: its store, its own copy of the workload, results.
struct Bench {
    engine: Engine,
    dir: PathBuf,
    store: Option<Box<dyn Store>>,
    w: Workload,
    rng: Rng,
    res: EngineResult,
}

impl Bench {
    fn store(&mut self) -> &mut dyn Store {
        self.store.as_deref_mut().expect("store open")
    }
}

/// Upper bound on waiting for an engine's background work after a turn.
const SETTLE_CAP: Duration = Duration::from_secs(60);

/// One engine's turn in a write phase: commits `acc.batch`-sized groups until
/// `until(records this turn, elapsed)`, then waits for its background work.
fn write_turn(b: &mut Bench, acc: &mut WriteAcc, mut until: impl FnMut(u64, Duration) -> bool) -> Result<()> {
    let io0 = stats::disk_write_bytes();
    let wall = Instant::now();
    let mut records = 0;
    while !until(records, wall.elapsed()) {
        let mut batch = b.w.next_batch(acc.batch);
        batch.dedup = acc.dedup;
        let t = Instant::now();
        b.store().commit(&batch)?;
        let d = t.elapsed();
        acc.busy += d;
        acc.lat.push(d);
        records += acc.batch as u64;
    }
    acc.settle += stats::settle(SETTLE_CAP);
    acc.io += stats::disk_write_bytes() - io0;
    acc.records += records;
    Ok(())
}

/// Engine order for turn `turn`: rotated so no engine is always first.
fn order(n: usize, turn: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + turn) % n)
}

/// Write phase in `turns` rounds; in each, every engine gets one turn.
fn write_phase(
    benches: &mut [Bench],
    probe_dir: &Path,
    batch: usize,
    dedup: bool,
    turns: usize,
    mut until: impl FnMut(u64, Duration) -> bool,
) -> Result<Vec<WriteRun>> {
    let mut accs: Vec<WriteAcc> = benches.iter().map(|_| WriteAcc::new(batch, dedup)).collect();
    for turn in 0..turns {
        let probe = stats::fsync_probe(probe_dir)?.0 .0;
        for i in order(benches.len(), turn) {
            accs[i].probes.push(probe);
            write_turn(&mut benches[i], &mut accs[i], &mut until)?;
        }
    }
    let probe = stats::fsync_probe(probe_dir)?.0 .0;
    Ok(accs
        .into_iter()
        .map(|mut a| {
            a.probes.push(probe);
            a.finish()
        })
        .collect())
}

/// Read phase: `turns` rounds of `budget / turns` per engine; `op` returns
/// how many items one operation read.
fn read_phase(
    benches: &mut [Bench],
    budget: Duration,
    turns: usize,
    mut op: impl FnMut(&mut Bench) -> Result<u64>,
) -> Result<Vec<ReadRun>> {
    let mut runs = vec![ReadRun::default(); benches.len()];
    let slice = budget / turns as u32;
    for turn in 0..turns {
        for i in order(benches.len(), turn) {
            let t = Instant::now();
            while t.elapsed() < slice {
                for _ in 0..64 {
                    runs[i].items += op(&mut benches[i])?;
                    runs[i].ops += 1;
                }
            }
            runs[i].secs += t.elapsed().as_secs_f64();
        }
    }
    Ok(runs)
}

/// Head-of-stream scans (100 records from `first`) on the 20 hottest channels.
fn head_scan(b: &mut Bench) -> Result<u64> {
    let ch = b.rng.below(20) as usize;
    let h = b.w.headers[ch];
    let mut expect = h.first;
    let name = b.w.names[ch].clone();
    let n = b.store().scan(name.as_bytes(), h.first, 100, &mut |off, _| {
        assert_eq!(off, expect, "gap in {name}");
        expect += 1;
    })?;
    Ok(n as u64)
}

/// Range scan of 1-100 records from a random position of a Zipf-chosen channel.
fn range_scan(b: &mut Bench) -> Result<u64> {
    let ch = b.w.channel_sample(&mut b.rng);
    let h = b.w.headers[ch];
    if h.top == h.first {
        return Ok(0);
    }
    let from = h.first + b.rng.below(h.top - h.first);
    let limit = 1 + b.rng.below(100) as usize;
    let mut expect = from;
    let name = b.w.names[ch].clone();
    let n = b.store().scan(name.as_bytes(), from, limit, &mut |off, v| {
        assert_eq!(off, expect);
        assert!(!v.is_empty());
        expect += 1;
    })?;
    if n as u64 != (limit as u64).min(h.top - from) {
        bail!("{name}: scan from {from} returned {n} of {limit}");
    }
    Ok(n as u64)
}

fn run(o: &Opts, root: &Path) -> Result<Vec<Bench>> {
    let mut benches = Vec::new();
    for &engine in &o.engines {
        let dir = root.join(engine.name());
        std::fs::create_dir_all(&dir)?;
        benches.push(Bench {
            engine,
            store: Some(engine.open(&dir)?),
            dir,
            // Same seed: every engine gets the identical record stream.
            w: Workload::new(o.seed, ""),
            rng: Rng::new(o.seed ^ 0xBEEF),
            res: EngineResult::default(),
        });
    }
    let n = benches.len();
    let put = |benches: &mut [Bench], runs: Vec<WriteRun>, f: fn(&mut EngineResult, WriteRun)| {
        for (b, r) in benches.iter_mut().zip(runs) {
            f(&mut b.res, r);
        }
    };

    // 1. Bulk load, in turns of 100 commits per engine.
    eprintln!("bulk load {} records, N=256, turns of 51,200 records", o.records);
    let per_turn = 51_200;
    let turns = o.records.div_ceil(per_turn) as usize;
    let total = o.records;
    let mut done = vec![0u64; n];
    let mut accs: Vec<WriteAcc> = (0..n).map(|_| WriteAcc::new(256, true)).collect();
    for turn in 0..turns {
        let probe = stats::fsync_probe(root)?.0 .0;
        for i in order(n, turn) {
            accs[i].probes.push(probe);
            let left = total - done[i];
            let this = left.min(per_turn);
            write_turn(&mut benches[i], &mut accs[i], |r, _| r >= this)?;
            done[i] = benches[i].w.count();
        }
        if turn % 4 == 3 {
            eprintln!("  {} / {} records", done[0], total);
        }
    }
    for (b, a) in benches.iter_mut().zip(accs) {
        b.res.load = a.finish();
        // The records above were the first `count` of the stream.
        let mut replay = Workload::new(o.seed, "");
        let mut raw = 0;
        while replay.count() < b.w.count() {
            raw += replay.next_batch(256).raw_bytes();
        }
        b.res.raw_bytes = raw;
    }

    // 2. Clean close, disk usage, clean reopen.
    eprintln!("close, disk usage, reopen");
    for b in benches.iter_mut() {
        let t = Instant::now();
        b.store.take().expect("open").close()?;
        b.res.close_s = t.elapsed().as_secs_f64();
        (b.res.disk_apparent, b.res.disk_allocated) = stats::disk_usage(&b.dir)?;
        let t = Instant::now();
        let store = b.engine.open(&b.dir)?;
        // Opening counts until the store can answer a read.
        store.header(b.w.names[0].as_bytes())?.context("header of the hottest channel")?;
        b.res.reopen_s = t.elapsed().as_secs_f64();
        b.store = Some(store);
        // Recovery work (fjall's journal replay) may continue in the background.
        stats::settle(SETTLE_CAP);
    }

    // 3. Reads.
    eprintln!("reads");
    let turns = 3;
    let runs = read_phase(&mut benches, o.read, turns, range_scan)?;
    benches.iter_mut().zip(runs).for_each(|(b, r)| b.res.scans = r);
    let runs = read_phase(&mut benches, o.read, turns, |b| {
        let id = b.w.id_of(b.rng.below(b.w.count()));
        b.store().dedup_get(id.as_bytes())?.context("dedup hit missing")?;
        Ok(1)
    })?;
    benches.iter_mut().zip(runs).for_each(|(b, r)| b.res.dedup_hit = r);
    let runs = read_phase(&mut benches, o.read, turns, |b| {
        let id = b.w.missing_id(b.rng.next_u64() >> 4);
        if b.store().dedup_get(id.as_bytes())?.is_some() {
            bail!("dedup miss found");
        }
        Ok(1)
    })?;
    benches.iter_mut().zip(runs).for_each(|(b, r)| b.res.dedup_miss = r);
    let runs = read_phase(&mut benches, o.read / 2, turns, head_scan)?;
    benches.iter_mut().zip(runs).for_each(|(b, r)| b.res.head_before = r);

    // 4. Group-commit windows, in turns of window / 5 per engine.
    let turns = 5;
    let slice = o.window / turns as u32;
    for n_batch in [1usize, 16, 256] {
        eprintln!("group commit window N={n_batch}");
        let runs = write_phase(&mut benches, root, n_batch, true, turns, |_, t| t >= slice)?;
        put(&mut benches, runs, |r, w| r.windows.push(w));
    }
    eprintln!("group commit window N=256 without dedup entries");
    let runs = write_phase(&mut benches, root, 256, false, turns, |_, t| t >= slice)?;
    put(&mut benches, runs, |r, w| r.no_dedup = w);

    // 5. Retention: trim every channel to its newest K, 25 channels per turn.
    eprintln!("retention: trim to the newest {}", o.trim_keep);
    let mut lats: Vec<Vec<Duration>> = vec![Vec::new(); n];
    for (turn, chunk) in (0..CHANNELS).collect::<Vec<_>>().chunks(25).enumerate() {
        for i in order(n, turn) {
            let b = &mut benches[i];
            for &ch in chunk {
                let h = b.w.headers[ch];
                if h.top - h.first <= o.trim_keep {
                    continue;
                }
                let new = workload::Header { first: h.top - o.trim_keep, ..h };
                let name = b.w.names[ch].clone();
                let t = Instant::now();
                let deleted = b.store().trim(name.as_bytes(), h.first, new)?;
                lats[i].push(t.elapsed());
                if deleted != new.first - h.first {
                    bail!("{name}: trimmed {deleted}, expected {}", new.first - h.first);
                }
                b.w.headers[ch] = new;
                b.res.trim.channels += 1;
                b.res.trim.deleted += deleted;
            }
            b.res.trim.settle_s += stats::settle(SETTLE_CAP).as_secs_f64();
        }
    }
    for (b, mut lat) in benches.iter_mut().zip(lats) {
        b.res.trim.secs = lat.iter().sum::<Duration>().as_secs_f64() + b.res.trim.settle_s;
        b.res.trim.lat = summarize(&mut lat);
    }
    let runs = read_phase(&mut benches, o.read / 2, turns, head_scan)?;
    benches.iter_mut().zip(runs).for_each(|(b, r)| b.res.head_after = r);
    for b in benches.iter_mut() {
        b.store.take().expect("open").close()?;
    }

    // 6. kill -9 rounds, engines taking turns.
    eprintln!("kill -9 rounds on the loaded stores");
    for r in 0..o.crash_rounds {
        let batch = [1, 16, 256][r % 3];
        for i in order(n, r) {
            let b = &mut benches[i];
            let res = crash::round(b.engine, &b.dir, r, batch, &mut b.rng)?;
            eprintln!(
                "  [{}] round {r}: N={batch} killed after {} ms, acked {}, lost {}, beyond ack {}, reopen {:.3} s{}",
                b.engine.name(),
                res.killed_after_ms,
                res.acked,
                res.lost,
                res.beyond_ack,
                res.reopen_s,
                res.error.as_deref().map(|e| format!(", ERROR {e}")).unwrap_or_default()
            );
            b.res.crash.push(res);
        }
    }
    Ok(benches)
}

fn fmt_k(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0} k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// One row of the ratio table: reads a figure from an engine's results.
type Metric = fn(&EngineResult) -> f64;

fn report(o: &Opts, machine: &[String], benches: &[Bench], probes: [(f64, f64); 2], total: Duration) {
    let name = |b: &Bench| b.engine.name();
    println!("## Machine and run\n");
    for l in machine {
        println!("- {l}");
    }
    println!("- engines: {}", stats::engine_versions());
    println!(
        "- workload: seed {}, {} channels, Zipf s={ZIPF_S}, {} records bulk-loaded, {} s per commit window, {} s per read phase, trim keeps {}, {} kill -9 rounds; cache 64 MiB each",
        o.seed,
        CHANNELS,
        o.records,
        o.window.as_secs_f64(),
        o.read.as_secs_f64(),
        o.trim_keep,
        o.crash_rounds
    );
    println!("- engines take turns within every phase (order rotated each turn), so a slow spell of the shared disk hits all of them");
    println!("- total bench time: {:.0} s", total.as_secs_f64());
    println!(
        "- fsync probe (4 KiB append + fsync, p50/p99 ms): {:.2}/{:.2} at start, {:.2}/{:.2} at end\n",
        probes[0].0, probes[0].1, probes[1].0, probes[1].1
    );

    println!("## Bulk load (N = 256 per durable commit, empty store to {} records)\n", o.records);
    println!("| engine | records/s | commits/s | p50 ms | p99 ms | max ms | background s | disk bytes written/rec | fsync probe p50 ms (min-max) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for b in benches {
        let l = &b.res.load;
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} | {:.2}-{:.2} |",
            name(b),
            fmt_k(l.rec_s()),
            l.commits_s(),
            l.lat.p50_ms,
            l.lat.p99_ms,
            l.lat.max_ms,
            l.settle_s,
            l.disk_bytes_per_rec,
            l.probe.0,
            l.probe.1
        );
    }

    println!("\n## Group commit on the loaded store (every commit fsynced)\n");
    println!("| engine | N | records/s | commits/s | p50 ms | p99 ms | max ms | background s | disk bytes written/rec | fsync probe p50 ms (min-max) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for b in benches {
        let rows = b.res.windows.iter().map(|w| (w.batch.to_string(), w));
        for (label, w) in rows.chain(std::iter::once(("256, no dedup".to_string(), &b.res.no_dedup))) {
            println!(
                "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} | {:.2}-{:.2} |",
                name(b),
                label,
                fmt_k(w.rec_s()),
                w.commits_s(),
                w.lat.p50_ms,
                w.lat.p99_ms,
                w.lat.max_ms,
                w.settle_s,
                w.disk_bytes_per_rec,
                w.probe.0,
                w.probe.1
            );
        }
    }

    println!("\n## Reads (right after the clean reopen, one thread, OS page cache warm)\n");
    println!("| engine | range scans/s (1-100 rec) | scanned rec/s | dedup hit/s | dedup miss/s | head scans/s before trim | after trim |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for b in benches {
        let r = &b.res;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            name(b),
            fmt_k(r.scans.ops_s()),
            fmt_k(r.scans.items_s()),
            fmt_k(r.dedup_hit.ops_s()),
            fmt_k(r.dedup_miss.ops_s()),
            fmt_k(r.head_before.ops_s()),
            fmt_k(r.head_after.ops_s())
        );
    }

    println!(
        "\n## Retention (trim every channel to its newest {} records, one durable commit per channel)\n",
        o.trim_keep
    );
    println!(
        "| engine | channels | records deleted | total s | background s | deleted rec/s | p50 ms/trim | p99 ms/trim |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for b in benches {
        let t = &b.res.trim;
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
            name(b),
            t.channels,
            t.deleted,
            t.secs,
            t.settle_s,
            fmt_k(t.deleted as f64 / t.secs),
            t.lat.p50_ms,
            t.lat.p99_ms
        );
    }

    println!("\n## Disk and reopen (right after the bulk load, clean close)\n");
    println!("| engine | records | raw data MiB | on disk MiB (allocated) | apparent MiB | disk / raw | close s | reopen s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for b in benches {
        let r = &b.res;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.3} | {:.3} |",
            name(b),
            r.load.records,
            mib(r.raw_bytes),
            mib(r.disk_allocated),
            mib(r.disk_apparent),
            r.disk_allocated as f64 / r.raw_bytes as f64,
            r.close_s,
            r.reopen_s
        );
    }

    println!("\n## kill -9 mid-stream (child appends to the loaded store, parent SIGKILLs it at a random 0.3-1.5 s)\n");
    println!("| engine | rounds (N) | acked records | lost | committed beyond last ack | reopen after kill s (max) | result |");
    println!("|---|---|---:|---:|---:|---:|---|");
    for b in benches {
        let c = &b.res.crash;
        let ns: Vec<String> = c.iter().map(|c| c.batch.to_string()).collect();
        let pass = c.iter().all(CrashRound::passed);
        let errs: Vec<&str> = c.iter().filter_map(|c| c.error.as_deref()).collect();
        println!(
            "| {} | {} ({}) | {} | {} | {} | {:.3} | {}{} |",
            name(b),
            c.len(),
            ns.join(","),
            c.iter().map(|c| c.acked).sum::<u64>(),
            c.iter().map(|c| c.lost).sum::<u64>(),
            c.iter().map(|c| c.beyond_ack).sum::<u64>(),
            c.iter().map(|c| c.reopen_s).fold(0.0, f64::max),
            if pass { "PASS" } else { "FAIL" },
            if errs.is_empty() { String::new() } else { format!(" ({})", errs.join("; ")) }
        );
    }

    if let Some(base) = benches.iter().find(|b| b.engine == Engine::Sqlite) {
        println!("\n## Ratios to SQLite (higher is better except latency, bytes, disk and reopen)\n");
        let metrics: Vec<(&str, Metric)> = vec![
            ("bulk load rec/s", |r| r.load.rec_s()),
            ("N=1 commits/s", |r| r.windows[0].commits_s()),
            ("N=16 rec/s", |r| r.windows[1].rec_s()),
            ("N=256 rec/s", |r| r.windows[2].rec_s()),
            ("N=256 no-dedup rec/s", |r| r.no_dedup.rec_s()),
            ("N=16 p99 commit latency", |r| r.windows[1].lat.p99_ms),
            ("N=1 disk bytes/rec", |r| r.windows[0].disk_bytes_per_rec),
            ("N=256 disk bytes/rec", |r| r.windows[2].disk_bytes_per_rec),
            ("range scan rec/s", |r| r.scans.items_s()),
            ("dedup hit/s", |r| r.dedup_hit.ops_s()),
            ("dedup miss/s", |r| r.dedup_miss.ops_s()),
            ("trim deleted rec/s", |r| r.trim.deleted as f64 / r.trim.secs),
            ("disk allocated", |r| r.disk_allocated as f64),
        ];
        print!("| metric |");
        for b in benches {
            print!(" {} |", name(b));
        }
        print!("\n|---|");
        for _ in benches {
            print!("---:|");
        }
        println!();
        for (label, f) in metrics {
            print!("| {label} |");
            for b in benches {
                print!(" {:.2} |", f(&b.res) / f(&base.res));
            }
            println!();
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("crash-child") {
        let [_, engine, dir, seed, batch, round] = args.as_slice() else {
            bail!("crash-child ENGINE DIR SEED BATCH ROUND");
        };
        return crash::child(Engine::parse(engine)?, Path::new(dir), seed.parse()?, batch.parse()?, round.parse()?);
    }
    let o = parse_opts(&args)?;
    let root = o.dir.join(format!("ferry-storage-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    eprintln!("data under {} (seed {})", root.display(), o.seed);
    let mut machine = stats::machine(&root);
    let load_start = stats::loadavg();
    let start = Instant::now();
    let probe_start = stats::fsync_probe(&root)?.0;
    let result = run(&o, &root);
    let probe_end = stats::fsync_probe(&root)?.0;
    machine.push(format!(
        "load average (1/5/15 min) at start: {load_start}; at end: {} — other work on the machine competes for the 2 cores and the disk",
        stats::loadavg()
    ));
    if !o.keep {
        std::fs::remove_dir_all(&root)?;
    }
    let benches = result?;
    report(&o, &machine, &benches, [probe_start, probe_end], start.elapsed());
    Ok(())
}
