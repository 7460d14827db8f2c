//! `ferry-wsload`: the protocol-neutral WebSocket fan-out benchmark of
//! issue 15 (docs/PERFORMANCE.md). It starts each server under test itself
//! (Ferry, and NATS when `nats-server` is installed), pinned to one CPU
//! with `taskset`, pins itself to another, and drives both over loopback
//! with the same scenarios: subscribers connect and subscribe, publishers
//! send paced steps of 100 B payloads that carry their publish instant,
//! and every subscriber records latency, loss, duplicates and order.
//!
//! ```text
//! cargo build --release -p ferry-server --bin ferry
//! cargo run --release -p ferry-wsload -- all --runs 3     # the whole table
//! cargo run --release -p ferry-wsload -- smoke            # a few seconds
//! ```
//!
//! The generator is one thread (a tokio current-thread runtime with a
//! `LocalSet`): it is pinned to one core anyway, and sharing counters
//! through `Rc<RefCell<_>>` costs nothing per delivery.

mod bench;
mod client;
mod durable;
mod ferry;
mod nats;
mod report;
mod server;
mod stats;
mod sys;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ferry_core::codec::Encoding;
use ferry_core::frame::Qos;

use bench::{Bench, Knobs, Step};
use client::Target;
use report::{Fanout, Many, Report, Run};
use server::{Bins, Kind};

