//! Writes the seed corpus of the fuzz targets: `cargo run -p shoal-vxlan --example fuzz_seeds --
//! vxlan/fuzz/corpus`. The seeds are a plain datagram and a datagram sealed by fixture node A
//! for node B, each in the layout its target reads.

use std::path::PathBuf;
use std::time::Instant;

use shoal_vxlan::testing::{frame, A, B, VNI};
use shoal_vxlan::{Packet, Transmits};

fn datagram(encrypted: bool, payload: &[u8]) -> Vec<u8> {
    let mut a = A.engine(&B, encrypted);
    let mut pkt = Packet::new(1500);
    pkt.set_frame(&frame(B.mac, A.mac, payload));
    let mut out = Transmits::new(1500);
    a.handle_frame(Instant::now(), VNI, &mut pkt, &mut out)
        .expect("fixture nodes are peers");
    out.ready()[0].packet.data().to_vec()
}

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let payload = b"\x45\x00\x00\x1cshoal seed payload";
    let plain = datagram(false, payload);
    let sealed = datagram(true, payload);
    let header = dir.join("header");
    let dgram = dir.join("datagram");
    std::fs::create_dir_all(&header)?;
    std::fs::create_dir_all(&dgram)?;
    std::fs::write(header.join("plain"), &plain)?;
    std::fs::write(header.join("sealed"), &sealed)?;
    // The datagram target's first byte picks the mode: odd for plain, even for encrypted.
    std::fs::write(dgram.join("plain"), [&[1u8][..], &plain].concat())?;
    std::fs::write(dgram.join("sealed"), [&[0u8][..], &sealed].concat())?;
    println!("seeds written under {}", dir.display());
    Ok(())
}
