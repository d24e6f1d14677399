//! Two threads around one engine: device to underlay, and underlay to device.
//!
//! The engine sits behind a mutex taken once per packet (batching comes with the fast path);
//! the control plane changes peers and forwarding entries through [`Dataplane::with_engine`].
//! The threads wake at least every [`POLL`] to notice a stop.

use std::io;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::tap::Tap;
use crate::buffer::{Packet, Transmits};
use crate::engine::Engine;
use crate::wire::Vni;

/// How long a blocked read waits before the thread checks whether it should stop.
pub const POLL: Duration = Duration::from_millis(100);

/// Largest frame the threads read from the device.
const MAX_FRAME: usize = 65_535 - crate::buffer::HEADROOM - crate::buffer::TAILROOM;

/// Answers some frames from the device locally, instead of sending them (ARP for known
/// addresses, for example).
pub trait LocalResponder: Send + Sync {
    /// Called with each frame read from the device before the engine sees it. To answer it,
    /// write the reply frame into `reply` and return `true`: the reply goes back to the device
    /// and the frame goes no further.
    fn respond(&self, frame: &[u8], reply: &mut Vec<u8>) -> bool;
}

/// Counters of the IO shell (the engine counts the rest).
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Reads from the device that failed (other than time-outs).
    pub tap_read_errors: AtomicU64,
    /// Writes to the device that failed.
    pub tap_write_errors: AtomicU64,
    /// Sends on the socket that failed.
    pub udp_send_errors: AtomicU64,
    /// Receives on the socket that failed (other than time-outs).
    pub udp_recv_errors: AtomicU64,
    /// Frames answered locally.
    pub answered_locally: AtomicU64,
}

struct Shared {
    engine: Mutex<Engine>,
    stop: AtomicBool,
    counters: IoCounters,
}

/// The running data path of one network: a TAP device, a UDP socket and an engine.
pub struct Dataplane {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
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
    /// Starts the two threads. Frames read from `tap` go out on network `vni`.
    pub fn start(
        engine: Engine,
        vni: Vni,
        tap: Tap,
        udp: UdpSocket,
        responder: Option<Arc<dyn LocalResponder>>,
    ) -> io::Result<Dataplane> {
        udp.set_read_timeout(Some(POLL))?;
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            stop: AtomicBool::new(false),
            counters: IoCounters::default(),
        });
        let tap = Arc::new(tap);
        let udp_tx = udp.try_clone()?;
        let out = {
            let (shared, tap) = (Arc::clone(&shared), Arc::clone(&tap));
            std::thread::Builder::new()
                .name("shoal-dp-out".into())
                .spawn(move || outbound(&shared, vni, &tap, &udp_tx, responder.as_deref()))?
        };
        let inb = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("shoal-dp-in".into())
                .spawn(move || inbound(&shared, &tap, &udp))?
        };
        Ok(Dataplane {
            shared,
            threads: vec![out, inb],
        })
    }

    /// Runs `f` on the engine (to change peers, forwarding entries or keys, or to read
    /// counters), between packets.
    pub fn with_engine<R>(&self, f: impl FnOnce(&mut Engine) -> R) -> R {
        f(&mut lock(&self.shared.engine))
    }

    /// The IO shell's counters.
    pub fn io_counters(&self) -> &IoCounters {
        &self.shared.counters
    }

    /// Stops the threads and waits for them (at most about [`POLL`]); the device goes away
    /// with them.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.halt();
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn outbound(
    shared: &Shared,
    vni: Vni,
    tap: &Tap,
    udp: &UdpSocket,
    responder: Option<&dyn LocalResponder>,
) {
    let mut pkt = Packet::new(MAX_FRAME);
    let mut out = Transmits::new(MAX_FRAME);
    let mut reply = Vec::with_capacity(128);
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match tap.recv_timeout(pkt.frame_space(), POLL) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(_) => {
                shared
                    .counters
                    .tap_read_errors
                    .fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(POLL);
                continue;
            }
        };
        pkt.set_frame_len(n);
        if let Some(r) = responder {
            reply.clear();
            if r.respond(pkt.data(), &mut reply) {
                shared
                    .counters
                    .answered_locally
                    .fetch_add(1, Ordering::Relaxed);
                if tap.send(&reply).is_err() {
                    shared
                        .counters
                        .tap_write_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        }
        // Drops are counted by the engine.
        let _ = lock(&shared.engine).handle_frame(Instant::now(), vni, &mut pkt, &mut out);
        for t in out.ready() {
            if udp.send_to(t.packet.data(), t.dst).is_err() {
                shared
                    .counters
                    .udp_send_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        out.clear();
    }
}

fn inbound(shared: &Shared, tap: &Tap, udp: &UdpSocket) {
    let mut pkt = Packet::new(MAX_FRAME);
    while !shared.stop.load(Ordering::Relaxed) {
        let (n, src) = match udp.recv_from(pkt.datagram_space()) {
            Ok(v) => v,
            Err(e) if is_timeout(&e) => continue,
            Err(_) => {
                shared
                    .counters
                    .udp_recv_errors
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        pkt.set_datagram_len(n);
        let opened = lock(&shared.engine).handle_datagram(Instant::now(), src, &mut pkt);
        if let Ok(opened) = opened {
            if tap.send(opened.frame()).is_err() {
                shared
                    .counters
                    .tap_write_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
