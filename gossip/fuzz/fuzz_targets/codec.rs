//! The gossip codec (foca headers, members, broadcast items, push-pull states): arbitrary
//! bytes never panic, and whatever decodes encodes back to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_gossip::codec::{decode_header, encode_header, member_len, Codec, Item, StateDump};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, used)) = decode_header(data) {
        assert_eq!(encode_header(&h), data[..used]);
    }
    let mut c = Codec;
    let mut buf = data;
    if let Ok(m) = foca::Codec::decode_member(&mut c, &mut buf) {
        let used = data.len() - buf.len();
        assert_eq!(used, member_len(&m));
        let mut out = Vec::new();
        foca::Codec::encode_member(&mut c, &m, &mut out).expect("room in a Vec");
        assert_eq!(out, data[..used]);
    }
    if let Ok(item) = Item::decode(data) {
        assert_eq!(item.encode(), data);
    }
    if let Ok(state) = StateDump::decode(data) {
        assert_eq!(state.encode(), data);
    }
});
