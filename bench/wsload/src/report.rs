//! Results: the data kept per run, the summary over runs (min / median /
//! max, Ferry beside NATS with the ratio), and their text forms.

use serde::Serialize;

use crate::bench::{Ramp, Search, Step};
use crate::durable::Durable;
use crate::sys::Machine;

/// Scenario (d) on one server and QoS.
#[derive(Clone, Debug, Serialize)]
pub struct Fanout {
    /// "Ferry" or "NATS".
    pub server: String,
    /// Subscription QoS (NATS: 0).
    pub qos: u8,
    /// Subscribers of the one channel.
    pub subs: usize,
    /// The steps.
    pub search: Search,
    /// One step at twice the saturation rate (overload).
    pub overload: Option<Step>,
}

/// Scenarios (c), (a) and the connect ramp on one server (one set of
/// connections serves all three).
#[derive(Clone, Debug, Serialize)]
pub struct Many {
    /// "Ferry" or "NATS".
    pub server: String,
    /// The server's CPUs (`taskset -c` list).
    pub cpus: String,
    /// Subscribers.
    pub subs: usize,
    /// Channels (subscriber i is on channel i mod channels).
    pub channels: usize,
    /// The connection ramp.
    pub ramp: Ramp,
    /// Server VmRSS before the ramp, bytes.
    pub rss_before: u64,
    /// Server VmRSS with every connection idle and subscribed, bytes.
    pub rss_after: u64,
    /// (after − before) / connections, KiB.
    pub rss_per_conn_kib: f64,
    /// The step at the scenario's fixed rate.
    pub fixed: Step,
    /// The saturation search (absent in smoke runs).
    pub saturation: Option<Search>,
}

/// One run of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// Fan-out results.
    pub fanout: Vec<Fanout>,
    /// Many-channel results.
    pub many: Vec<Many>,
    /// (c) again with the server on more CPUs.
    pub scaled: Vec<Many>,
    /// (e) durable QoS 1 publishes.
    pub durable: Vec<Durable>,
}

/// Min, median and max of one figure over runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Spread { min: v[0], median: v[v.len() / 2], max: v[v.len() - 1] })
    }
}

/// One line of the summary.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Scenario and figure.
    pub figure: String,
    /// "higher" or "lower" is better.
    pub better: &'static str,
    /// Ferry over the runs.
    pub ferry: Option<Spread>,
    /// NATS over the runs.
    pub nats: Option<Spread>,
    /// Ferry median / NATS median.
    pub ratio: Option<f64>,
    /// Set when any run of either side was generator-bound here.
    pub generator_bound: bool,
}

/// Everything a result file holds.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// "all" or "smoke".
    pub mode: String,
    /// UTC start time.
    pub started: String,
    /// The machine.
    pub machine: Machine,
    /// Settings, as given.
    pub settings: String,
    /// Notes (a missing nats-server, ...).
    pub notes: Vec<String>,
    /// Summary over runs.
    pub summary: Vec<Row>,
    /// Each run.
    pub runs: Vec<Run>,
}

type Pick<'a> = &'a dyn Fn(&Run, &str) -> Option<(f64, bool)>;

fn row(runs: &[Run], figure: &str, better: &'static str, ferry: Pick<'_>, nats: Pick<'_>) -> Row {
    let side = |pick: Pick<'_>, server: &str| {
        let got: Vec<(f64, bool)> = runs.iter().filter_map(|r| pick(r, server)).collect();
        (Spread::of(got.iter().map(|g| g.0).collect()), got.iter().any(|g| g.1))
    };
    let (f, fb) = side(ferry, "Ferry");
    let (n, nb) = side(nats, "NATS");
    let ratio = match (f, n) {
        (Some(f), Some(n)) if n.median != 0.0 => Some(f.median / n.median),
        _ => None,
    };
    Row { figure: figure.into(), better, ferry: f, nats: n, ratio, generator_bound: fb || nb }
}

fn best_of<'a>(r: &'a Run, server: &str, qos: u8) -> Option<&'a Step> {
    r.fanout.iter().find(|f| f.server == server && f.qos == qos).and_then(|f| f.search.best.as_ref())
}

