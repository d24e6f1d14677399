//! A raw seal loop for profiling (callgrind, perf) and quick A/B figures: seals `size`-byte
//! frames through [`Session::seal`] `count` times and prints the rate.
//!
//! `cargo run --release -p shoal-vxlan --example seal_loop -- [size] [count] [open]`

#![allow(clippy::unwrap_used)] // a measurement that cannot run should stop loudly

use std::time::Instant;

use shoal_vxlan::crypto::{PairKeys, Session};
use shoal_vxlan::wire::envelope::{Envelope, HEADER_LEN, TAG_LEN};
use shoal_vxlan::wire::Vni;

fn main() {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1400);
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let open = args.next().is_some_and(|a| a == "open");
    let keys = PairKeys {
        send: [1; 32],
        recv: [1; 32],
    };
    let mut sealer = Session::new(1, 1, &keys);
    let mut opener = Session::new(1, 1, &keys);
    let vni = Vni::new(4096).unwrap();
    let mut buf = vec![0x5a_u8; HEADER_LEN + size + TAG_LEN];
    let start = Instant::now();
    for _ in 0..count {
        if sealer.seal(vni, &mut buf).is_err() {
            eprintln!("seal failed");
            std::process::exit(1);
        }
        if open {
            let Ok(mut env) = Envelope::new_checked(&mut buf[..]) else {
                eprintln!("bad envelope");
                std::process::exit(1);
            };
            if opener.open(&mut env).is_err() {
                eprintln!("open failed");
                std::process::exit(1);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let per = secs / count as f64;
    println!(
        "size {size} count {count}{}: {:.0} ns per message, {:.2} Gbit/s",
        if open { " seal+open" } else { " seal" },
        per * 1e9,
        size as f64 * 8.0 / per / 1e9
    );
}
