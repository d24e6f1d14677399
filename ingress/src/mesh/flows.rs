//! The flows a node forwards for the routing mesh, in one bounded table (see
//! `docs/services.md`, "Flow tracking").
//!
//! A flow is keyed as its backend sees it: protocol, client address and port, backend address
//! and port. The ingress node's side of it (`front`: what the client sent to, and its
//! Ethernet addresses) and the backend node's side (`back`: the node the flow came in by)
//! may both be here, when the backend is local.
//!
//! An established TCP flow is never expired for being idle. A table that is full refuses new
//! flows and keeps the ones it has.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use shoal_vxlan::wire::Mac;

use super::frame::{tcp_flags, TCP};

/// How long flows that are not established TCP flows live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A TCP flow that has seen no answer from its backend yet.
    pub syn: Duration,
    /// A TCP flow after an RST, or after a FIN from each end.
    pub closing: Duration,
    /// A UDP flow, since its last packet.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            syn: Duration::from_secs(30),
            closing: Duration::from_secs(10),
            udp: Duration::from_secs(120),
        }
    }
}

/// The default bound on the table (about 100 bytes a flow).
pub const DEFAULT_MAX_FLOWS: usize = 262_144;

/// A flow, as its backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// TCP or UDP.
    pub proto: u8,
    /// The client's address and port.
    pub client: SocketAddrV4,
    /// The backend's address and port.
    pub backend: SocketAddrV4,
}

/// The ingress node's side of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Front {
    /// What the client connected to (this node's address, the published port).
    pub published: SocketAddrV4,
    /// The client's (or its router's) MAC, where replies go.
    pub client_mac: Mac,
    /// This node's MAC the client sent to, which replies come from.
    pub own_mac: Mac,
}

/// The backend node's side of a flow: the node it came in by, and that node's device MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Back {
    /// The ingress node's underlay address.
    pub via: IpAddr,
    /// Its device MAC on the network.
    pub via_mac: Mac,
}

/// Where a TCP flow is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing from the backend yet.
    Opening,
    /// Both ends have spoken.
    Open,
    /// An RST, or a FIN from each end, at this time.
    Closing(Instant),
}

/// One tracked flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Its network.
    pub vni: u32,
    /// Its ingress side, if this node is its ingress node.
    pub front: Option<Front>,
    /// Its backend side, if its backend is here and the flow came in by another node.
    pub back: Option<Back>,
    phase: Phase,
    fin_client: bool,
    fin_backend: bool,
    last_seen: Instant,
}

impl Flow {
    /// A new flow of network `vni`, seen now.
    pub fn new(vni: u32, now: Instant) -> Self {
        Flow {
            vni,
            front: None,
            back: None,
            phase: Phase::Opening,
            fin_client: false,
            fin_backend: false,
            last_seen: now,
        }
    }

    /// Whether the flow has gone past its time at `now`.
    fn expired(&self, proto: u8, now: Instant, t: &Timeouts) -> bool {
        let since = |at: Instant| now.saturating_duration_since(at);
        if proto != TCP {
            return since(self.last_seen) > t.udp;
        }
        match self.phase {
            Phase::Opening => since(self.last_seen) > t.syn,
            Phase::Open => false,
            Phase::Closing(at) => since(at) > t.closing,
        }
    }

    /// Whether both ends have spoken and the flow is not closing (TCP).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }
}

/// Why a flow was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

/// The table. See the module documentation.
#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<FlowKey, Flow>,
    /// Ingress side: (protocol, client, published) to the backend, for the client's packets.
    fronts: HashMap<(u8, SocketAddrV4, SocketAddrV4), SocketAddrV4>,
    max: usize,
    timeouts: Timeouts,
    last_sweep: Option<Instant>,
}

