//! A deterministic simulated network and a small in-memory server for
//! driving `ClientSession`s against `ServerSession`s.
//!
//! Time is virtual: the loop jumps to the next packet arrival or timer.
//! Every random choice comes from one seed, printed when a check fails, so a
//! failing run replays exactly.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::client::{ClientConfig, ClientSession, ConnId, Event, Input, Output, Snapshot};
use ferry_core::codec::Encoding;
use ferry_core::frame::*;
use ferry_core::rng::Rng;
use ferry_core::server::{
    Accept, FetchEnd, ServerConfig, ServerEvent, ServerOutput, ServerSession, SharedPublication, StreamStart,
};
use ferry_core::{CloseCode, ErrorCode, Instant};

/// Faults of the simulated links.
#[derive(Clone, Debug)]
pub struct Faults {
    /// One-way latency range, ms.
    pub latency: (u64, u64),
    /// Probability a packet is lost.
    pub loss: f64,
    /// Probability a packet is delivered twice.
    pub dup: f64,
    /// Packets of one direction may overtake each other.
    pub reorder: bool,
    /// Probability per simulated second that each live link is cut.
    pub cut_per_sec: f64,
}

impl Faults {
    /// A healthy network: latency only, FIFO, nothing lost.
    pub fn none() -> Self {
        Faults { latency: (1, 20), loss: 0.0, dup: 0.0, reorder: false, cut_per_sec: 0.0 }
    }
}

type LinkId = u64;

#[derive(Debug)]
enum Packet {
    /// The client's transport opened (server accepted the TCP/WS handshake).
    Opened {
        link: LinkId,
    },
    ToServer {
        link: LinkId,
        data: Vec<u8>,
    },
    ToClient {
        link: LinkId,
        data: Vec<u8>,
    },
    /// The transport closed; tell the client side.
    ClientSideClosed {
        link: LinkId,
        code: Option<u16>,
        reason: String,
    },
    /// The transport closed; tell the server side.
    ServerSideClosed {
        link: LinkId,
    },
}

struct Link {
    client: usize,
    conn: ConnId,
    /// The node (endpoint index) it goes to.
    endpoint: usize,
    /// Generation of the client process that opened it.
    generation: u64,
    server: Option<ServerSession>,
    up: bool,
    /// Last scheduled arrival per direction, for FIFO links.
    last_to_server: u64,
    last_to_client: u64,
    server_timeout: Option<Instant>,
}

/// One simulated app: a client session plus what its app has seen.
pub struct SimClient {
    pub device: String,
    pub cfg: ClientConfig,
    pub session: ClientSession,
    /// Process generation, bumped at each simulated restart.
    pub generation: u64,
    pub snapshot: Snapshot,
    pub timeout: Option<Instant>,
    /// Per channel: (epoch, offset, message id) surfaced to the app, in order.
    pub received: BTreeMap<String, Vec<(String, u64, String)>>,
    /// message id -> position acknowledged by the server.
    pub acked: BTreeMap<String, StreamPosition>,
    /// Message ids accepted by `publish` (QoS 1/2) and their channel.
    pub published: BTreeMap<String, (String, Qos)>,
    /// Message ids that failed, with why.
    pub failed: BTreeMap<String, String>,
    pub events: Vec<Event>,
    pub keep_events: bool,
    pub token_requests: u32,
    pub auto_token: Option<String>,
    /// The token provider fails (answers `token_failed`, not terminal).
    pub fail_tokens: bool,
}

/// The in-memory stand-in for the server's store and fan-out.
#[derive(Default)]
pub struct Hub {
    pub streams: BTreeMap<String, Stream>,
    /// message id -> (channel, epoch, offset); QoS 2 entries leave on release.
    pub dedup: HashMap<String, (String, String, u64)>,
    /// message ids ever released.
    pub released: BTreeSet<String>,
    /// channel -> subscribed links.
    pub subscribers: BTreeMap<String, BTreeSet<LinkId>>,
    /// (device, channel) -> last ack (epoch, offset); acks must only move forward.
    pub acks: HashMap<(String, String), (String, u64)>,
    pub ack_regressions: Vec<String>,
    /// Token -> lifetime; tokens not listed never expire; "bad" is refused.
    pub token_ttl: HashMap<String, Duration>,
    pub clock_ms: u64,
    pub epoch_counter: u64,
    pub stores: u64,
}