#[derive(Parser, Debug)]
#[command(about = "WebSocket fan-out benchmark: Ferry beside NATS (issue 15)")]
struct Cli {
    #[command(subcommand)]
    cmd: Mode,
    /// The ferry binary.
    #[arg(long, global = true, default_value = "target/release/ferry")]
    ferry_bin: PathBuf,
    /// The nats-server binary.
    #[arg(long, global = true, default_value = "nats-server")]
    nats_bin: PathBuf,
    /// Ferry subprotocol: binary (`ferry.v1`) or json (`ferry.v1.json`).
    #[arg(long, global = true, value_enum, default_value_t = Enc::Binary)]
    encoding: Enc,
    /// Servers to measure.
    #[arg(long, global = true, value_delimiter = ',', default_value = "ferry,nats")]
    servers: Vec<ServerArg>,
    /// CPU for the server under test.
    #[arg(long, global = true, default_value_t = 0)]
    server_cpu: usize,
    /// CPU for the generator.
    #[arg(long, global = true, default_value_t = 1)]
    gen_cpu: usize,
    /// Scenarios to run: fanout (d), many ((c), (a) and the connect ramp),
    /// durable ((e): QoS 1 publishes acknowledged after commit, Ferry only).
    #[arg(long, global = true, value_delimiter = ',', default_value = "fanout,many,durable")]
    scenarios: Vec<Scenario>,
    /// Also run (c) with the server on these CPUs (a `taskset -c` list such
    /// as `0,2`) and report its saturation against one CPU: the two-core
    /// target. CPUs shared with the generator make the figure a lower bound
    /// (the report says so).
    #[arg(long, global = true)]
    scale_cpus: Option<String>,
    /// Re-run a step this many times when other processes used more than
    /// 20 % of a core meanwhile.
    #[arg(long, global = true, default_value_t = 2)]
    busy_retries: usize,
    /// Where result files go.
    #[arg(long, global = true, default_value = "bench/wsload/results")]
    out: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// The whole table of issue 15.
    All {
        /// Repeat the table this many times (min / median / max).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Seconds of publishing per step.
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
        /// Subscribers of the one channel in (d).
        #[arg(long, default_value_t = 1000)]
        fanout_subs: usize,
        /// First rate of the (d) search, msg/s.
        #[arg(long, default_value_t = 100.0)]
        fanout_start: f64,
        /// Connections in (c) and (a).
        #[arg(long, default_value_t = 10_000)]
        many_subs: usize,
        /// Channels in (c).
        #[arg(long, default_value_t = 1000)]
        many_channels: usize,
        /// The fixed rate of (c), msg/s (and the first of its search).
        #[arg(long, default_value_t = 5000.0)]
        many_rate: f64,
        /// Connection ramp, connections/s.
        #[arg(long, default_value_t = 2000.0)]
        ramp_rate: f64,
        /// Skip the (c) saturation search.
        #[arg(long)]
        no_saturation: bool,
        /// (e): publisher connections, one channel each.
        #[arg(long, default_value_t = 16)]
        durable_publishers: usize,
        /// (e): QoS 1 publishes in flight per publisher.
        #[arg(long, default_value_t = 256)]
        durable_window: usize,
    },
    /// Tiny sizes, one step each: checks that messages arrive, prints
    /// figures, asserts nothing about timing.
    Smoke,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Enc {
    Binary,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Fanout,
    Many,
    Durable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ServerArg {
    Ferry,
    Nats,
}

/// The sizes of one mode.
struct Plan {
    runs: usize,
    fanout_subs: usize,
    fanout_start: f64,
    /// One step at this rate instead of a search.
    fanout_single: bool,
    many_subs: usize,
    many_channels: usize,
    many_rate: f64,
    ramp_rate: f64,
    saturation: bool,
    fanout: bool,
    many: bool,
    /// (e), when run.
    durable: Option<durable::DurablePlan>,
    /// (c) again on these server CPUs.
    scale_cpus: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cpus = sys::Machine::probe(None).nproc;
    anyhow::ensure!(
        cli.server_cpu.max(cli.gen_cpu) < cpus,
        "this machine has {cpus} CPU(s): choose --server-cpu and --gen-cpu below {cpus} \
         (on one CPU, --server-cpu 0 --gen-cpu 0 still runs, with both sharing it)"
    );
    // Before the runtime exists, so that every thread inherits the mask.
    sys::pin_self(cli.gen_cpu).context("pinning the generator (taskset from util-linux)")?;
    let nofile = sys::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(cli, nofile))
}

async fn run(cli: Cli, nofile: Option<u64>) -> anyhow::Result<()> {
    let bins = Bins { ferry: cli.ferry_bin.clone(), nats: cli.nats_bin.clone() };
    anyhow::ensure!(
        bins.ferry.exists(),
        "{} not found: build it with `cargo build --release -p ferry-server --bin ferry` or pass --ferry-bin",
        bins.ferry.display()
    );
    let mut notes = Vec::new();
    let mut kinds = Vec::new();
    if cli.servers.contains(&ServerArg::Ferry) {
        kinds.push(Kind::Ferry);
    }
    if cli.servers.contains(&ServerArg::Nats) {
        if bins.nats_available() {
            kinds.push(Kind::Nats);
        } else {
            notes.push(format!(
                "{} is not installed (apt-get install -y nats-server): Ferry only, no ratios",
                bins.nats.display()
            ));
        }
    }
    let (mode, plan, knobs) = match cli.cmd {
        Mode::All {
            runs,
            step_secs,
            fanout_subs,
            fanout_start,
            many_subs,
            many_channels,
            many_rate,
            ramp_rate,
            no_saturation,
            durable_publishers,
            durable_window,
        } => (
            "all",
            Plan {
                runs: runs.max(1),
                fanout_subs,
                fanout_start,
                fanout_single: false,
                many_subs,
                many_channels,
                many_rate,
                ramp_rate,
                saturation: !no_saturation,
                fanout: cli.scenarios.contains(&Scenario::Fanout),
                many: cli.scenarios.contains(&Scenario::Many),
                durable: cli.scenarios.contains(&Scenario::Durable).then_some(durable::DurablePlan {
                    publishers: durable_publishers.max(1),
                    window: durable_window,
                    warm_secs: 2.0,
                    secs: step_secs.max(1.0),
                }),
                scale_cpus: cli.scale_cpus.clone(),
            },
            Knobs {
                step_secs,
                bisect: 3,
                max_doublings: 14,
                server_cpus: cli.server_cpu.to_string(),
                busy_retries: cli.busy_retries,
            },
        ),
        Mode::Smoke => (
            "smoke",
            Plan {
                runs: 1,
                fanout_subs: 50,
                fanout_start: 200.0,
                fanout_single: true,
                many_subs: 200,
                many_channels: 20,
                many_rate: 200.0,
                ramp_rate: 500.0,
                saturation: false,
                fanout: cli.scenarios.contains(&Scenario::Fanout),
                many: cli.scenarios.contains(&Scenario::Many),
                durable: cli.scenarios.contains(&Scenario::Durable).then_some(durable::DurablePlan {
                    publishers: 2,
                    window: 16,
                    warm_secs: 0.5,
                    secs: 1.0,
                }),
                scale_cpus: None,
            },
            Knobs {
                step_secs: 2.0,
                bisect: 0,
                max_doublings: 0,
                server_cpus: cli.server_cpu.to_string(),
                busy_retries: 0,
            },
        ),
    };
    let need = plan.many_subs.max(plan.fanout_subs) as u64 + 100;
    match nofile {
        Some(n) if n < need => notes.push(format!(
            "open-file limit {n} is below the {need} descriptors this plan needs (generator and server each): raise it with `ulimit -n {need}`"
        )),
        _ => {}
    }
    let enc = match cli.encoding {
        Enc::Binary => Encoding::Binary,
        Enc::Json => Encoding::Json,
    };
    let machine = sys::Machine::probe(nofile);
    let started = utc_now();
    let settings = format!(
        "mode {mode}, runs {}, step {} s, Ferry subprotocol {}, payload {} B, (d) {} subscribers from {} msg/s, \
         (c) {} subscribers over {} channels at {} msg/s, ramp {} conn/s, server CPU {}, generator CPU {}{}{}",
        plan.runs,
        knobs.step_secs,
        enc.subprotocol(),
        client::PAYLOAD,
        plan.fanout_subs,
        plan.fanout_start,
        plan.many_subs,
        plan.many_channels,
        plan.many_rate,
        plan.ramp_rate,
        knobs.server_cpus,
        cli.gen_cpu,
        plan.durable.as_ref().map_or(String::new(), |d| format!(
            ", (e) {} publishers × {} QoS 1 publishes in flight",
            d.publishers, d.window
        )),
        plan.scale_cpus.as_ref().map_or(String::new(), |c| format!(", (c) also on server CPUs {c}")),
    );
    println!("ferry-wsload {mode}\nmachine: {}\nsettings: {settings}", machine.line());
    if let Some(c) = &plan.scale_cpus {
        if c.split(',').any(|x| x.trim() == cli.gen_cpu.to_string()) {
            notes.push(format!(
                "the scaled (c) run shares CPU {} with the generator: its figure is a lower bound of what the server does on those CPUs",
                cli.gen_cpu
            ));
        }
    }
    for n in &notes {
        println!("note: {n}");
    }
    let mut runs = Vec::new();
    for r in 0..plan.runs {
        println!("\n== run {} of {}", r + 1, plan.runs);
        runs.push(one_run(&kinds, enc, &bins, &knobs, &plan).await?);
    }
    let summary = report::summarize(&runs);
    let rep = Report { mode: mode.into(), started, machine, settings, notes, summary, runs };
    println!("\n{}", report::summary_table(&rep));
    std::fs::create_dir_all(&cli.out)?;
    let stem = cli.out.join(format!("{}-{mode}", rep.started.replace([':', '-'], "")));
    std::fs::write(stem.with_extension("json"), serde_json::to_string_pretty(&rep)?)?;
    std::fs::write(stem.with_extension("md"), report::markdown(&rep))?;
    println!("written: {}.{{json,md}}", stem.display());
    if mode == "smoke" {
        check_smoke(&rep)?;
        println!("smoke: messages arrived on every server and scenario");
    }
    Ok(())
}

async fn one_run(kinds: &[Kind], enc: Encoding, bins: &Bins, knobs: &Knobs, plan: &Plan) -> anyhow::Result<Run> {
    let mut run = Run { fanout: Vec::new(), many: Vec::new(), scaled: Vec::new(), durable: Vec::new() };
    let log = |s: &Step| println!("  {}", report::step_line(s));
    // (d), every target: Ferry at QoS 0 and 1, NATS (at most once).
    for &kind in kinds.iter().filter(|_| plan.fanout) {
        let targets: Vec<(Target, u8)> = match kind {
            Kind::Ferry => vec![(Target::Ferry(enc, Qos::AtMostOnce), 0), (Target::Ferry(enc, Qos::AtLeastOnce), 1)],
            Kind::Nats => vec![(Target::Nats, 0)],
        };
        for (target, qos) in targets {
            println!("\n(d) {} QoS {qos}: 1 channel × {} subscribers", kind.name(), plan.fanout_subs);
            let mut b = Bench::new(kind, target, bins, knobs, plan.fanout_subs, 1)?;
            let ramp = b.ramp(plan.ramp_rate).await;
            anyhow::ensure!(
                ramp.connected == plan.fanout_subs,
                "{}: only {} of {} subscribers connected",
                kind.name(),
                ramp.connected,
                plan.fanout_subs
            );
            b.publishers(1).await?;
            println!("{}", report::STEP_HEADER);
            b.warm_up(plan.fanout_start).await;
            let search = if plan.fanout_single {
                let s = b.step(plan.fanout_start).await;
                log(&s);
                bench::Search { best: Some(s.clone()), steps: vec![s] }
            } else {
                b.search(plan.fanout_start, &log).await
            };
            // Overload: twice the highest passing rate. Healthy subscribers
            // must stay connected; publishers may be refused (backpressure).
            let overload = if plan.fanout_single {
                None
            } else {
                let rate = 2.0 * search.best.as_ref().map_or(plan.fanout_start, |b| b.rate);
                println!("overload step at {rate:.0} msg/s:");
                let s = b.step(rate).await;
                log(&s);
                Some(s)
            };
            run.fanout.push(Fanout { server: kind.name().into(), qos, subs: plan.fanout_subs, search, overload });
        }
    }
    // (c) and (a) and the connect ramp, on one set of connections.
    for &kind in kinds.iter().filter(|_| plan.many) {
        run.many.push(many(kind, enc, bins, knobs, plan).await?);
    }
    // (c) again on more server CPUs: the two-core target.
    if let Some(cpus) = plan.scale_cpus.as_ref().filter(|_| plan.many) {
        let wide = Knobs { server_cpus: cpus.clone(), ..knobs.clone() };
        for &kind in kinds {
            run.scaled.push(many(kind, enc, bins, &wide, plan).await?);
        }
    }
    // (e) durable QoS 1 publishes, Ferry only (NATS core has no durable publish).
    if let Some(d) = plan.durable.as_ref().filter(|_| kinds.contains(&Kind::Ferry)) {
        println!(
            "\n(e) Ferry durable QoS 1 publishes: {} publishers × {} in flight, {} s",
            d.publishers, d.window, d.secs
        );
        let r = durable::run(bins, &knobs.server_cpus, enc, d).await?;
        println!("  {}", report::durable_line(&r));
        run.durable.push(r);
    }
    Ok(run)
}

/// (c), (a) and the connect ramp on `kind`, the server on `knobs.server_cpus`.
async fn many(kind: Kind, enc: Encoding, bins: &Bins, knobs: &Knobs, plan: &Plan) -> anyhow::Result<Many> {
    let target = match kind {
        Kind::Ferry => Target::Ferry(enc, Qos::AtMostOnce),
        Kind::Nats => Target::Nats,
    };
    println!(
        "\n(c)/(a) {}: {} subscribers over {} channels, server CPUs {}",
        kind.name(),
        plan.many_subs,
        plan.many_channels,
        knobs.server_cpus
    );
    let log = |s: &Step| println!("  {}", report::step_line(s));
    let mut b = Bench::new(kind, target, bins, knobs, plan.many_subs, plan.many_channels)?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let rss_before = b.rss();
    let ramp = b.ramp(plan.ramp_rate).await;
    println!(
        "  ramp: {} of {} connected ({} failed) in {:.1} s; connect p50 {:.2} ms p90 {:.2} p99 {:.2} max {:.2}",
        ramp.connected, ramp.target, ramp.failures, ramp.secs, ramp.p50_ms, ramp.p90_ms, ramp.p99_ms, ramp.max_ms
    );
    // Idle: let the server finish what the ramp started.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let rss_after = b.rss();
    let rss_per_conn_kib = rss_after.saturating_sub(rss_before) as f64 / 1024.0 / ramp.connected.max(1) as f64;
    println!(
        "  RSS {:.1} MiB -> {:.1} MiB: {rss_per_conn_kib:.1} KiB per idle subscribed connection",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    b.publishers(4).await?;
    println!("{}", report::STEP_HEADER);
    b.warm_up(plan.many_rate).await;
    let fixed = b.step(plan.many_rate).await;
    log(&fixed);
    let saturation = if plan.saturation { Some(b.search(plan.many_rate, &log).await) } else { None };
    Ok(Many {
        server: kind.name().into(),
        cpus: knobs.server_cpus.clone(),
        subs: plan.many_subs,
        channels: plan.many_channels,
        ramp,
        rss_before,
        rss_after,
        rss_per_conn_kib,
        fixed,
        saturation,
    })
}

/// The smoke's only assertion: the generator works end to end.
fn check_smoke(rep: &Report) -> anyhow::Result<()> {
    for run in &rep.runs {
        for f in &run.fanout {
            for s in &f.search.steps {
                anyhow::ensure!(s.received > 0, "smoke: no message arrived in (d) {} QoS {}", f.server, f.qos);
                anyhow::ensure!(s.corrupt_free(), "smoke: (d) {}: {}", f.server, s.why.join("; "));
            }
        }
        for m in &run.many {
            anyhow::ensure!(
                m.ramp.connected == m.subs,
                "smoke: {} connected only {} of {}",
                m.server,
                m.ramp.connected,
                m.subs
            );
            anyhow::ensure!(m.fixed.received > 0, "smoke: no message arrived in (c) {}", m.server);
        }
        for d in &run.durable {
            anyhow::ensure!(d.acked > 0, "smoke: no durable publish was acknowledged in (e)");
            anyhow::ensure!(d.errors + d.offset_faults + d.unanswered == 0, "smoke: (e) {}", d.why.join("; "));
        }
    }
    Ok(())
}

impl Step {
    /// No malformed or misrouted payload was seen.
    fn corrupt_free(&self) -> bool {
        !self.why.iter().any(|w| w.contains("malformed"))
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` without a date crate (civil-from-days).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
