//! Two threads around one engine: device to underlay, and underlay to device.
//!
//! Outbound, one read from the TAP device may be a 64 KiB TCP segment: it is cut into
//! MTU-sized frames ([`offload::segment`]), each sealed by the engine, and the datagrams for
//! one destination leave in one `sendmsg` with UDP GSO. Inbound, one `recvmmsg` brings a batch
//! of GRO-coalesced datagrams; each is opened in place and the frames are merged back into
//! large TCP segments ([`offload::Coalescer`]) for few writes to the device.
//!
//! One socket carries every network: each network with a local device (a TAP) has its own
//! outbound thread reading that device ([`Dataplane::add_device`]); the one inbound thread
//! writes each opened frame to the device of the frame's network (its VNI), or counts it
//! (`no_device`) when this node has none.
//!
//! Each direction has its own engine, configured identically (same peers, forwarding entries
//! and keys): the outbound one only seals (its counters advance), the inbound one only opens
//! (its replay windows advance). So the two threads never wait for each other; each engine
//! sits behind its own mutex, taken per packet, so the control plane can change both through
//! [`Dataplane::configure`] between packets. The threads wake at least every [`POLL`] to
//! notice a stop.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, UdpSocketState};

use super::capture::{CaptureRecord, CaptureSink, Direction, Layer};
use super::hook::{FrameHook, Steer};
use super::tap::Tap;
use crate::buffer::{Packet, Transmit, Transmits};
use crate::engine::{DropReason, Engine};
use crate::offload::{self, Coalescer, VirtioNetHdr};
use crate::wire::Vni;

/// How long a blocked read waits before the thread checks whether it should stop.
pub const POLL: Duration = Duration::from_millis(100);

/// Largest read from the device: a virtio header and a 64 KiB frame.
const TAP_READ: usize = VirtioNetHdr::LEN + 65_535;
/// Largest frame after segmentation (jumbo overlays included).
const MAX_FRAME: usize = 9_216;
/// Largest UDP payload of one GSO send or GRO receive.
const MAX_UDP: usize = 65_535;
/// Receive buffers per `recvmmsg`.
const RECV_BATCH: usize = 8;

/// Answers some frames from the device locally, instead of sending them (ARP for known
/// addresses, for example).
pub trait LocalResponder: Send + Sync {
    /// Called with each (whole, unsegmented) frame read from the device before the engine sees
    /// it. To answer it, write the reply frame into `reply` and return `true`: the reply goes
    /// back to the device and the frame goes no further.
    fn respond(&self, frame: &[u8], reply: &mut Vec<u8>) -> bool;
}

/// Counters of the IO shell (the engine counts the rest).
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Reads from the device that failed (other than time-outs).
    pub tap_read_errors: AtomicU64,
    /// Frames from the device that could not be segmented.
    pub tap_bad_frames: AtomicU64,
    /// Writes to the device that failed.
    pub tap_write_errors: AtomicU64,
    /// Sends on the socket that failed.
    pub udp_send_errors: AtomicU64,
    /// Receives on the socket that failed (other than time-outs).
    pub udp_recv_errors: AtomicU64,
    /// Frames answered locally.
    pub answered_locally: AtomicU64,
    /// Opened frames of a network that has no device on this node.
    pub no_device: AtomicU64,
    /// Frames the hook sent somewhere this direction cannot send them.
    pub hook_misdirected: AtomicU64,
}

struct Shared {
    outbound: Mutex<Engine>,
    inbound: Mutex<Engine>,
    stop: AtomicBool,
    counters: IoCounters,
    /// Bumped whenever `capture` changes, so the threads re-read it only then.
    capture_generation: AtomicU64,
    capture: Mutex<Option<Arc<dyn CaptureSink>>>,
    /// Bumped whenever `devices` changes, so the inbound thread re-reads it only then.
    devices_generation: AtomicU64,
    devices: Mutex<HashMap<Vni, Arc<Tap>>>,
    /// Bumped whenever `mesh` changes, so the threads re-read it only then.
    mesh_generation: AtomicU64,
    mesh: Mutex<Option<Mesh>>,
}

/// The frame hook and the device its [`Steer::Outside`] frames go to.
#[derive(Clone)]
struct Mesh {
    hook: Arc<dyn FrameHook>,
    outside: Arc<Tap>,
}