fn overload_of<'a>(r: &'a Run, server: &str, qos: u8) -> Option<&'a Step> {
    r.fanout.iter().find(|f| f.server == server && f.qos == qos).and_then(|f| f.overload.as_ref())
}

fn many_of<'a>(r: &'a Run, server: &str) -> Option<&'a Many> {
    r.many.iter().find(|m| m.server == server)
}

/// Saturation on more CPUs over saturation on one, per server.
fn scaling(r: &Run, server: &str) -> Option<(f64, bool)> {
    let wide = r.scaled.iter().find(|m| m.server == server)?;
    let (w, wb) = sat(wide)?;
    let (n, nb) = sat(many_of(r, server)?)?;
    (n > 0.0).then(|| (w / n, wb || nb))
}

fn durable_of(r: &Run, f: fn(&Durable) -> f64) -> Option<(f64, bool)> {
    r.durable.first().map(|d| (f(d), d.generator_bound))
}

/// The summary rows over `runs`.
pub fn summarize(runs: &[Run]) -> Vec<Row> {
    let fan =
        |qos: u8, f: fn(&Step) -> f64| move |r: &Run, s: &str| best_of(r, s, qos).map(|b| (f(b), b.generator_bound));
    let nats0 = |f: fn(&Step) -> f64| move |r: &Run, _: &str| best_of(r, "NATS", 0).map(|b| (f(b), b.generator_bound));
    let over = |qos: u8, f: fn(&Step) -> f64| {
        move |r: &Run, s: &str| overload_of(r, s, qos).map(|b| (f(b), b.generator_bound))
    };
    let nats_over = |f: fn(&Step) -> f64| move |r: &Run, _: &str| overload_of(r, "NATS", 0).map(|b| (f(b), false));
    let many = |f: fn(&Many) -> Option<(f64, bool)>| move |r: &Run, s: &str| many_of(r, s).and_then(f);
    vec![
        row(
            runs,
            "(d) fan-out 1 ch × subs, QoS 0: deliveries/s at the last passing step",
            "higher",
            &fan(0, |b| b.deliveries_per_s),
            &fan(0, |b| b.deliveries_per_s),
        ),
        row(runs, "(d) same: msg/s published at that step", "higher", &fan(0, |b| b.rate), &fan(0, |b| b.rate)),
        row(runs, "(d) same: p99 ms at that step", "lower", &fan(0, |b| b.p99_ms), &fan(0, |b| b.p99_ms)),
        row(
            runs,
            "(d) Ferry QoS 1 (acked) deliveries/s vs NATS QoS 0",
            "higher",
            &fan(1, |b| b.deliveries_per_s),
            &nats0(|b| b.deliveries_per_s),
        ),
        row(
            runs,
            "(d) Ferry QoS 1: p99 ms at that step vs NATS QoS 0",
            "lower",
            &fan(1, |b| b.p99_ms),
            &nats0(|b| b.p99_ms),
        ),
        row(
            runs,
            "(d) overload (2 × the saturation rate), QoS 0: subscribers disconnected",
            "lower",
            &over(0, |b| b.disconnected as f64),
            &over(0, |b| b.disconnected as f64),
        ),
        row(
            runs,
            "(d) overload, QoS 0: loss % of the accepted publications (QoS 0 may drop)",
            "lower",
            &over(0, |b| b.accepted_loss_pct),
            &over(0, |b| b.accepted_loss_pct),
        ),
        row(
            runs,
            "(d) overload, Ferry QoS 1 vs NATS QoS 0: subscribers disconnected",
            "lower",
            &over(1, |b| b.disconnected as f64),
            &nats_over(|b| b.disconnected as f64),
        ),
        row(
            runs,
            "(d) overload, Ferry QoS 1: loss % of the accepted publications",
            "lower",
            &over(1, |b| b.accepted_loss_pct),
            &nats_over(|b| b.accepted_loss_pct),
        ),
        row(
            runs,
            "(d) overload, Ferry QoS 1 vs NATS QoS 0: publishes refused (backpressure) in the step",
            "info",
            &over(1, |b| b.publish_errors as f64),
            &nats_over(|b| b.publish_errors as f64),
        ),
        row(
            runs,
            "(c) subs over channels at the fixed rate: p99 ms",
            "lower",
            &many(|m| Some((m.fixed.p99_ms, m.fixed.generator_bound))),
            &many(|m| Some((m.fixed.p99_ms, m.fixed.generator_bound))),
        ),
        row(
            runs,
            "(c) same: loss %",
            "lower",
            &many(|m| Some((m.fixed.loss_pct, m.fixed.generator_bound))),
            &many(|m| Some((m.fixed.loss_pct, m.fixed.generator_bound))),
        ),
        row(
            runs,
            "(c) same: server CPU %",
            "lower",
            &many(|m| Some((m.fixed.server_cpu, false))),
            &many(|m| Some((m.fixed.server_cpu, false))),
        ),
        row(runs, "(c) saturation: deliveries/s at the last passing step", "higher", &many(sat), &many(sat)),
        row(runs, "(c) saturation with the server on the scaled CPUs / on one CPU", "higher", &scaling, &scaling),
        row(
            runs,
            "(e) durable QoS 1 publishes acknowledged after commit, per s (NATS core: none)",
            "higher",
            &|r, _| durable_of(r, |d| d.acked_per_s),
            &|_, _| None,
        ),
        row(runs, "(e) same: p99 ms publish → ack", "lower", &|r, _| durable_of(r, |d| d.p99_ms), &|_, _| None),
        row(
            runs,
            "(e) same: publishes per commit (fsync)",
            "info",
            &|r, _| durable_of(r, |d| d.per_commit),
            &|_, _| None,
        ),
        row(runs, "(e) same: server CPU %", "info", &|r, _| durable_of(r, |d| d.server_cpu), &|_, _| None),
        row(
            runs,
            "(a) RSS per idle subscribed connection, KiB",
            "lower",
            &many(|m| Some((m.rss_per_conn_kib, false))),
            &many(|m| Some((m.rss_per_conn_kib, false))),
        ),
        row(
            runs,
            "connect p50 ms during the ramp",
            "lower",
            &many(|m| Some((m.ramp.p50_ms, false))),
            &many(|m| Some((m.ramp.p50_ms, false))),
        ),
        row(
            runs,
            "connect p99 ms during the ramp",
            "lower",
            &many(|m| Some((m.ramp.p99_ms, false))),
            &many(|m| Some((m.ramp.p99_ms, false))),
        ),
    ]
}