/// One channel's stream.
#[derive(Default, Clone)]
pub struct Stream {
    pub epoch: String,
    /// Offset of pubs[0].
    pub first: u64,
    pub pubs: Vec<Arc<SharedPublication>>,
}

impl Stream {
    pub fn top(&self) -> u64 {
        self.first + self.pubs.len() as u64 - 1
    }
}

/// The whole simulation.
pub struct Sim {
    pub seed: u64,
    pub now: Instant,
    rng: Rng,
    pub faults: Faults,
    /// Until when all packets are dropped and connects hang.
    pub partition_until: Instant,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    packets: Vec<Option<Packet>>,
    seq: u64,
    links: BTreeMap<LinkId, Link>,
    next_link: LinkId,
    pub clients: Vec<SimClient>,
    pub hub: Hub,
    pub server_cfg: ServerConfig,
    pub encoding: Encoding,
    pub cuts: u64,
    /// Redeliveries counted by server sessions that have ended.
    redelivered_closed: u64,
    pub packets_lost: u64,
    pub packets_duplicated: u64,
    last_cut_check: u64,
    /// Nodes (endpoint indices) that are down: their links are cut and
    /// connects to them are refused. Every node shares the one hub, as the
    /// nodes of a cluster share their store.
    pub down: BTreeSet<usize>,
    /// Every transport opened: (client, endpoint, virtual ms), in order.
    pub opens: Vec<(usize, usize, u64)>,
}

impl Sim {
    pub fn new(seed: u64, faults: Faults) -> Self {
        Sim {
            seed,
            now: Instant::from_millis(1_000),
            rng: Rng::new(seed ^ 0x5151_5151),
            faults,
            partition_until: Instant(0),
            queue: BinaryHeap::new(),
            packets: Vec::new(),
            seq: 0,
            links: BTreeMap::new(),
            next_link: 1,
            clients: Vec::new(),
            hub: Hub { clock_ms: 1_700_000_000_000, ..Hub::default() },
            server_cfg: ServerConfig {
                ping_interval: Duration::from_secs(5),
                pong_timeout: Duration::from_secs(3),
                ack_timeout: Duration::from_secs(2),
                max_redeliveries: 50,
                inflight_window: 64,
                compress_min: Some(64),
                ..ServerConfig::default()
            },
            encoding: Encoding::Binary,
            cuts: 0,
            redelivered_closed: 0,
            packets_lost: 0,
            packets_duplicated: 0,
            last_cut_check: 1_000,
            down: BTreeSet::new(),
            opens: Vec::new(),
        }
    }

    /// A client config suited to the simulation's timings.
    pub fn client_config(&self, device: &str) -> ClientConfig {
        let mut c = ClientConfig::new(device);
        c.encoding = self.encoding;
        c.request_timeout = Duration::from_secs(4);
        c.connect_timeout = Duration::from_secs(4);
        c.backoff_min = Duration::from_millis(200);
        c.backoff_max = Duration::from_secs(3);
        c.reorder_buffer = 256;
        c
    }

    pub fn add_client(&mut self, cfg: ClientConfig) -> usize {
        let seed = self.rng.next_u64();
        let session = ClientSession::new(cfg.clone(), seed);
        let snapshot = Snapshot { seen_cap: cfg.dedup_window, ..Snapshot::default() };
        self.clients.push(SimClient {
            device: cfg.device_id.clone(),
            cfg,
            session,
            generation: 0,
            snapshot,
            timeout: None,
            received: BTreeMap::new(),
            acked: BTreeMap::new(),
            published: BTreeMap::new(),
            failed: BTreeMap::new(),
            events: Vec::new(),
            keep_events: true,
            token_requests: 0,
            auto_token: None,
            fail_tokens: false,
        });
        let i = self.clients.len() - 1;
        self.drain_client(i);
        i
    }

    // ---- app-level commands --------------------------------------------

    pub fn connect(&mut self, c: usize) {
        let now = self.now;
        self.clients[c].session.connect(now);
        self.drain_client(c);
    }

