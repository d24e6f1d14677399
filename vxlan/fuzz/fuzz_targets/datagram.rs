//! `Engine::handle_datagram` under a fixed key (node B receiving from its peer A): never panics,
//! and delivers nothing it cannot authenticate.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use shoal_vxlan::engine::Provenance;
use shoal_vxlan::testing::{A, B};
use shoal_vxlan::Packet;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the network's mode, so both paths are explored.
    let Some((&mode, datagram)) = data.split_first() else {
        return;
    };
    let encrypted = mode & 1 == 0;
    let mut b = B.engine(&A, encrypted);
    let mut pkt = Packet::new(9000);
    if !pkt.set_datagram(datagram) {
        return;
    }
    match b.handle_datagram(Instant::now(), A.addr, &mut pkt) {
        Ok(opened) => {
            assert!(opened.frame().len() >= 14);
            match opened.provenance() {
                Provenance::Sealed { .. } => assert!(encrypted),
                Provenance::Plain => assert!(!encrypted),
            }
        }
        Err(_) => assert_eq!(b.counters().drops.total(), 1),
    }
});
