//! One server under test with its subscribers and publishers: connection
//! ramps, paced steps and the saturation search.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::client::{self, Publisher, StepDone, Target};
use crate::server::{Bins, Kind, Server};
use crate::stats::Stats;
use crate::sys::{rss_bytes, CpuMeter};

/// Pass limits of a step (issue 15).
pub const MAX_LOSS_PCT: f64 = 0.1;
/// p99 limit, ms.
pub const MAX_P99_MS: f64 = 200.0;
/// A generator at or above this share of its core may be the bottleneck.
pub const GENERATOR_BOUND_PCT: f64 = 90.0;
/// Other processes above this share of a core: the step is noted as
/// measured on a busy machine.
pub const BUSY_MACHINE_PCT: f64 = 20.0;

/// The figures of one paced step.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Target publish rate, msg/s.
    pub rate: f64,
    /// Achieved publish rate, msg/s.
    pub achieved: f64,
    /// Unique deliveries per second of publishing.
    pub deliveries_per_s: f64,
    /// Deliveries expected (published × subscribers of the channel).
    pub expected: u64,
    /// Unique deliveries received by the end of the drain.
    pub received: u64,
    /// 100 × (expected − received) / expected.
    pub loss_pct: f64,
    /// Deliveries of a message a subscriber already had.
    pub duplicates: u64,
    /// Deliveries below a sequence number already seen.
    pub out_of_order: u64,
    /// Latency, publish instant (in the payload) to arrival, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
    /// Server CPU over the publishing window, % of one core.
    pub server_cpu: f64,
    /// Generator CPU over the same window, % of one core.
    pub gen_cpu: f64,
    /// CPU used by every other process on the machine meanwhile, % of one
    /// core (the machine is shared; a high figure makes the step suspect).
    pub other_cpu: f64,
    /// The generator, not only the server, may have been the bottleneck.
    pub generator_bound: bool,
    /// Subscribers disconnected during the step.
    pub disconnected: u64,
    /// Publishes refused by the server.
    pub publish_errors: u64,
    /// Loss among the publications the server accepted, % (refused
    /// publishes are not expected; one-channel scenarios only, else the
    /// same as `loss_pct`).
    pub accepted_loss_pct: f64,
    /// Within every limit.
    pub pass: bool,
    /// Why not, or notes.
    pub why: Vec<String>,
}

/// A saturation search: double until a step fails, then bisect.
#[derive(Clone, Debug, Serialize)]
pub struct Search {
    /// Every step in the order run.
    pub steps: Vec<Step>,
    /// The highest passing step.
    pub best: Option<Step>,
}

/// A connection ramp.
#[derive(Clone, Debug, Serialize)]
pub struct Ramp {
    /// Connections asked for.
    pub target: usize,
    /// Connections per second asked for.
    pub rate: f64,
    /// Connected and subscribed.
    pub connected: usize,
    /// Failed attempts.
    pub failures: u64,
    /// Seconds the ramp took until the last connection.
    pub secs: f64,
    /// Connect time (WebSocket open to subscription confirmed), ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
}

/// Knobs shared by every scenario.
#[derive(Clone, Debug)]
pub struct Knobs {
    /// Seconds of publishing per step.
    pub step_secs: f64,
    /// Bisection steps after the first failure.
    pub bisect: usize,
    /// Rate doublings at most.
    pub max_doublings: usize,
    /// CPUs of the server, a `taskset -c` list.
    pub server_cpus: String,
    /// Re-runs of a step measured on a busy machine.
    pub busy_retries: usize,
}

/// A server with its generator-side connections.
pub struct Bench {
    /// The server.
    pub server: Server,
    target: Target,
    stats: Rc<RefCell<Stats>>,
    subs: usize,
    channels: usize,
    handles: Vec<Option<JoinHandle<()>>>,
    publishers: Vec<Publisher>,
    step_no: u32,
    knobs: Knobs,
}

impl Bench {
    /// Start the server for `subs` subscribers over `channels` channels.
    pub fn new(
        kind: Kind,
        target: Target,
        bins: &Bins,
        knobs: &Knobs,
        subs: usize,
        channels: usize,
    ) -> anyhow::Result<Bench> {
        let server = Server::start(kind, bins, &knobs.server_cpus)?;
        Ok(Bench {
            server,
            target,
            stats: Rc::new(RefCell::new(Stats::new(subs))),
            subs,
            channels,
            handles: (0..subs).map(|_| None).collect(),
            publishers: Vec::new(),
            step_no: 0,
            knobs: knobs.clone(),
        })
    }

    /// Server RSS now, bytes.
    pub fn rss(&self) -> u64 {
        rss_bytes(self.server.pid())
    }

    fn spawn(&mut self, i: usize, ramp: bool) {
        let fut =
            client::subscriber(self.target, self.server.url.clone(), i, i % self.channels, self.stats.clone(), ramp);
        self.handles[i] = Some(tokio::task::spawn_local(fut));
    }

