//! The VXLAN header and envelope parsers: never panic, and what parses re-emits identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vxlan::wire::{envelope, header, Envelope, Header};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::new_checked(data) {
        let repr = header::Repr::parse(&h);
        let mut buf = [0u8; header::HEADER_LEN];
        repr.emit(&mut Header::new_unchecked(&mut buf[..]));
        assert_eq!(header::Repr::parse(&Header::new_checked(&buf[..]).unwrap()), repr);
    }
    if let Ok(env) = Envelope::new_checked(data) {
        let repr = envelope::Repr::parse(&env);
        let mut buf = vec![0u8; envelope::Repr::buffer_len(env.ciphertext_len())];
        repr.emit(&mut buf);
        assert_eq!(envelope::Repr::parse(&Envelope::new_checked(&buf[..]).unwrap()), repr);
    }
});