fn sat(m: &Many) -> Option<(f64, bool)> {
    let b = m.saturation.as_ref()?.best.as_ref()?;
    Some((b.deliveries_per_s, b.generator_bound))
}

fn num(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn spread(s: Option<Spread>, runs: usize) -> String {
    match s {
        None => "–".into(),
        Some(s) if runs == 1 => num(s.median),
        Some(s) => format!("{} ({} – {})", num(s.median), num(s.min), num(s.max)),
    }
}

/// The summary as a markdown table (also printed to stdout).
pub fn summary_table(rep: &Report) -> String {
    let runs = rep.runs.len();
    let mut t = format!(
        "| figure ({}) | better | Ferry | NATS | Ferry / NATS |\n|---|---|---|---|---|\n",
        if runs == 1 { "one run".to_string() } else { format!("median (min – max) of {runs} runs") }
    );
    for r in &rep.summary {
        t.push_str(&format!(
            "| {}{} | {} | {} | {} | {} |\n",
            r.figure,
            if r.generator_bound { " ⚠ generator-bound" } else { "" },
            r.better,
            spread(r.ferry, runs),
            spread(r.nats, runs),
            r.ratio.map_or("–".into(), |x| format!("{x:.2}")),
        ));
    }
    t
}

/// One step as a table line.
pub fn step_line(s: &Step) -> String {
    format!(
        "| {} | {} | {} | {:.3} | {} | {} | {:.1} / {:.1} / {:.1} / {:.1} | {:.0} | {:.0} | {:.0} | {} | {} |",
        num(s.rate),
        num(s.achieved),
        num(s.deliveries_per_s),
        s.loss_pct,
        s.duplicates,
        s.out_of_order,
        s.p50_ms,
        s.p90_ms,
        s.p99_ms,
        s.max_ms,
        s.server_cpu,
        s.gen_cpu,
        s.other_cpu,
        if s.pass { "pass" } else { "FAIL" },
        s.why.join("; ")
    )
}

/// (e) as one line.
pub fn durable_line(d: &Durable) -> String {
    format!(
        "{} acked/s ({} in {} s), {} commits ({:.0} per commit), ack p50 / p99 / max {:.1} / {:.1} / {:.1} ms, \
         server CPU {:.0} %, gen CPU {:.0} %, other {:.0} %{}{}",
        num(d.acked_per_s),
        d.acked,
        d.plan.secs,
        d.commits,
        d.per_commit,
        d.p50_ms,
        d.p99_ms,
        d.max_ms,
        d.server_cpu,
        d.gen_cpu,
        d.other_cpu,
        if d.generator_bound { " ⚠ generator-bound" } else { "" },
        if d.why.is_empty() { String::new() } else { format!("; {}", d.why.join("; ")) }
    )
}

/// Header for [`step_line`].
pub const STEP_HEADER: &str = "| msg/s | achieved | deliveries/s | loss % | dup | order | p50 / p90 / p99 / max ms | server CPU % | gen CPU % | other CPU % | result | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

/// The whole result file as markdown.
pub fn markdown(rep: &Report) -> String {
    let mut m = format!(
        "# ferry-wsload {} — {}\n\nMachine: {}\n\nSettings: {}\n\n",
        rep.mode,
        rep.started,
        rep.machine.line(),
        rep.settings
    );
    for n in &rep.notes {
        m.push_str(&format!("Note: {n}\n\n"));
    }
    m.push_str(&summary_table(rep));
    for (i, run) in rep.runs.iter().enumerate() {
        m.push_str(&format!("\n## Run {}\n", i + 1));
        for f in &run.fanout {
            m.push_str(&format!(
                "\n### (d) {} QoS {}, 1 channel × {} subscribers\n\n{STEP_HEADER}\n",
                f.server, f.qos, f.subs
            ));
            for s in &f.search.steps {
                m.push_str(&step_line(s));
                m.push('\n');
            }
            if let Some(s) = &f.overload {
                m.push_str(&format!(
                    "\nOverload step (2 × the saturation rate): {} publishes refused, loss among accepted {:.3} %, {} subscribers disconnected.\n\n{STEP_HEADER}\n{}\n",
                    s.publish_errors,
                    s.accepted_loss_pct,
                    s.disconnected,
                    step_line(s)
                ));
            }
        }
        for x in run.many.iter().chain(&run.scaled) {
            m.push_str(&format!(
                "\n### (c)/(a) {}, server CPUs {}: {} subscribers over {} channels\n\nRamp at {:.0}/s: {} connected, {} failed, {:.1} s; connect p50 {:.2} ms, p90 {:.2}, p99 {:.2}, max {:.2}.\n\
                 RSS {:.1} MiB before, {:.1} MiB with every connection idle: {:.1} KiB per connection.\n\n{STEP_HEADER}\n{}\n",
                x.server,
                x.cpus,
                x.subs,
                x.channels,
                x.ramp.rate,
                x.ramp.connected,
                x.ramp.failures,
                x.ramp.secs,
                x.ramp.p50_ms,
                x.ramp.p90_ms,
                x.ramp.p99_ms,
                x.ramp.max_ms,
                x.rss_before as f64 / 1048576.0,
                x.rss_after as f64 / 1048576.0,
                x.rss_per_conn_kib,
                step_line(&x.fixed)
            ));
            if let Some(sat) = &x.saturation {
                m.push_str("\nSaturation search:\n\n");
                m.push_str(STEP_HEADER);
                m.push('\n');
                for s in &sat.steps {
                    m.push_str(&step_line(s));
                    m.push('\n');
                }
            }
        }
        for d in &run.durable {
            m.push_str(&format!(
                "\n### (e) {} durable QoS 1 publishes: {} publishers × {} in flight\n\n{}\n",
                d.server,
                d.plan.publishers,
                d.plan.window,
                durable_line(d)
            ));
        }
    }
    m
}