    pub fn subscribe(&mut self, c: usize, ch: &str, qos: Qos) {
        let now = self.now;
        self.clients[c].session.subscribe(now, ch, qos);
        self.drain_client(c);
    }

    pub fn publish(
        &mut self,
        c: usize,
        ch: &str,
        qos: Qos,
        data: Vec<u8>,
    ) -> Result<String, ferry_core::client::PublishError> {
        let now = self.now;
        let r = self.clients[c].session.publish(now, ch, data, qos);
        if let Ok(id) = &r {
            self.clients[c].published.insert(id.clone(), (ch.to_string(), qos));
        }
        self.drain_client(c);
        r
    }

    pub fn network_changed(&mut self, c: usize, online: bool) {
        let now = self.now;
        self.clients[c].session.handle_input(now, Input::NetworkChanged { online });
        self.drain_client(c);
    }

    /// Kill the app process and start a new one from its persisted snapshot.
    pub fn restart(&mut self, c: usize) {
        let seed = self.rng.next_u64();
        let now = self.now;
        let cl = &mut self.clients[c];
        cl.generation += 1;
        let snap = cl.snapshot.clone();
        cl.session = ClientSession::restore(cl.cfg.clone(), seed, &snap, now);
        // The dead process's sockets die with it: the server notices by RST.
        let dead: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.client == c && l.generation + 1 == self.clients[c].generation)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.cut_link(id, false);
        }
        self.connect(c);
    }

    /// Cut every live link.
    pub fn cut_all(&mut self) {
        let ids: Vec<LinkId> = self.links.iter().filter(|(_, l)| l.up).map(|(id, _)| *id).collect();
        for id in ids {
            self.cut_link(id, true);
        }
    }

    /// Cut one random live link.
    pub fn cut_random(&mut self) {
        let ids: Vec<LinkId> = self.links.iter().filter(|(_, l)| l.up).map(|(id, _)| *id).collect();
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.range(0, ids.len() as u64 - 1) as usize];
        self.cut_link(id, true);
    }

    /// Take node `endpoint` down: its links are reset, connects refused.
    pub fn kill_node(&mut self, endpoint: usize) {
        self.down.insert(endpoint);
        let ids: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| l.up && l.endpoint == endpoint).map(|(id, _)| *id).collect();
        for id in ids {
            self.cut_link(id, true);
        }
    }

    /// Bring node `endpoint` back.
    pub fn revive_node(&mut self, endpoint: usize) {
        self.down.remove(&endpoint);
    }

    /// Endpoints client `c` opened transports to, in order.
    pub fn opened_endpoints(&self, c: usize) -> Vec<usize> {
        self.opens.iter().filter(|(cl, _, _)| *cl == c).map(|(_, e, _)| *e).collect()
    }

    /// Drop every packet and stall connects for `ms`.
    pub fn partition(&mut self, ms: u64) {
        self.partition_until = self.now.add_ms(ms);
    }

    fn cut_link(&mut self, id: LinkId, tell_client: bool) {
        let Some(l) = self.links.get_mut(&id) else {
            return;
        };
        if !l.up {
            return;
        }
        l.up = false;
        self.cuts += 1;
        let lat = self.faults.latency.1;
        if tell_client {
            self.schedule(lat, Packet::ClientSideClosed { link: id, code: None, reason: "connection reset".into() });
        }
        self.schedule(lat, Packet::ServerSideClosed { link: id });
    }

    // ---- the loop --------------------------------------------------------

    fn schedule(&mut self, delay: u64, p: Packet) {
        let at = self.now.as_millis() + delay;
        self.seq += 1;
        self.packets.push(Some(p));
        self.queue.push(Reverse((at, self.seq, self.packets.len() - 1)));
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) = self.faults.latency;
        self.rng.range(lo, hi)
    }

    fn partitioned(&self) -> bool {
        self.now < self.partition_until
    }

    /// Send data over a link with the configured faults.
    fn transmit(&mut self, link: LinkId, to_server: bool, data: Vec<u8>) {
        if self.partitioned() || self.rng.chance(self.faults.loss) {
            self.packets_lost += 1;
            return;
        }
        let copies = if self.rng.chance(self.faults.dup) {
            self.packets_duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = self.latency();
            if !self.faults.reorder {
                let now = self.now.as_millis();
                let l = self.links.get_mut(&link).expect("link");
                let last = if to_server { &mut l.last_to_server } else { &mut l.last_to_client };
                delay = delay.max(last.saturating_sub(now));
                *last = now + delay;
            }
            let p = if to_server {
                Packet::ToServer { link, data: data.clone() }
            } else {
                Packet::ToClient { link, data: data.clone() }
            };
            self.schedule(delay, p);
        }
    }

    /// Earliest pending instant.
    fn next_instant(&self) -> Option<Instant> {
        let mut t = self.queue.peek().map(|Reverse((at, _, _))| Instant(*at));
        for c in &self.clients {
            t = min_opt(t, c.timeout);
        }
        for l in self.links.values() {
            t = min_opt(t, l.server_timeout);
        }
        if self.faults.cut_per_sec > 0.0 && !self.links.is_empty() {
            t = min_opt(t, Some(Instant(self.last_cut_check + 1000)));
        }
        t
    }

    /// Run until `until` (virtual), processing everything due.
    pub fn run_until(&mut self, until: Instant) {
        let mut steps = 0u64;
        while let Some(t) = self.next_instant() {
            if t > until {
                break;
            }
            steps += 1;
            assert!(steps < 50_000_000, "seed {}: simulation did not settle", self.seed);
            self.now = self.now.max(t);
            self.hub.clock_ms = 1_700_000_000_000 + self.now.as_millis();
            self.step();
        }
        self.now = self.now.max(until);
    }

    pub fn run_for(&mut self, ms: u64) {
        let until = self.now.add_ms(ms);
        self.run_until(until);
    }

    /// Run (bounded) until `done` holds; returns whether it did.
    pub fn run_until_cond(&mut self, max_ms: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now.add_ms(max_ms);
        while self.now < end {
            if done(self) {
                return true;
            }
            let step = self.now.add_ms(50).min(end);
            self.run_until(step);
        }
        done(self)
    }

    fn step(&mut self) {
        let now = self.now;
        // Random cuts, checked once per simulated second.
        if self.faults.cut_per_sec > 0.0 && now.as_millis() >= self.last_cut_check + 1000 {
            self.last_cut_check = now.as_millis();
            let ids: Vec<LinkId> = self.links.iter().filter(|(_, l)| l.up).map(|(id, _)| *id).collect();
            for id in ids {
                if self.rng.chance(self.faults.cut_per_sec) {
                    self.cut_link(id, true);
                }
            }
        }
        while let Some(Reverse((at, _, idx))) = self.queue.peek().copied() {
            if at > now.as_millis() {
                break;
            }
            self.queue.pop();
            let p = self.packets[idx].take().expect("packet");
            self.deliver_packet(p);
        }
        for c in 0..self.clients.len() {
            if self.clients[c].timeout.is_some_and(|t| t <= now) {
                self.clients[c].timeout = None;
                self.clients[c].session.handle_input(now, Input::Timeout);
                self.drain_client(c);
            }
        }
        let due: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| l.server_timeout.is_some_and(|t| t <= now)).map(|(id, _)| *id).collect();
        for id in due {
            if let Some(s) = self.links.get_mut(&id).and_then(|l| l.server.as_mut()) {
                s.handle_timeout(now);
            }
            if let Some(l) = self.links.get_mut(&id) {
                l.server_timeout = None;
            }
            self.drain_server(id);
        }
        // Packets are reclaimed lazily; drop the tail when idle.
        if self.queue.is_empty() {
            self.packets.clear();
        }
    }

    fn deliver_packet(&mut self, p: Packet) {
        let now = self.now;
        match p {
            Packet::Opened { link } => {
                let Some(l) = self.links.get(&link) else {
                    return;
                };
                if !l.up {
                    return;
                }
                let (c, conn, generation) = (l.client, l.conn, l.generation);
                if self.clients[c].generation != generation {
                    return;
                }
                let mut s = ServerSession::new(self.server_cfg.clone(), self.encoding, now);
                let _ = &mut s;
                self.links.get_mut(&link).unwrap().server = Some(s);
                self.drain_server(link);
                self.clients[c].session.handle_input(now, Input::TransportOpened { conn });
                self.drain_client(c);
            }
            Packet::ToServer { link, data } => {
                let Some(l) = self.links.get_mut(&link) else {
                    return;
                };
                if !l.up {
                    return;
                }
                if let Some(s) = l.server.as_mut() {
                    s.handle_message(now, &data);
                }
                self.drain_server(link);
            }
            Packet::ToClient { link, data } => {
                let Some(l) = self.links.get(&link) else {
                    return;
                };
                if !l.up {
                    return;
                }
                let (c, conn, generation) = (l.client, l.conn, l.generation);
                if self.clients[c].generation != generation {
                    return;
                }
                self.clients[c].session.handle_input(now, Input::TransportMessage { conn, data: &data });
                self.drain_client(c);
            }
            Packet::ClientSideClosed { link, code, reason } => {
                let Some(l) = self.links.get(&link) else {
                    return;
                };
                let (c, conn, generation) = (l.client, l.conn, l.generation);
                if self.clients[c].generation == generation {
                    self.clients[c].session.handle_input(now, Input::TransportClosed { conn, code, reason });
                    self.drain_client(c);
                }
                self.gc_link(link);
            }
            Packet::ServerSideClosed { link } => {
                if let Some(s) = self.links.get_mut(&link).and_then(|l| l.server.as_mut()) {
                    s.handle_closed(now);
                }
                self.drain_server(link);
                if let Some(l) = self.links.get_mut(&link) {
                    if let Some(s) = l.server.take() {
                        self.redelivered_closed += s.stats().redelivered;
                    }
                    l.server_timeout = None;
                }
                self.gc_link(link);
            }
        }
    }

    fn gc_link(&mut self, link: LinkId) {
        if let Some(l) = self.links.get(&link) {
            if !l.up && l.server.is_none() {
                self.links.remove(&link);
            }
        }
    }

    // ---- client side -----------------------------------------------------

    pub fn drain_client(&mut self, c: usize) {
        let now = self.now;
        let mut guard = 0;
        loop {
            guard += 1;
            assert!(guard < 1_000_000, "seed {}: client output did not drain", self.seed);
            let out = self.clients[c].session.poll_output(now);
            match out {
                Output::Timeout(t) => {
                    self.clients[c].timeout = t;
                    return;
                }
                Output::Open { conn, endpoint } => {
                    assert!(
                        endpoint < self.clients[c].cfg.endpoints.max(1),
                        "seed {}: endpoint {endpoint} out of range",
                        self.seed
                    );
                    self.opens.push((c, endpoint, self.now.as_millis()));
                    let id = self.next_link;
                    self.next_link += 1;
                    let generation = self.clients[c].generation;
                    self.links.insert(
                        id,
                        Link {
                            client: c,
                            conn,
                            endpoint,
                            generation,
                            server: None,
                            up: true,
                            last_to_server: 0,
                            last_to_client: 0,
                            server_timeout: None,
                        },
                    );
                    if self.partitioned() {
                        // The SYN goes nowhere: the client's connect timeout fires.
                        continue;
                    }
                    if self.down.contains(&endpoint) {
                        // Nothing listens there: refused after a round trip.
                        self.links.get_mut(&id).unwrap().up = false;
                        let d = self.latency() * 2;
                        self.schedule(d, Packet::ClientSideClosed { link: id, code: None, reason: "refused".into() });
                        continue;
                    }
                    let d = self.latency() * 2;
                    self.schedule(d, Packet::Opened { link: id });
                }
                Output::Transmit { conn, data } => {
                    if let Some(id) = self.link_of(c, conn) {
                        self.transmit(id, true, data);
                    }
                }
                Output::Close { conn, .. } => {
                    if let Some(id) = self.link_of(c, conn) {
                        // The client closed: only the server needs telling.
                        let l = self.links.get_mut(&id).unwrap();
                        if l.up {
                            l.up = false;
                            let lat = self.faults.latency.1;
                            self.schedule(lat, Packet::ServerSideClosed { link: id });
                        }
                    }
                }
                Output::Event(e) => self.on_client_event(c, e),
            }
        }
    }

    fn link_of(&self, c: usize, conn: ConnId) -> Option<LinkId> {
        let generation = self.clients[c].generation;
        self.links
            .iter()
            .find(|(_, l)| l.client == c && l.conn == conn && l.generation == generation)
            .map(|(id, _)| *id)
    }

    fn on_client_event(&mut self, c: usize, e: Event) {
        let now = self.now;
        let cl = &mut self.clients[c];
        match &e {
            Event::Persist(ch) => cl.snapshot.apply(ch),
            Event::Publication(p) => cl.received.entry(p.channel.clone()).or_default().push((
                p.epoch.clone(),
                p.offset,
                p.message_id.clone(),
            )),
            Event::PublishAcked { message_id, position, .. } => {
                cl.acked.insert(message_id.clone(), position.clone());
            }
            Event::PublishFailed { message_id, error, .. } => {
                cl.failed.insert(message_id.clone(), error.to_string());
            }
            Event::TokenRequested => {
                cl.token_requests += 1;
                if cl.fail_tokens {
                    cl.session.token_failed(now, false);
                } else if let Some(t) = cl.auto_token.clone() {
                    cl.session.set_token(now, t);
                }
            }
            _ => {}
        }
        if cl.keep_events {
            cl.events.push(e);
        }
    }

    // ---- server side -----------------------------------------------------

    fn drain_server(&mut self, link: LinkId) {
        let now = self.now;
        let mut guard = 0;
        loop {
            guard += 1;
            assert!(guard < 1_000_000, "seed {}: server output did not drain", self.seed);
            let Some(l) = self.links.get_mut(&link) else {
                return;
            };
            let Some(s) = l.server.as_mut() else { return };
            match s.poll_output(now) {
                ServerOutput::Timeout(t) => {
                    l.server_timeout = t;
                    return;
                }
                ServerOutput::Transmit(data) => {
                    if l.up {
                        self.transmit(link, false, data);
                    }
                }
                ServerOutput::Close { code, reason } => {
                    if l.up {
                        l.up = false;
                        // Close travels behind the data already sent.
                        let lat = self.faults.latency.1;
                        let delay = l.last_to_client.saturating_sub(now.as_millis()).max(lat);
                        self.schedule(delay, Packet::ClientSideClosed { link, code: Some(code), reason });
                    }
                }
                ServerOutput::Event(e) => self.on_server_event(link, e),
            }
        }
    }

    fn server(&mut self, link: LinkId) -> &mut ServerSession {
        self.links.get_mut(&link).and_then(|l| l.server.as_mut()).expect("server session")
    }

    fn stream_start(&mut self, req: &SubscribeRequest) -> StreamStart {
        let st = self.hub.stream(&req.channel);
        let top = st.top();
        let (from, recovered) = match &req.since {
            None => (top + 1, true),
            Some(p) if p.epoch == st.epoch && p.offset + 1 >= st.first && p.offset <= top => (p.offset + 1, true),
            // The client saw offsets the stream lost: they are void.
            Some(p) if p.epoch == st.epoch && p.offset > top => (top + 1, false),
            Some(_) => (st.first, false),
        };
        StreamStart { qos: req.qos, epoch: st.epoch.clone(), top, from, recovered }
    }

    fn on_server_event(&mut self, link: LinkId, e: ServerEvent) {
        let now = self.now;
        match e {
            ServerEvent::Connect { req, connect } => {
                if connect.token == "bad" {
                    let err = ErrorReply::new(ErrorCode::Unauthorized);
                    return self.server(link).reject(now, req, err, CloseCode::Unauthorized);
                }
                let expires_in = self.hub.token_ttl.get(&connect.token).copied();
                if expires_in == Some(Duration::ZERO) {
                    let err = ErrorReply::new(ErrorCode::TokenExpired);
                    return self.server(link).reject(now, req, err, CloseCode::TokenExpired);
                }
                let subs: Vec<_> = connect.subs.iter().map(|s| Ok(self.stream_start(s))).collect();
                for s in &connect.subs {
                    self.hub.subscribers.entry(s.channel.clone()).or_default().insert(link);
                }
                let client = ClientInfo { client: format!("c{link}"), user: connect.device_id.clone(), info: None };
                let time_ms = self.hub.clock_ms;
                self.server(link).accept(now, req, Accept { client, expires_in, subs, time_ms, subscribe: vec![] });
            }
            ServerEvent::Subscribe { req, sub } => {
                if sub.channel.starts_with("forbidden") {
                    return self.server(link).reply_error(now, req, ErrorReply::new(ErrorCode::PermissionDenied));
                }
                let start = self.stream_start(&sub);
                self.hub.subscribers.entry(sub.channel.clone()).or_default().insert(link);
                self.server(link).subscribe_ok(now, req, start);
            }
            ServerEvent::Unsubscribed { channel } => {
                if let Some(s) = self.hub.subscribers.get_mut(&channel) {
                    s.remove(&link);
                }
            }
            ServerEvent::Publish { req, channel, message_id, qos, data } => {
                if let Some((_, epoch, offset)) = self.hub.dedup.get(&message_id).cloned() {
                    return self.server(link).publish_ok(now, req, epoch, offset, true);
                }
                assert!(
                    !self.hub.released.contains(&message_id),
                    "seed {}: released QoS 2 message {message_id} published again",
                    self.seed
                );
                let publisher = ClientInfo { client: format!("c{link}"), user: String::new(), info: None };
                let shared = self.hub.append(&channel, &message_id, qos, data, Some(publisher));
                let (epoch, offset) = (shared.publication().epoch.clone(), shared.publication().offset);
                self.server(link).publish_ok(now, req, epoch.clone(), offset, false);
                self.hub.dedup.insert(message_id, (channel.clone(), epoch, offset));
                self.fan_out(&shared);
            }
            ServerEvent::Release { message_id } => {
                if self.hub.dedup.remove(&message_id).is_some() {
                    self.hub.released.insert(message_id);
                }
            }
            ServerEvent::Call { req, cmd } => {
                let body = match cmd {
                    Command::History(h) => {
                        let st = self.hub.stream(&h.channel);
                        let mut pubs: Vec<Publication> = st.pubs.iter().map(|p| p.publication().clone()).collect();
                        if h.reverse {
                            pubs.reverse();
                        }
                        pubs.truncate(h.limit as usize);
                        ReplyBody::History {
                            publications: pubs,
                            top: StreamPosition { epoch: st.epoch.clone(), offset: st.top() },
                        }
                    }
                    Command::Presence { channel } => {
                        let links: Vec<LinkId> =
                            self.hub.subscribers.get(&channel).into_iter().flatten().copied().collect();
                        let clients = links
                            .into_iter()
                            .map(|l| ClientInfo { client: format!("c{l}"), user: String::new(), info: None })
                            .collect();
                        ReplyBody::Presence { clients }
                    }
                    _ => ReplyBody::PresenceStats { clients: 0, users: 0 },
                };
                self.server(link).reply(now, req, body);
            }
            ServerEvent::Refresh { req, token } => {
                if token == "bad" {
                    return self.server(link).reply_error(now, req, ErrorReply::new(ErrorCode::Unauthorized));
                }
                let ttl = self.hub.token_ttl.get(&token).copied();
                self.server(link).refresh_ok(now, req, ttl);
            }
            ServerEvent::Acked { channel, epoch, offset } => {
                let c = self.links[&link].client;
                let key = (self.clients[c].device.clone(), channel.clone());
                if let Some((e, o)) = self.hub.acks.get(&key) {
                    if *e == epoch && offset < *o {
                        self.hub.ack_regressions.push(format!("{key:?}: {o} -> {offset}"));
                    }
                }
                self.hub.acks.insert(key, (epoch, offset));
            }
            ServerEvent::Fetch { channel, epoch, from, limit } => {
                let st = self.hub.stream(&channel);
                if st.epoch != epoch || from < st.first {
                    return self.server(link).fetch_done(now, &channel, FetchEnd::Lost);
                }
                let start = (from - st.first) as usize;
                let batch: Vec<_> = st.pubs.iter().skip(start).take(limit).cloned().collect();
                for p in batch {
                    self.server(link).deliver(now, &p);
                }
                self.server(link).fetch_done(now, &channel, FetchEnd::Done);
            }
            ServerEvent::Closed { .. } => {
                for s in self.hub.subscribers.values_mut() {
                    s.remove(&link);
                }
            }
        }
    }

    fn fan_out(&mut self, p: &Arc<SharedPublication>) {
        let now = self.now;
        let ch = p.publication().channel.clone();
        let links: Vec<LinkId> = self.hub.subscribers.get(&ch).into_iter().flatten().copied().collect();
        for l in links {
            if let Some(s) = self.links.get_mut(&l).and_then(|l| l.server.as_mut()) {
                s.deliver(now, p);
            }
            self.drain_server(l);
        }
    }

    /// Server-side publish (a backend), bypassing any client.
    pub fn backend_publish(&mut self, ch: &str, id: &str, data: Vec<u8>) -> (String, u64) {
        let shared = self.hub.append(ch, id, Qos::AtLeastOnce, data, None);
        let pos = (shared.publication().epoch.clone(), shared.publication().offset);
        self.hub.dedup.insert(id.into(), (ch.into(), pos.0.clone(), pos.1));
        self.fan_out(&shared);
        pos
    }

    /// Wipe a stream's history and start a new epoch.
    pub fn reset_stream(&mut self, ch: &str) {
        self.hub.epoch_counter += 1;
        let epoch = format!("e{}", self.hub.epoch_counter);
        self.hub.streams.insert(ch.into(), Stream { epoch, first: 1, pubs: Vec::new() });
    }

    /// The stream loses its tail above `top`, keeping its epoch (Redis
    /// failed over to a replica that lacked it).
    pub fn lose_tail(&mut self, ch: &str, top: u64) {
        let st = self.hub.stream(ch);
        let keep = (top + 1).saturating_sub(st.first) as usize;
        st.pubs.truncate(keep);
    }

    /// Forget all but the newest `keep` publications of a stream.
    pub fn trim_stream(&mut self, ch: &str, keep: usize) {
        let st = self.hub.stream(ch);
        let drop = st.pubs.len().saturating_sub(keep);
        st.pubs.drain(..drop);
        st.first += drop as u64;
    }

    /// Redeliveries by all server sessions, past and present.
    pub fn redelivered_total(&self) -> u64 {
        self.redelivered_closed
            + self.links.values().filter_map(|l| l.server.as_ref()).map(|s| s.stats().redelivered).sum::<u64>()
    }

    /// Largest in-flight window among live server sessions.
    pub fn max_server_inflight(&self) -> usize {
        self.links.values().filter_map(|l| l.server.as_ref()).map(|s| s.inflight()).max().unwrap_or(0)
    }

    /// Seconds of virtual time elapsed since start.
    pub fn elapsed_ms(&self) -> u64 {
        self.now.as_millis() - 1_000
    }

    /// Human summary for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "seed={} t={}ms cuts={} lost={} dup={} faults={:?}",
            self.seed,
            self.elapsed_ms(),
            self.cuts,
            self.packets_lost,
            self.packets_duplicated,
            self.faults
        )
    }
}