/// One thread's copy of the mesh (as [`SinkCache`] for the capture sink).
struct MeshCache {
    generation: u64,
    mesh: Option<Mesh>,
}

impl MeshCache {
    fn new() -> Self {
        MeshCache {
            generation: 0,
            mesh: None,
        }
    }

    fn get(&mut self, shared: &Shared) -> Option<&Mesh> {
        let generation = shared.mesh_generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.mesh = shared
                .mesh
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            self.generation = generation;
        }
        self.mesh.as_ref()
    }
}

/// The device of network `vni`, if this node has one (for frames the hook steers; not per
/// packet of ordinary traffic).
fn device_of(shared: &Shared, vni: Vni) -> Option<Arc<Tap>> {
    shared
        .devices
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&vni)
        .cloned()
}

/// Writes one whole frame (checksums complete, no offload) to `tap`, through `scratch`.
fn write_frame(tap: &Tap, counters: &IoCounters, scratch: &mut Vec<u8>, frame: &[u8]) {
    scratch.clear();
    scratch.resize(VirtioNetHdr::LEN, 0);
    scratch.extend_from_slice(frame);
    write_to(tap, counters, scratch);
}

/// One thread's copy of the capture sink: per batch it costs one atomic load (no lock, no
/// shared reference count), and a lock only after [`Dataplane::set_capture`].
struct SinkCache {
    generation: u64,
    sink: Option<Arc<dyn CaptureSink>>,
}

impl SinkCache {
    fn new() -> Self {
        SinkCache {
            generation: 0,
            sink: None,
        }
    }

    fn get(&mut self, shared: &Shared) -> Option<&Arc<dyn CaptureSink>> {
        let generation = shared.capture_generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.sink = shared
                .capture
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            self.generation = generation;
        }
        self.sink.as_ref()
    }
}

/// One device's outbound thread.
struct DeviceThread {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The running data path: a UDP socket, the engines, and a TAP device per network with local
/// endpoints.
pub struct Dataplane {
    shared: Arc<Shared>,
    udp: Arc<UdpSocket>,
    state: Arc<UdpSocketState>,
    inbound: Option<JoinHandle<()>>,
    devices: HashMap<Vni, DeviceThread>,
    mesh: Option<DeviceThread>,
}

impl core::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Dataplane").finish_non_exhaustive()
    }
}

fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    // A panic in one thread must not take the data path down with poisoned-lock panics in the
    // other: the engine's state is consistent between calls.
    engine.lock().unwrap_or_else(|p| p.into_inner())
}

impl Dataplane {
    /// Starts the data path with its engines (built from the same key and incarnation, and
    /// configured alike) and its first device: frames read from `tap` go out on network
    /// `vni`, and frames of `vni` are written to it.
    pub fn start(
        outbound: Engine,
        inbound: Engine,
        vni: Vni,
        tap: Tap,
        udp: UdpSocket,
        responder: Option<Arc<dyn LocalResponder>>,
    ) -> io::Result<Dataplane> {
        // Non-blocking, with poll(2) for waiting: recvmmsg on a blocking socket would wait
        // for a whole batch.
        udp.set_nonblocking(true)?;
        let state = Arc::new(UdpSocketState::new((&udp).into())?);
        let shared = Arc::new(Shared {
            outbound: Mutex::new(outbound),
            inbound: Mutex::new(inbound),
            stop: AtomicBool::new(false),
            counters: IoCounters::default(),
            capture_generation: AtomicU64::new(0),
            capture: Mutex::new(None),
            devices_generation: AtomicU64::new(0),
            devices: Mutex::new(HashMap::new()),
            mesh_generation: AtomicU64::new(0),
            mesh: Mutex::new(None),
        });
        let udp = Arc::new(udp);
        let inbound = {
            let (shared, udp, state) = (Arc::clone(&shared), Arc::clone(&udp), Arc::clone(&state));
            std::thread::Builder::new()
                .name("shoal-dp-in".into())
                .spawn(move || receive(&shared, &udp, &state))?
        };
        let mut dataplane = Dataplane {
            shared,
            udp,
            state,
            inbound: Some(inbound),
            devices: HashMap::new(),
            mesh: None,
        };
        dataplane.add_device(vni, tap, responder)?;
        Ok(dataplane)
    }