    /// Open every subscriber at `rate` per second and wait for them.
    pub async fn ramp(&mut self, rate: f64) -> Ramp {
        let start = Instant::now();
        for i in 0..self.subs {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
            self.spawn(i, true);
        }
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let all_in = {
                let s = self.stats.borrow();
                s.connected() + s.connect_failures as usize >= self.subs
            };
            if all_in || Instant::now() > end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let s = self.stats.borrow();
        let q = |p: f64| s.connect.value_at_quantile(p) as f64 / 1000.0;
        Ramp {
            target: self.subs,
            rate,
            connected: s.connected(),
            failures: s.connect_failures,
            secs: start.elapsed().as_secs_f64(),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: s.connect.max() as f64 / 1000.0,
        }
    }

    /// Reconnect subscribers lost in an earlier step (not measured).
    async fn heal(&mut self) {
        let dead: Vec<usize> = (0..self.subs)
            .filter(|&i| !self.stats.borrow().alive[i] && self.handles[i].as_ref().is_none_or(|h| h.is_finished()))
            .collect();
        for (n, i) in dead.into_iter().enumerate() {
            self.spawn(i, false);
            if n % 500 == 499 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let end = Instant::now() + Duration::from_secs(30);
        while self.stats.borrow().connected() < self.subs && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Connect `n` publishers, each owning every n-th channel.
    pub async fn publishers(&mut self, n: usize) -> anyhow::Result<()> {
        let n = n.clamp(1, self.channels);
        for k in 0..n {
            let owned: Vec<usize> = (k..self.channels).step_by(n).collect();
            let p = Publisher::start(self.target, &self.server.url, k, owned, self.stats.clone())
                .await
                .map_err(|e| anyhow::anyhow!("publisher {k}: {e}"))?;
            self.publishers.push(p);
        }
        Ok(())
    }

    fn subs_of(&self, c: usize) -> u64 {
        (self.subs / self.channels + usize::from(c < self.subs % self.channels)) as u64
    }

    /// Publish at `rate` msg/s (all publishers together) for a step and
    /// measure it.
    /// A step measured while other processes kept a core busy is run
    /// again, up to `busy_retries` times, after a pause (the machine is
    /// shared with other builds); the last attempt counts either way.
    pub async fn step(&mut self, rate: f64) -> Step {
        let mut attempt = 0;
        loop {
            let mut s = self.step_for(rate, self.knobs.step_secs).await;
            if s.other_cpu <= BUSY_MACHINE_PCT || attempt >= self.knobs.busy_retries {
                if attempt > 0 {
                    s.why.push(format!("measured at attempt {} (busy machine before)", attempt + 1));
                }
                return s;
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }

    /// A short unjudged step at `rate`: the first load after a ramp makes
    /// the servers allocate buffers and warm caches, which is not what the
    /// steps measure.
    pub async fn warm_up(&mut self, rate: f64) {
        let _ = self.step_for(rate, 2.0).await;
    }

    async fn step_for(&mut self, rate: f64, secs: f64) -> Step {
        self.heal().await;
        self.step_no += 1;
        self.stats.borrow_mut().begin(self.step_no);
        let meter = CpuMeter::start(self.server.pid());
        let mut waits = Vec::new();
        for p in &self.publishers {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let order = client::StepOrder {
                step: self.step_no,
                rate: rate / self.publishers.len() as f64,
                duration: Duration::from_secs_f64(secs),
                done: tx,
            };
            if p.orders.send(order).is_ok() {
                waits.push(rx);
            }
        }
        let mut done = Vec::new();
        for w in waits {
            done.push(w.await.unwrap_or_default());
        }
        let cpu = meter.stop();
        let expected: u64 = done.iter().flat_map(|d| &d.per_channel).map(|&(c, n)| n * self.subs_of(c)).sum();
        let sent: u64 = done.iter().map(|d| d.sent).sum();
        let secs = done.iter().map(|d| d.secs).fold(0.0, f64::max).max(1e-3);
        // Drain: until everything arrived, nothing arrived for 1 s, or 3 s;
        // QoS 1 promises every accepted publication, so while its
        // subscribers still catch up (from the store), up to 30 s.
        let max_drain = match self.target {
            Target::Ferry(_, q) if q != ferry_core::frame::Qos::AtMostOnce => Duration::from_secs(30),
            _ => Duration::from_secs(3),
        };
        let drain = Instant::now();
        loop {
            let (all_in, quiet) = {
                let s = self.stats.borrow();
                (s.received >= expected, s.last_delivery.elapsed() > Duration::from_secs(1))
            };
            if all_in || (quiet && drain.elapsed() > Duration::from_millis(200)) || drain.elapsed() > max_drain {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut step = self.measure(rate, sent, secs, expected, cpu, &done);
        let refused = if self.channels == 1 { step.publish_errors * self.subs_of(0) } else { 0 };
        let accepted = expected.saturating_sub(refused);
        step.accepted_loss_pct =
            if accepted == 0 { 0.0 } else { 100.0 * accepted.saturating_sub(step.received) as f64 / accepted as f64 };
        // Settle: let a backlog of a failing step go before the next one.
        let settle = Instant::now();
        while self.stats.borrow().last_delivery.elapsed() < Duration::from_millis(300)
            && settle.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        step
    }

    #[allow(clippy::too_many_arguments)]
    fn measure(
        &mut self,
        rate: f64,
        sent: u64,
        secs: f64,
        expected: u64,
        cpu: (f64, f64, f64),
        done: &[StepDone],
    ) -> Step {
        let (server_cpu, gen_cpu, other_cpu) = cpu;
        let s = self.stats.borrow();
        let q = |p: f64| s.latency.value_at_quantile(p) as f64 / 1000.0;
        let loss_pct =
            if expected == 0 { 0.0 } else { 100.0 * expected.saturating_sub(s.received) as f64 / expected as f64 };
        let publish_errors: u64 = done.iter().map(|d| d.errors).sum();
        let achieved = sent as f64 / secs;
        let mut why = Vec::new();
        if loss_pct > MAX_LOSS_PCT {
            why.push(format!("loss {loss_pct:.2} % > {MAX_LOSS_PCT} %"));
        }
        if q(0.99) > MAX_P99_MS {
            why.push(format!("p99 {:.1} ms > {MAX_P99_MS} ms", q(0.99)));
        }
        if s.disconnected > 0 {
            let reasons: Vec<String> = s.reasons.iter().map(|(r, n)| format!("{n}× {r}")).collect();
            why.push(format!("{} of {} subscribers disconnected ({})", s.disconnected, self.subs, reasons.join("; ")));
        }
        if achieved < 0.95 * rate {
            why.push(format!("publishers reached only {achieved:.0} of {rate:.0} msg/s"));
        }
        if publish_errors > 0 || done.iter().any(|d| d.error.is_some()) {
            let first = done.iter().find_map(|d| d.error.clone()).unwrap_or_default();
            why.push(format!("{publish_errors} publishes refused or failed: {first}"));
        }
        if s.received == 0 && expected > 0 {
            why.push("nothing arrived".into());
        }
        if s.corrupt > 0 {
            why.push(format!("{} malformed or misrouted payloads", s.corrupt));
        }
        if !self.server.alive() {
            why.push("the server process exited".into());
        }
        let pass = why.is_empty();
        let generator_bound = gen_cpu >= GENERATOR_BOUND_PCT;
        if generator_bound {
            why.push(format!("generator-bound: generator CPU {gen_cpu:.0} %"));
        }
        if other_cpu > BUSY_MACHINE_PCT {
            why.push(format!("busy machine: other processes used {other_cpu:.0} % of a core"));
        }
        if s.stale > 0 {
            why.push(format!("{} late deliveries of an earlier step ignored", s.stale));
        }
        Step {
            rate,
            achieved,
            deliveries_per_s: s.received as f64 / secs,
            expected,
            received: s.received,
            loss_pct,
            duplicates: s.duplicates,
            out_of_order: s.out_of_order,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: s.latency.max() as f64 / 1000.0,
            server_cpu,
            gen_cpu,
            other_cpu,
            generator_bound,
            disconnected: s.disconnected,
            publish_errors,
            accepted_loss_pct: loss_pct,
            pass,
            why,
        }
    }

    /// Double from `start` while steps pass (halve while they fail, if the
    /// first one does), then bisect between the last pass and first fail.
    pub async fn search(&mut self, start: f64, log: &dyn Fn(&Step)) -> Search {
        let mut steps = Vec::new();
        let (mut lo, mut hi): (Option<Step>, Option<f64>) = (None, None);
        let mut rate = start;
        for _ in 0..=self.knobs.max_doublings {
            let s = self.step(rate).await;
            log(&s);
            steps.push(s.clone());
            if !self.server.alive() {
                return Search { steps, best: lo };
            }
            if s.pass {
                lo = Some(s);
                rate *= 2.0;
            } else {
                hi = Some(rate);
                break;
            }
        }
        if lo.is_none() {
            for _ in 0..4 {
                rate /= 2.0;
                let s = self.step(rate).await;
                log(&s);
                steps.push(s.clone());
                if s.pass {
                    lo = Some(s);
                    break;
                }
                hi = Some(rate);
            }
        }
        if let (Some(_), Some(_)) = (&lo, hi) {
            for _ in 0..self.knobs.bisect {
                let (l, h) = (lo.as_ref().map_or(0.0, |s| s.rate), hi.unwrap_or(0.0));
                let mid = ((l + h) / 2.0).round();
                let s = self.step(mid).await;
                log(&s);
                steps.push(s.clone());
                if s.pass {
                    lo = Some(s);
                } else {
                    hi = Some(mid);
                }
            }
        }
        Search { steps, best: lo }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for h in self.handles.iter().flatten() {
            h.abort();
        }
        self.publishers.clear();
    }
}