impl Hub {
    pub fn stream(&mut self, ch: &str) -> &mut Stream {
        if !self.streams.contains_key(ch) {
            self.epoch_counter += 1;
            let epoch = format!("e{}", self.epoch_counter);
            self.streams.insert(ch.into(), Stream { epoch, first: 1, pubs: Vec::new() });
        }
        self.streams.get_mut(ch).unwrap()
    }

    fn append(
        &mut self,
        ch: &str,
        id: &str,
        qos: Qos,
        data: Vec<u8>,
        publisher: Option<ClientInfo>,
    ) -> Arc<SharedPublication> {
        let time_ms = self.clock_ms;
        self.stores += 1;
        let st = self.stream(ch);
        let offset = st.first + st.pubs.len() as u64;
        let p = SharedPublication::new(Publication {
            channel: ch.into(),
            epoch: st.epoch.clone(),
            offset,
            message_id: id.into(),
            qos,
            publisher,
            time_ms,
            payload: Payload { z: false, data: Bytes(data) },
        });
        st.pubs.push(p.clone());
        p
    }

    /// Message ids of a stream in offset order.
    pub fn ids(&self, ch: &str) -> Vec<String> {
        self.streams
            .get(ch)
            .map(|s| s.pubs.iter().map(|p| p.publication().message_id.clone()).collect())
            .unwrap_or_default()
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}
