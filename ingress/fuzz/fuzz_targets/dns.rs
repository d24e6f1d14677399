//! The service-name DNS responder on any datagram: never panics, answers within 512 bytes with
//! the query's ID and the QR flag, and leaves nothing behind when it does not answer.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use shoal_ingress::dns::{respond, Answer, MAX_UDP};

fn lookup(name: &str) -> Answer {
    let addrs = match name {
        "web" => vec![Ipv4Addr::new(10, 0, 1, 2)],
        "tasks.web" => vec![Ipv4Addr::new(10, 0, 1, 5), Ipv4Addr::new(10, 0, 1, 6)],
        "idle" => vec![],
        "big" => (0..100).map(|i| Ipv4Addr::new(10, 0, 2, i)).collect(),
        _ => return Answer::Refused,
    };
    Answer::Addresses { addrs, ttl: 600 }
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if respond(data, lookup, &mut out) {
        assert!(out.len() <= MAX_UDP);
        assert!(out.len() >= 12);
        assert_eq!(out[..2], data[..2]);
        assert_eq!(out[2] & 0x80, 0x80);
    } else {
        assert!(out.is_empty());
    }
});