/// How often the table looks for expired flows (when it is used, and when it is full).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl FlowTable {
    /// An empty table of at most `max` flows.
    pub fn new(max: usize, timeouts: Timeouts) -> Self {
        FlowTable {
            flows: HashMap::new(),
            fronts: HashMap::new(),
            max,
            timeouts,
            last_sweep: None,
        }
    }

    /// Changes the bound and the timeouts (flows above a lowered bound stay until they end).
    pub fn set_limits(&mut self, max: usize, timeouts: Timeouts) {
        self.max = max;
        self.timeouts = timeouts;
    }

    /// How many flows are tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The flow of `key`.
    pub fn get(&self, key: &FlowKey) -> Option<&Flow> {
        self.flows.get(key)
    }

    /// The backend of the client's flow to `published` that this node is the ingress of.
    pub fn front_backend(
        &self,
        proto: u8,
        client: SocketAddrV4,
        published: SocketAddrV4,
    ) -> Option<SocketAddrV4> {
        self.fronts.get(&(proto, client, published)).copied()
    }

    /// The flow of `key`, added (as `make` makes it) if there is none and there is room;
    /// [`TableFull`] otherwise. Expired flows are swept first, at most every second.
    pub fn entry(
        &mut self,
        now: Instant,
        key: FlowKey,
        make: impl FnOnce() -> Flow,
    ) -> Result<&mut Flow, TableFull> {
        self.sweep(now, false);
        if !self.flows.contains_key(&key) {
            if self.flows.len() >= self.max {
                self.sweep(now, true);
                if self.flows.len() >= self.max {
                    return Err(TableFull);
                }
            }
            self.flows.insert(key, make());
        }
        self.flows.get_mut(&key).ok_or(TableFull)
    }

    /// Records the flow's ingress side (and indexes it for the client's packets).
    pub fn set_front(&mut self, key: &FlowKey, front: Front) {
        if let Some(f) = self.flows.get_mut(key) {
            if let Some(old) = f.front.replace(front) {
                self.fronts.remove(&(key.proto, key.client, old.published));
            }
            self.fronts
                .insert((key.proto, key.client, front.published), key.backend);
        }
    }

    /// Notes a packet of the flow, from its client or from its backend, with its TCP flags.
    pub fn observe(&mut self, now: Instant, key: &FlowKey, from_client: bool, flags: u8) {
        let Some(f) = self.flows.get_mut(key) else {
            return;
        };
        f.last_seen = now;
        if key.proto != TCP {
            f.phase = Phase::Open;
            return;
        }
        if flags & tcp_flags::RST != 0 {
            f.phase = Phase::Closing(now);
            return;
        }
        if from_client && flags & tcp_flags::SYN != 0 && flags & tcp_flags::ACK == 0 {
            // A new connection on the same ports (after the last closed): start over, keeping
            // where the flow goes.
            if matches!(f.phase, Phase::Closing(_)) {
                f.phase = Phase::Opening;
                f.fin_client = false;
                f.fin_backend = false;
            }
            return;
        }
        if flags & tcp_flags::FIN != 0 {
            if from_client {
                f.fin_client = true;
            } else {
                f.fin_backend = true;
            }
        }
        if f.fin_client && f.fin_backend {
            if !matches!(f.phase, Phase::Closing(_)) {
                f.phase = Phase::Closing(now);
            }
        } else if !from_client && f.phase == Phase::Opening {
            f.phase = Phase::Open;
        }
    }

    /// Drops expired flows: now if `force`, else if a second has passed since the last look.
    pub fn sweep(&mut self, now: Instant, force: bool) {
        if !force
            && self
                .last_sweep
                .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        let t = self.timeouts;
        self.retain(|k, f| !f.expired(k.proto, now, &t));
    }

    /// Keeps only the flows `keep` says to (service or backend gone, for example).
    pub fn retain(&mut self, mut keep: impl FnMut(&FlowKey, &Flow) -> bool) {
        let fronts = &mut self.fronts;
        self.flows.retain(|k, f| {
            let kept = keep(k, f);
            if !kept {
                if let Some(front) = f.front {
                    fronts.remove(&(k.proto, k.client, front.published));
                }
            }
            kept
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::frame::UDP;

    fn key(proto: u8, port: u16) -> FlowKey {
        FlowKey {
            proto,
            client: SocketAddrV4::new([198, 18, 9, 9].into(), port),
            backend: SocketAddrV4::new([10, 0, 1, 5].into(), 80),
        }
    }

    fn table(max: usize) -> FlowTable {
        FlowTable::new(
            max,
            Timeouts {
                syn: Duration::from_secs(2),
                closing: Duration::from_secs(1),
                udp: Duration::from_secs(3),
            },
        )
    }

    fn open(t: &mut FlowTable, now: Instant, k: FlowKey) {
        t.entry(now, k, || Flow::new(7, now)).unwrap();
        t.observe(now, &k, true, tcp_flags::SYN);
        t.observe(now, &k, false, tcp_flags::SYN | tcp_flags::ACK);
        t.observe(now, &k, true, tcp_flags::ACK);
    }

    #[test]
    fn an_established_tcp_flow_is_never_expired_for_being_idle() {
        let t0 = Instant::now();
        let mut t = table(10);
        let k = key(TCP, 1000);
        open(&mut t, t0, k);
        assert!(t.get(&k).unwrap().is_open());
        // A day idle, far past every timeout.
        t.sweep(t0 + Duration::from_secs(86_400), true);
        assert!(t.get(&k).is_some());
    }

    #[test]
    fn half_open_closing_and_udp_flows_expire() {
        let t0 = Instant::now();
        let mut t = table(10);
        let syn = key(TCP, 1);
        t.entry(t0, syn, || Flow::new(7, t0)).unwrap();
        t.observe(t0, &syn, true, tcp_flags::SYN);
        let rst = key(TCP, 2);
        open(&mut t, t0, rst);
        t.observe(t0, &rst, false, tcp_flags::RST);
        let fins = key(TCP, 3);
        open(&mut t, t0, fins);
        t.observe(t0, &fins, true, tcp_flags::FIN | tcp_flags::ACK);
        t.observe(t0, &fins, false, tcp_flags::FIN | tcp_flags::ACK);
        let one_fin = key(TCP, 4);
        open(&mut t, t0, one_fin);
        t.observe(t0, &one_fin, true, tcp_flags::FIN | tcp_flags::ACK);
        let udp = key(UDP, 5);
        t.entry(t0, udp, || Flow::new(7, t0)).unwrap();
        t.observe(t0, &udp, true, 0);

        t.sweep(t0 + Duration::from_millis(1500), true);
        assert!(t.get(&rst).is_none() && t.get(&fins).is_none());
        assert!(t.get(&syn).is_some() && t.get(&udp).is_some());
        t.sweep(t0 + Duration::from_millis(2500), true);
        assert!(t.get(&syn).is_none() && t.get(&udp).is_some());
        t.sweep(t0 + Duration::from_millis(3500), true);
        assert!(t.get(&udp).is_none());
        // Half closed: still open at one end, so kept.
        assert!(t.get(&one_fin).is_some());
    }

    #[test]
    fn a_full_table_refuses_new_flows_and_keeps_the_old() {
        let t0 = Instant::now();
        let mut t = table(2);
        open(&mut t, t0, key(TCP, 1));
        open(&mut t, t0, key(TCP, 2));
        assert_eq!(
            t.entry(t0, key(TCP, 3), || Flow::new(7, t0)).err(),
            Some(TableFull)
        );
        assert!(t.get(&key(TCP, 1)).is_some() && t.get(&key(TCP, 2)).is_some());
        // An expired flow makes room.
        t.observe(t0, &key(TCP, 1), true, tcp_flags::RST);
        let later = t0 + Duration::from_secs(5);
        assert!(t.entry(later, key(TCP, 3), || Flow::new(7, later)).is_ok());
    }

    #[test]
    fn fronts_are_indexed_and_dropped_with_their_flow() {
        let t0 = Instant::now();
        let mut t = table(10);
        let k = key(TCP, 9);
        open(&mut t, t0, k);
        let published = SocketAddrV4::new([198, 18, 0, 1].into(), 8080);
        t.set_front(
            &k,
            Front {
                published,
                client_mac: Mac([2, 0, 0, 0, 0, 1]),
                own_mac: Mac([2, 0, 0, 0, 0, 2]),
            },
        );
        assert_eq!(t.front_backend(TCP, k.client, published), Some(k.backend));
        t.retain(|_, _| false);
        assert_eq!(t.front_backend(TCP, k.client, published), None);
        assert!(t.is_empty());
    }

    #[test]
    fn a_new_syn_after_close_starts_the_flow_over() {
        let t0 = Instant::now();
        let mut t = table(10);
        let k = key(TCP, 11);
        open(&mut t, t0, k);
        t.observe(t0, &k, true, tcp_flags::RST);
        t.observe(t0, &k, true, tcp_flags::SYN);
        t.sweep(t0 + Duration::from_millis(1500), true);
        assert!(t.get(&k).is_some(), "a fresh SYN is not closing");
    }
}