    /// Gives network `vni` a device on this node: frames read from `tap` go out on `vni`
    /// (after `responder`, if any, had its say), and opened frames of `vni` are written to
    /// it. The engines must know the network ([`Engine::add_network`]). A device already there
    /// for `vni` is replaced.
    pub fn add_device(
        &mut self,
        vni: Vni,
        tap: Tap,
        responder: Option<Arc<dyn LocalResponder>>,
    ) -> io::Result<()> {
        self.remove_device(vni);
        let tap = Arc::new(tap);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, tap, udp, state, stop) = (
                Arc::clone(&self.shared),
                Arc::clone(&tap),
                Arc::clone(&self.udp),
                Arc::clone(&self.state),
                Arc::clone(&stop),
            );
            std::thread::Builder::new()
                .name(format!("shoal-dp-out-{}", vni.get()))
                .spawn(move || {
                    Outbound::new(&shared, vni, &udp, &state, &stop).run(&tap, responder.as_deref())
                })?
        };
        self.devices.insert(vni, DeviceThread { stop, thread });
        self.set_devices(|d| {
            d.insert(vni, tap);
        });
        Ok(())
    }

    /// Takes network `vni`'s device away: its thread stops and the interface is gone when this
    /// returns (within about [`POLL`]); whether there was one.
    pub fn remove_device(&mut self, vni: Vni) -> bool {
        let Some(device) = self.devices.remove(&vni) else {
            return false;
        };
        let mut tap = None;
        self.set_devices(|d| {
            tap = d.remove(&vni);
        });
        device.stop.store(true, Ordering::Relaxed);
        let _ = device.thread.join();
        // The interface goes when the last handle on it closes: wait (bounded) for the inbound
        // thread to let go of its copy, so a device of the same name can be made at once.
        if let Some(tap) = tap {
            let deadline = Instant::now() + 4 * POLL;
            while Arc::strong_count(&tap) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        true
    }

    /// Installs the frame hook and its device (`outside`): from the next batch on, every
    /// thread offers the hook the frames it claims, and a thread reads `outside` and hands
    /// its frames to the hook. `None` takes them away (the device goes within about
    /// [`POLL`]).
    pub fn set_mesh(&mut self, mesh: Option<(Arc<dyn FrameHook>, Tap)>) -> io::Result<()> {
        if let Some(old) = self.mesh.take() {
            old.stop.store(true, Ordering::Relaxed);
            let _ = old.thread.join();
        }
        let mesh = mesh.map(|(hook, tap)| Mesh {
            hook,
            outside: Arc::new(tap),
        });
        if let Some(m) = &mesh {
            let stop = Arc::new(AtomicBool::new(false));
            let (shared, udp, state, stop2, m) = (
                Arc::clone(&self.shared),
                Arc::clone(&self.udp),
                Arc::clone(&self.state),
                Arc::clone(&stop),
                m.clone(),
            );
            let thread = std::thread::Builder::new()
                .name("shoal-dp-mesh".into())
                .spawn(move || {
                    // The VNI is per frame here; the one given is not used.
                    let vni = Vni::new(0).unwrap_or_else(|_| unreachable!("0 is a VNI"));
                    Outbound::new(&shared, vni, &udp, &state, &stop2).run_outside(&m)
                })?;
            self.mesh = Some(DeviceThread { stop, thread });
        }
        *self
            .shared
            .mesh
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = mesh;
        self.shared.mesh_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn set_devices(&self, f: impl FnOnce(&mut HashMap<Vni, Arc<Tap>>)) {
        f(&mut self
            .shared
            .devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
        self.shared
            .devices_generation
            .fetch_add(1, Ordering::Release);
    }

    /// Applies the same change to both engines (peers, forwarding entries, keys), between
    /// packets. Both are configured alike, so they accept or refuse alike: a refusal by the
    /// first is returned before the second is touched.
    pub fn configure<E>(&self, mut f: impl FnMut(&mut Engine) -> Result<(), E>) -> Result<(), E> {
        f(&mut lock(&self.shared.outbound))?;
        f(&mut lock(&self.shared.inbound))
    }

    /// Reads the two engines (outbound, inbound): counters, keys.
    pub fn read<R>(&self, f: impl FnOnce(&Engine, &Engine) -> R) -> R {
        let out = lock(&self.shared.outbound);
        let inb = lock(&self.shared.inbound);
        f(&out, &inb)
    }

    /// The IO shell's counters.
    pub fn io_counters(&self) -> &IoCounters {
        &self.shared.counters
    }

    /// Installs (or, with `None`, removes) the sink offered a copy of every packet from the
    /// next batch on. See [`super::capture`].
    pub fn set_capture(&self, sink: Option<Arc<dyn CaptureSink>>) {
        let mut slot = self
            .shared
            .capture
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = sink;
        self.shared
            .capture_generation
            .fetch_add(1, Ordering::Release);
    }

    /// Stops the threads and waits for them (at most about [`POLL`]); the device goes away
    /// with them.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for (_, d) in self.devices.drain() {
            let _ = d.thread.join();
        }
        if let Some(m) = self.mesh.take() {
            let _ = m.thread.join();
        }
        if let Some(t) = self.inbound.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One read from `tap` into `buf`: the virtio header and the length read, or `None` for a
/// time-out ([`POLL`]), a failed read (counted, then a pause) or a malformed one (counted).
fn read_device(tap: &Tap, buf: &mut [u8], counters: &IoCounters) -> Option<(VirtioNetHdr, usize)> {
    let n = match tap.recv_timeout(buf, POLL) {
        Ok(n) => n,
        Err(e) if is_timeout(&e) => return None,
        Err(_) => {
            counters.tap_read_errors.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(POLL);
            return None;
        }
    };
    match VirtioNetHdr::parse(&buf[..n]) {
        Some(hdr) => Some((hdr, n)),
        None => {
            counters.tap_bad_frames.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The device-to-underlay direction.
struct Outbound<'a> {
    shared: &'a Shared,
    stop: &'a AtomicBool,
    vni: Vni,
    udp: &'a UdpSocket,
    state: &'a UdpSocketState,
    pkt: Packet,
    out: Transmits,
    gso: Vec<u8>,
}

impl<'a> Outbound<'a> {
    fn new(
        shared: &'a Shared,
        vni: Vni,
        udp: &'a UdpSocket,
        state: &'a UdpSocketState,
        stop: &'a AtomicBool,
    ) -> Self {
        Outbound {
            shared,
            stop,
            vni,
            udp,
            state,
            pkt: Packet::new(MAX_FRAME),
            out: Transmits::new(MAX_FRAME),
            gso: Vec::with_capacity(MAX_UDP),
        }
    }

    fn run(mut self, tap: &Tap, responder: Option<&dyn LocalResponder>) {
        let mut read = vec![0u8; TAP_READ];
        let mut reply = vec![0u8; VirtioNetHdr::LEN];
        let mut answer = Vec::with_capacity(128);
        let mut copy = Vec::new();
        let mut sinks = SinkCache::new();
        let mut meshes = MeshCache::new();
        let (mut hook_reply, mut scratch) = (Vec::new(), Vec::new());
        let shared = self.shared;
        let counters = &self.shared.counters;
        while !self.shared.stop.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            let Some((hdr, n)) = read_device(tap, &mut read, counters) else {
                continue;
            };
            let frame = &mut read[VirtioNetHdr::LEN..n];
            let sink = sinks.get(self.shared);
            let mesh = meshes.get(self.shared);
            if let Some(r) = responder.filter(|_| hdr.gso_type == VirtioNetHdr::GSO_NONE) {
                reply.truncate(VirtioNetHdr::LEN);
                answer.clear();
                if r.respond(frame, &mut answer) {
                    counters.answered_locally.fetch_add(1, Ordering::Relaxed);
                    if let Some(sink) = sink {
                        offer_local(&**sink, self.vni, frame, &answer);
                    }
                    reply[..VirtioNetHdr::LEN].fill(0);
                    reply.extend_from_slice(&answer);
                    if tap.send(&reply).is_err() {
                        counters.tap_write_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
            }
            let (pkt, out, vni) = (&mut self.pkt, &mut self.out, self.vni);
            let engine = &self.shared.outbound;
            let now = Instant::now();
            let (inner, outer) = wanted(sink, Direction::Out);
            let segmented = offload::segment(&hdr, frame, |head, payload| {
                if !pkt.set_frame_parts(head, payload) {
                    return;
                }
                let mut to = None;
                if let Some(m) = mesh.filter(|m| m.hook.claims_from_device(pkt.data())) {
                    match m.hook.on_device(now, vni, pkt.data_mut(), &mut hook_reply) {
                        Steer::Pass => {}
                        Steer::Peer { vni, vtep } => to = Some((vni, vtep)),
                        other => {
                            let frame = match other {
                                Steer::Reply => &hook_reply[..],
                                _ => pkt.data(),
                            };
                            steer_locally(shared, m, tap, other, frame, &mut scratch);
                            return;
                        }
                    }
                }
                if inner.is_some() {
                    // Sealing happens in place: keep the clear frame for the capture.
                    copy.clear();
                    copy.extend_from_slice(pkt.data());
                }
                let before = out.len();
                // Drops are counted by the engine.
                let result = match to {
                    None => lock(engine).handle_frame(now, vni, pkt, out),
                    Some((vni, vtep)) => lock(engine).handle_frame_to(now, vni, vtep, pkt, out),
                };
                let sent = out.ready().get(before..).unwrap_or_default();
                if let Some(sink) = inner {
                    sink.offer(&CaptureRecord {
                        direction: Direction::Out,
                        layer: Layer::Inner,
                        peer: match sent {
                            [one] => Some(one.dst),
                            _ => None,
                        },
                        fanout: sent.len(),
                        dropped: result.err(),
                        vni: Some(vni),
                        data: &copy,
                    });
                }
                if let Some(sink) = outer {
                    for t in sent {
                        sink.offer(&CaptureRecord {
                            direction: Direction::Out,
                            layer: Layer::Outer,
                            peer: Some(t.dst),
                            fanout: 1,
                            dropped: None,
                            vni: Some(vni),
                            data: t.packet.data(),
                        });
                    }
                }
            });
            if segmented.is_err() {
                counters.tap_bad_frames.fetch_add(1, Ordering::Relaxed);
            }
            self.send();
        }
    }

    /// The mesh device's thread: each frame from a client outside goes where the hook says.
    /// The device has offloads, so one read may be a 64 KiB TCP segment: the hook rewrites its
    /// headers once, then it is cut into MTU-sized frames and sealed to the backend's node
    /// (or written whole, virtio header and all, to the backend's local network device).
    fn run_outside(mut self, mesh: &Mesh) {
        let mut read = vec![0u8; TAP_READ];
        let mut scratch = Vec::new();
        let shared = self.shared;
        let counters = &shared.counters;
        while !shared.stop.load(Ordering::Relaxed) && !self.stop.load(Ordering::Relaxed) {
            let Some((hdr, n)) = read_device(&mesh.outside, &mut read, counters) else {
                continue;
            };
            let now = Instant::now();
            let partial = hdr.flags & VirtioNetHdr::F_NEEDS_CSUM != 0;
            let steer = mesh
                .hook
                .on_outside(now, &mut read[VirtioNetHdr::LEN..n], partial);
            match steer {
                Steer::Peer { vni, vtep } => {
                    let (pkt, out) = (&mut self.pkt, &mut self.out);
                    let segmented =
                        offload::segment(&hdr, &mut read[VirtioNetHdr::LEN..n], |head, payload| {
                            if pkt.set_frame_parts(head, payload) {
                                // Drops are counted by the engine.
                                let _ = lock(&shared.outbound)
                                    .handle_frame_to(now, vni, vtep, pkt, out);
                            }
                        });
                    if segmented.is_err() {
                        counters.tap_bad_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    self.send();
                }
                // As read, offloads and all: the network's device takes them too.
                Steer::Device(vni) => match device_of(shared, vni) {
                    Some(tap) => write_to(&tap, counters, &read[..n]),
                    None => {
                        counters.no_device.fetch_add(1, Ordering::Relaxed);
                    }
                },
                other => {
                    let tap = Arc::clone(&mesh.outside);
                    let frame = &read[VirtioNetHdr::LEN..n];
                    steer_locally(shared, mesh, &tap, other, frame, &mut scratch);
                }
            }
        }
    }

    /// Sends the queued datagrams: runs of equal-sized datagrams to one destination go in one
    /// GSO send (the last of a run may be shorter), the rest one by one.
    fn send(&mut self) {
        let max_segments = self.state.max_gso_segments();
        let ready = self.out.ready();
        let mut i = 0;
        while i < ready.len() {
            let first: &Transmit = &ready[i];
            let size = first.packet.len();
            let mut j = i + 1;
            while j < ready.len()
                && j - i < max_segments
                && ready[j].dst == first.dst
                && ready[j - 1].packet.len() == size
                && ready[j].packet.len() <= size
                && (j - i + 1) * size <= MAX_UDP
            {
                j += 1;
            }
            let result = if j - i == 1 {
                self.transmit(first.dst, first.packet.data(), None)
            } else {
                self.gso.clear();
                for t in &ready[i..j] {
                    self.gso.extend_from_slice(t.packet.data());
                }
                let contents = core::mem::take(&mut self.gso);
                let r = self.transmit(first.dst, &contents, Some(size));
                self.gso = contents;
                r
            };
            if result.is_err() {
                self.shared
                    .counters
                    .udp_send_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
            i = j;
        }
        self.out.clear();
    }

    fn transmit(
        &self,
        dst: std::net::SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let t = quinn_udp::Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        // A full socket buffer: wait for room (backpressure), a bounded number of times.
        for _ in 0..10 {
            match self.state.try_send(self.udp.into(), &t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(self.udp, libc::POLLOUT, POLL)?;
                }
                other => return other,
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// The inbound thread's copy of the devices, each with its coalescer: re-read only after
/// [`Dataplane::add_device`] or [`Dataplane::remove_device`] (one atomic load per batch).
struct Devices {
    generation: u64,
    by_vni: HashMap<Vni, (Arc<Tap>, Coalescer)>,
}

impl Devices {
    fn refresh(&mut self, shared: &Shared) {
        let generation = shared.devices_generation.load(Ordering::Acquire);
        if generation == self.generation {
            return;
        }
        let now = shared
            .devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        self.by_vni.retain(|vni, _| now.contains_key(vni));
        for (vni, tap) in now {
            match self.by_vni.get_mut(&vni) {
                Some((held, _)) if Arc::ptr_eq(held, &tap) => {}
                _ => {
                    self.by_vni.insert(vni, (tap, Coalescer::new()));
                }
            }
        }
        self.generation = generation;
    }
}

/// Writes `frame` to the device of its network through that device's coalescer, or counts it.
fn deliver(devices: &mut Devices, counters: &IoCounters, vni: Vni, frame: &[u8]) {
    match devices.by_vni.get_mut(&vni) {
        Some((tap, coalescer)) => coalescer.push(frame, &mut |b: &[u8]| write_to(tap, counters, b)),
        None => {
            counters.no_device.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn write_to(tap: &Tap, counters: &IoCounters, b: &[u8]) {
    if tap.send(b).is_err() {
        counters.tap_write_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Carries out a hook's [`Steer`] that stays on this node: `frame` to the device it came
/// from (`back`), to a network's device, or out through the mesh device. A `Peer` here is
/// one this direction cannot send, and is counted.
fn steer_locally(
    shared: &Shared,
    mesh: &Mesh,
    back: &Tap,
    steer: Steer,
    frame: &[u8],
    scratch: &mut Vec<u8>,
) {
    let counters = &shared.counters;
    match steer {
        Steer::Pass | Steer::Drop => {}
        Steer::Reply => write_frame(back, counters, scratch, frame),
        Steer::Outside => write_frame(&mesh.outside, counters, scratch, frame),
        Steer::Device(vni) => match device_of(shared, vni) {
            Some(tap) => write_frame(&tap, counters, scratch, frame),
            None => {
                counters.no_device.fetch_add(1, Ordering::Relaxed);
            }
        },
        Steer::Peer { .. } => {
            counters.hook_misdirected.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The underlay-to-device direction.
fn receive(shared: &Shared, udp: &UdpSocket, state: &UdpSocketState) {
    // One allocation, at start: RECV_BATCH receive buffers side by side.
    let mut bufs = vec![0u8; MAX_UDP * RECV_BATCH];
    let mut meta = [RecvMeta::default(); RECV_BATCH];
    let mut devices = Devices {
        generation: u64::MAX,
        by_vni: HashMap::new(),
    };
    let mut copy = Vec::new();
    let mut sinks = SinkCache::new();
    let mut meshes = MeshCache::new();
    let (mut claimed, mut scratch) = (Vec::new(), Vec::new());
    let counters = &shared.counters;
    while !shared.stop.load(Ordering::Relaxed) {
        devices.refresh(shared);
        if wait(udp, libc::POLLIN, POLL).is_err() {
            counters.udp_recv_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let n = {
            let mut chunks = bufs.chunks_mut(MAX_UDP);
            let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
            match state.recv(udp.into(), &mut slices, &mut meta) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => continue,
                Err(_) => {
                    counters.udp_recv_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        };
        let now = Instant::now();
        let (inner, outer) = wanted(sinks.get(shared), Direction::In);
        let mesh = meshes.get(shared);
        for (m, buf) in meta.iter().zip(bufs.chunks_mut(MAX_UDP)).take(n) {
            if m.len == 0 {
                // An empty datagram: nothing to split, but still a drop to count.
                let r = lock(&shared.inbound).handle_datagram_slice(now, m.addr, &mut []);
                if let Some(sink) = outer {
                    offer_received(&**sink, m.addr, &[], r.err());
                }
                continue;
            }
            let stride = m.stride.max(1);
            for datagram in buf[..m.len].chunks_mut(stride) {
                if outer.is_some() {
                    // Opening happens in place: keep the datagram as it came.
                    copy.clear();
                    copy.extend_from_slice(datagram);
                }
                let opened = lock(&shared.inbound).handle_datagram_slice(now, m.addr, datagram);
                if let Some(sink) = outer {
                    offer_received(&**sink, m.addr, &copy, opened.as_ref().err().copied());
                }
                if let Ok(opened) = opened {
                    if let Some(sink) = inner {
                        sink.offer(&CaptureRecord {
                            direction: Direction::In,
                            layer: Layer::Inner,
                            peer: Some(m.addr),
                            fanout: 1,
                            dropped: None,
                            vni: Some(opened.vni()),
                            data: opened.frame(),
                        });
                    }
                    match mesh.filter(|mh| mh.hook.claims_from_peer(opened.frame())) {
                        None => deliver(&mut devices, counters, opened.vni(), opened.frame()),
                        Some(mh) => {
                            claimed.clear();
                            claimed.extend_from_slice(opened.frame());
                            let vni = opened.vni();
                            match mh.hook.on_peer(now, vni, m.addr.ip(), &mut claimed) {
                                Steer::Pass => deliver(&mut devices, counters, vni, &claimed),
                                Steer::Device(v) => deliver(&mut devices, counters, v, &claimed),
                                other => {
                                    let back = Arc::clone(&mh.outside);
                                    steer_locally(shared, mh, &back, other, &claimed, &mut scratch);
                                }
                            }
                        }
                    }
                }
            }
        }
        for (tap, coalescer) in devices.by_vni.values_mut() {
            coalescer.flush(&mut |b: &[u8]| write_to(tap, counters, b));
        }
    }
}

/// The sink, where it wants (inner frames, outer datagrams) of this direction.
type Wanted<'a> = Option<&'a Arc<dyn CaptureSink>>;

fn wanted(sink: Wanted<'_>, direction: Direction) -> (Wanted<'_>, Wanted<'_>) {
    let of = |layer| sink.filter(|s| s.wants(direction, layer));
    (of(Layer::Inner), of(Layer::Outer))
}

/// Offers a received datagram (as it came, before opening) with what became of it.
fn offer_received(
    sink: &dyn CaptureSink,
    from: std::net::SocketAddr,
    data: &[u8],
    dropped: Option<DropReason>,
) {
    sink.offer(&CaptureRecord {
        direction: Direction::In,
        layer: Layer::Outer,
        peer: Some(from),
        fanout: 1,
        dropped,
        vni: crate::wire::Header::new_checked(data).ok().map(|h| h.vni()),
        data,
    });
}

/// Offers a frame answered locally (an ARP request, say) and the answer, as inner frames
/// of network `vni` that went to no peer.
fn offer_local(sink: &dyn CaptureSink, vni: Vni, frame: &[u8], answer: &[u8]) {
    for (direction, data) in [(Direction::Out, frame), (Direction::In, answer)] {
        if sink.wants(direction, Layer::Inner) {
            sink.offer(&CaptureRecord {
                direction,
                layer: Layer::Inner,
                peer: None,
                fanout: 0,
                dropped: None,
                vni: Some(vni),
                data,
            });
        }
    }
}

/// Waits until `socket` is ready for `events` or `timeout` passes (which is not an error).
fn wait(socket: &UdpSocket, events: libc::c_short, timeout: Duration) -> io::Result<()> {
    let mut fd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(socket),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, and the count passed is one.
    let rc = unsafe { libc::poll(&mut fd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}
