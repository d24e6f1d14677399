//! The answering half of the service-name DNS responder each network's gateway address runs
//! (docker's embedded DNS): A records only, authoritative, nothing forwarded.
//!
//! [`respond`] takes one query datagram and a lookup of names to addresses and writes the
//! answer (RFC 1035 §4.1). What it answers:
//!
//! - an A question (class IN) for a name the lookup knows: NOERROR, authoritative, one A record
//!   each address (none for an empty list: NODATA);
//! - any other type (AAAA, HTTPS, ANY, an unknown one) for a name the lookup knows: NOERROR with
//!   no answers, so the stub resolver does not go on to ask elsewhere;
//! - a name the lookup does not know, or one that cannot be a service name (a label with bytes
//!   other than ASCII letters, digits, `-` and `_`; the root), or a class other than IN:
//!   REFUSED, so a stub resolver tries the next server in its `resolv.conf`;
//! - a well-formed message with an opcode other than QUERY: NOTIMP, with no sections;
//! - anything else, nothing (`false`): garbage, a truncated message, a response, a query with
//!   no question or with more than one (RFC 9619: QDCOUNT is 1; a FORMERR would only invite
//!   more), or a query whose counts cannot fit in its length.
//!
//! An answer is at most [`MAX_UDP`] bytes: when the addresses do not fit, as many as fit are
//! sent and the TC flag is set. EDNS is not spoken (no OPT record in the answer), so 512 bytes
//! is the limit whatever the query offers.
//!
//! Messages are parsed and built with the `simple-dns` crate; the one thing added here is that
//! a question of a type `simple-dns` does not know (it refuses to parse one) is still answered,
//! by parsing a copy with the type replaced and echoing the original type back.
//!
//! Pure code: no IO, no clock. It never panics, on any input (a property test and the
//! `ingress/fuzz` target `dns` check it).

use std::io::Cursor;
use std::net::Ipv4Addr;

use simple_dns::rdata::{RData, A};
use simple_dns::{
    Packet, PacketFlag, Question, ResourceRecord, CLASS, OPCODE, QCLASS, QTYPE, RCODE, TYPE,
};

/// The largest answer [`respond`] writes: a DNS message over UDP without EDNS (RFC 1035
/// §4.2.1).
pub const MAX_UDP: usize = 512;

/// What the lookup knows of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The name is ours: these addresses (possibly none, such as a service with no healthy
    /// backend), cached for `ttl` seconds.
    Addresses {
        /// The name's addresses, in the order they go in the answer.
        addrs: Vec<Ipv4Addr>,
        /// The answer's time to live, in seconds.
        ttl: u32,
    },
    /// The name is not ours: the resolver should ask its next server.
    Refused,
}

const HEADER_LEN: usize = 12;
/// The smallest a question (root name, type, class) or a record can be.
const MIN_ENTRY_LEN: usize = 5;
/// An A record whose name is a compression pointer to the question's: pointer, type, class,
/// TTL, RDLENGTH, address.
const A_RECORD_LEN: usize = 2 + 2 + 2 + 4 + 2 + 4;
/// Stands in for a question type `simple-dns` cannot parse: an obsolete type nobody asks for.
const STAND_IN_TYPE: TYPE = TYPE::NULL;

/// Answers the DNS query `query` from `lookup`, writing the answer into `out` (cleared first).
/// Returns `false`, with `out` empty, when the query gets no answer at all (see the module's
/// documentation); the caller drops it and counts it.
///
/// `lookup` gets the question's name in lowercase, without a trailing dot (`web`,
/// `tasks.web`); it is called once at most.
pub fn respond(query: &[u8], lookup: impl Fn(&str) -> Answer, out: &mut Vec<u8>) -> bool {
    out.clear();
    let ok = answer(query, lookup, out).is_some();
    if !ok {
        out.clear();
    }
    ok
}

fn answer(query: &[u8], lookup: impl Fn(&str) -> Answer, out: &mut Vec<u8>) -> Option<()> {
    let header = query.get(..HEADER_LEN)?;
    if header[2] & 0x80 != 0 {
        return None; // a response, not a query: answering it could start a loop
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([header[i], header[i + 1]]));
    let entries = count(4) + count(6) + count(8) + count(10);
    // Each entry takes bytes; this keeps the parser from reserving room for 4 * 65,535
    // entries a 12-byte datagram claims to hold.
    if entries * MIN_ENTRY_LEN > query.len() - HEADER_LEN {
        return None;
    }
    let opcode = (header[2] >> 3) & 0x0f;
    let rd = header[2] & 0x01 != 0;

    if opcode != 0 {
        Packet::parse(query).ok()?;
        let mut reply = Packet::new_reply(u16::from_be_bytes([header[0], header[1]]));
        if rd {
            reply.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        *reply.rcode_mut() = RCODE::NotImplemented;
        write(&reply, out)?;
        // `simple-dns` keeps no opcode it does not know: echo the query's own.
        out[2] = (out[2] & !0x78) | (opcode << 3);
        return Some(());
    }
    if count(4) != 1 {
        return None;
    }

    // A question type `simple-dns` does not know: parse a copy with a stand-in type.
    let stand_in;
    let (packet, original_type) = match Packet::parse(query) {
        Ok(p) => (p, None),
        Err(_) => {
            let at = qtype_offset(query)?;
            let raw = u16::from_be_bytes([query[at], query[at + 1]]);
            if QTYPE::try_from(raw).is_ok() {
                return None; // the type is not what failed
            }
            let mut copy = query.to_vec();
            copy[at..at + 2].copy_from_slice(&u16::from(STAND_IN_TYPE).to_be_bytes());
            stand_in = copy;
            (Packet::parse(&stand_in).ok()?, Some((at, raw)))
        }
    };
    if packet.opcode() != OPCODE::StandardQuery || packet.questions.len() != 1 {
        return None;
    }
    let question = &packet.questions[0];

    let mut reply = Packet::new_reply(packet.id());
    if rd {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.questions.push(question.clone());
    let known = match (service_name(question), question.qclass) {
        (Some(name), QCLASS::CLASS(CLASS::IN) | QCLASS::ANY) => lookup(&name),
        _ => Answer::Refused,
    };
    let mut truncated = false;
    match known {
        Answer::Refused => *reply.rcode_mut() = RCODE::Refused,
        Answer::Addresses { addrs, ttl } => {
            reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
            if question.qtype == QTYPE::TYPE(TYPE::A) && original_type.is_none() {
                let room = MAX_UDP.saturating_sub(HEADER_LEN + question_len(question));
                let fit = room / A_RECORD_LEN;
                truncated = addrs.len() > fit;
                reply.answers = addrs
                    .iter()
                    .take(fit)
                    .map(|a| a_record(question, *a, ttl))
                    .collect();
            }
        }
    }
    if truncated {
        reply.set_flags(PacketFlag::TRUNCATION);
    }
    write(&reply, out)?;
    // Never more than 512 bytes, should the estimate above ever be wrong.
    while out.len() > MAX_UDP {
        reply.answers.pop()?;
        reply.set_flags(PacketFlag::TRUNCATION);
        write(&reply, out)?;
    }
    if let Some((at, raw)) = original_type {
        // The question is echoed at the offset it had in the query.
        out.get_mut(at..at + 2)?.copy_from_slice(&raw.to_be_bytes());
    }
    Some(())
}

/// The question's name as the lookup gets it, or `None` when it cannot be a service name.
fn service_name(question: &Question<'_>) -> Option<String> {
    let labels = question.qname.get_labels();
    if labels.is_empty() {
        return None;
    }
    let mut name = String::with_capacity(question_len(question));
    for (i, label) in labels.iter().enumerate() {
        let bytes: &[u8] = label.as_ref();
        if !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if i > 0 {
            name.push('.');
        }
        name.extend(bytes.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    Some(name)
}

/// The question's length on the wire, uncompressed: name, type, class.
fn question_len(question: &Question<'_>) -> usize {
    let name: usize = question
        .qname
        .get_labels()
        .iter()
        .map(|l| l.len() + 1)
        .sum();
    name + 1 + 4
}

fn a_record<'a>(question: &Question<'a>, addr: Ipv4Addr, ttl: u32) -> ResourceRecord<'a> {
    ResourceRecord::new(
        question.qname.clone(),
        CLASS::IN,
        ttl,
        RData::A(A {
            address: u32::from(addr),
        }),
    )
}

/// Writes `packet` into `out` (cleared first), names compressed.
fn write(packet: &Packet<'_>, out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    let mut cursor = Cursor::new(out);
    packet.write_compressed_to(&mut cursor).ok()
}

/// Where the first question's type is in `query`: after its name, which starts right after the
/// header and cannot be compressed (a pointer there could only point into the header).
fn qtype_offset(query: &[u8]) -> Option<usize> {
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        match len {
            0 => break,
            1..=63 => at += len,
            _ => return None,
        }
    }
    (at + 4 <= query.len()).then_some(at)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use simple_dns::Name;

    use super::*;

    const WEB: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
    const TASK1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
    const TASK2: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 6);

    /// The services of a small network: `web` (VIP), `tasks.web` (two backends), `idle` (no
    /// healthy backend), `big` (100 addresses).
    fn lookup(name: &str) -> Answer {
        let addrs = match name {
            "web" => vec![WEB],
            "tasks.web" => vec![TASK1, TASK2],
            "idle" => vec![],
            "big" => (0..100).map(|i| Ipv4Addr::new(10, 0, 2, i)).collect(),
            _ => return Answer::Refused,
        };
        Answer::Addresses { addrs, ttl: 600 }
    }

    fn query_of(id: u16, name: &str, qtype: TYPE, rd: bool) -> Vec<u8> {
        let mut q = Packet::new_query(id);
        if rd {
            q.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            qtype.into(),
            CLASS::IN.into(),
            false,
        ));
        q.build_bytes_vec().unwrap()
    }

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        query_of(0x1234, name, qtype, true)
    }

    /// The answer to `q`, checked for what every answer has in common, parsed.
    fn answer_to(q: &[u8], out: &mut Vec<u8>) -> Packet<'static> {
        assert!(respond(q, lookup, out), "no answer to {q:02x?}");
        assert!(out.len() <= MAX_UDP, "{} bytes", out.len());
        assert_eq!(out[..2], q[..2], "the query's ID");
        let a = Packet::parse(out).unwrap();
        assert!(a.has_flags(PacketFlag::RESPONSE));
        assert!(!a.has_flags(PacketFlag::RECURSION_AVAILABLE));
        assert_eq!(
            a.has_flags(PacketFlag::RECURSION_DESIRED),
            q[2] & 1 == 1,
            "RD copied"
        );
        // Owned, so the test can keep it past `out`.
        let mut owned = Packet::new_reply(a.id());
        owned.set_flags(PacketFlag::from_bits_truncate(u16::from_be_bytes([
            out[2], out[3],
        ])));
        *owned.rcode_mut() = a.rcode();
        owned.questions = a.questions.into_iter().map(Question::into_owned).collect();
        owned.answers = a
            .answers
            .into_iter()
            .map(ResourceRecord::into_owned)
            .collect();
        owned
    }

    fn addresses(p: &Packet<'_>) -> Vec<Ipv4Addr> {
        p.answers
            .iter()
            .map(|rr| match &rr.rdata {
                RData::A(a) => Ipv4Addr::from(a.address),
                other => panic!("not an A record: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_hit_with_two_addresses() {
        let mut out = Vec::new();
        let q = query("tasks.web", TYPE::A);
        let a = answer_to(&q, &mut out);
        assert_eq!(a.rcode(), RCODE::NoError);
        assert!(a.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
        assert!(!a.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(a.questions.len(), 1);
        assert_eq!(a.questions[0].qname.to_string(), "tasks.web");
        assert_eq!(a.questions[0].qtype, QTYPE::TYPE(TYPE::A));
        assert_eq!(addresses(&a), [TASK1, TASK2]);
        for rr in &a.answers {
            assert_eq!(rr.name.to_string(), "tasks.web");
            assert_eq!(rr.class, CLASS::IN);
            assert_eq!(rr.ttl, 600);
        }
        // The bytes: header, question echoed, then two records whose names point at it.
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &[0x12, 0x34, 0x85, 0x00, 0, 1, 0, 2, 0, 0, 0, 0][..],
            &q[12..],
            &[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x02, 0x58, 0, 4, 10, 0, 1, 5],
            &[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x02, 0x58, 0, 4, 10, 0, 1, 6],
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn a_hit_without_rd() {
        let mut out = Vec::new();
        let a = answer_to(&query_of(7, "web", TYPE::A, false), &mut out);
        assert_eq!(addresses(&a), [WEB]);
        assert_eq!(out[2..4], [0x84, 0x00]);
    }

    #[test]
    fn names_are_case_insensitive_and_echoed_as_asked() {
        let mut out = Vec::new();
        for name in ["WEB", "Tasks.Web", "tAsKs.wEb.", "web."] {
            let a = answer_to(&query(name, TYPE::A), &mut out);
            assert_eq!(a.rcode(), RCODE::NoError, "{name}");
            assert!(!a.answers.is_empty(), "{name}");
            let asked = name.trim_end_matches('.');
            assert_eq!(a.questions[0].qname.to_string(), asked);
            assert_eq!(a.answers[0].name.to_string(), asked);
        }
    }

    #[test]
    fn lookup_gets_lowercase_without_trailing_dot() {
        let mut out = Vec::new();
        let seen = std::cell::RefCell::new(Vec::new());
        let q = query("Tasks.WEB.", TYPE::A);
        assert!(respond(
            &q,
            |n| {
                seen.borrow_mut().push(n.to_string());
                Answer::Refused
            },
            &mut out
        ));
        assert_eq!(*seen.borrow(), ["tasks.web"]);
    }

    #[test]
    fn empty_list_is_nodata() {
        let mut out = Vec::new();
        let a = answer_to(&query("idle", TYPE::A), &mut out);
        assert_eq!(a.rcode(), RCODE::NoError);
        assert!(a.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
        assert!(a.answers.is_empty());
    }

    #[test]
    fn other_types_of_known_names_are_empty_noerror() {
        let mut out = Vec::new();
        for t in [TYPE::AAAA, TYPE::MX, TYPE::TXT, TYPE::HTTPS] {
            let a = answer_to(&query("web", t), &mut out);
            assert_eq!(a.rcode(), RCODE::NoError, "{t:?}");
            assert!(a.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
            assert!(a.answers.is_empty(), "{t:?}");
            assert_eq!(a.questions[0].qtype, QTYPE::TYPE(t));
        }
    }

    #[test]
    fn a_type_simple_dns_does_not_know_is_still_answered() {
        let mut out = Vec::new();
        for (name, rcode) in [("web", RCODE::NoError), ("nope", RCODE::Refused)] {
            let mut q = query(name, TYPE::A);
            let at = q.len() - 4;
            q[at..at + 2].copy_from_slice(&0xff00u16.to_be_bytes());
            assert!(
                Packet::parse(&q).is_err(),
                "the type is unknown to simple-dns"
            );
            assert!(respond(&q, lookup, &mut out));
            assert_eq!(out[3] & 0x0f, rcode as u8, "{name}");
            assert_eq!(out[12..], q[12..], "the question echoed, its type too");
            assert_eq!(out[6..8], [0, 0], "no answers");
        }
    }

    #[test]
    fn unknown_names_are_refused() {
        let mut out = Vec::new();
        for t in [TYPE::A, TYPE::AAAA] {
            let a = answer_to(&query("example.com", t), &mut out);
            assert_eq!(a.rcode(), RCODE::Refused);
            assert!(!a.has_flags(PacketFlag::AUTHORITATIVE_ANSWER));
            assert!(a.answers.is_empty());
            assert_eq!(a.questions[0].qname.to_string(), "example.com");
        }
    }

    #[test]
    fn names_that_cannot_be_services_are_refused_unasked() {
        let mut out = Vec::new();
        let never = |n: &str| -> Answer { panic!("asked about {n:?}") };
        // A label holding a dot, a space, a non-ASCII byte; the root.
        let cases: [&[&[u8]]; 4] = [&[b"tasks.web"], &[b"we b"], &[b"w\xc3\xa9b"], &[]];
        for labels in cases {
            let mut q = vec![0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            for l in labels {
                q.push(l.len() as u8);
                q.extend_from_slice(l);
            }
            q.extend_from_slice(&[0, 0, 1, 0, 1]);
            assert!(respond(&q, never, &mut out), "{labels:?}");
            assert_eq!(out[3] & 0x0f, RCODE::Refused as u8);
        }
        // A class other than IN.
        let mut q = query("web", TYPE::A);
        let n = q.len();
        q[n - 2..].copy_from_slice(&3u16.to_be_bytes()); // CH
        assert!(respond(&q, never, &mut out));
        assert_eq!(out[3] & 0x0f, RCODE::Refused as u8);
    }

    #[test]
    fn garbage_gets_nothing() {
        let mut out = vec![1, 2, 3];
        for g in [
            &b""[..],
            b"\x00",
            b"hello, world, this is not DNS",
            &[0xff; 64],
            &[0; 11],
        ] {
            assert!(!respond(g, lookup, &mut out), "{g:02x?}");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn truncated_queries_get_nothing() {
        let mut out = Vec::new();
        let q = query("tasks.web", TYPE::A);
        for len in 0..q.len() {
            assert!(!respond(&q[..len], lookup, &mut out), "{len} bytes");
        }
    }

    #[test]
    fn zero_or_two_questions_get_nothing() {
        let mut out = Vec::new();
        assert!(!respond(
            &Packet::new_query(1).build_bytes_vec().unwrap(),
            lookup,
            &mut out
        ));
        let mut two = Packet::new_query(2);
        for name in ["web", "tasks.web"] {
            two.questions.push(Question::new(
                Name::new_unchecked(name),
                TYPE::A.into(),
                CLASS::IN.into(),
                false,
            ));
        }
        assert!(!respond(&two.build_bytes_vec().unwrap(), lookup, &mut out));
    }

    #[test]
    fn responses_get_nothing() {
        let mut out = Vec::new();
        let mut q = query("web", TYPE::A);
        q[2] |= 0x80;
        assert!(!respond(&q, lookup, &mut out));
    }

    #[test]
    fn counts_beyond_the_length_get_nothing() {
        let mut out = Vec::new();
        let mut q = query("web", TYPE::A);
        q[10..12].copy_from_slice(&[0xff, 0xff]);
        assert!(!respond(&q, lookup, &mut out));
    }

    #[test]
    fn other_opcodes_get_notimp() {
        let mut out = Vec::new();
        for opcode in [1u8, 2, 4, 5, 15] {
            let mut q = query("web", TYPE::A);
            q[2] = (q[2] & !0x78) | (opcode << 3);
            assert!(respond(&q, lookup, &mut out), "opcode {opcode}");
            assert_eq!(out[..2], q[..2]);
            assert_eq!((out[2] >> 3) & 0x0f, opcode);
            assert_eq!(out[2] & 0x81, 0x81, "QR, RD copied");
            assert_eq!(out[3] & 0x0f, RCODE::NotImplemented as u8);
            assert_eq!(out[4..12], [0; 8]);
        }
    }

    #[test]
    fn many_addresses_are_truncated_to_512_bytes() {
        let mut out = Vec::new();
        let a = answer_to(&query("big", TYPE::A), &mut out);
        assert!(a.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(a.rcode(), RCODE::NoError);
        let got = addresses(&a);
        assert!(got.len() > 20, "{} addresses", got.len());
        let all: Vec<_> = (0..100).map(|i| Ipv4Addr::new(10, 0, 2, i)).collect();
        assert_eq!(got, all[..got.len()], "the first ones, in order");
        // As many as fit: one more would not.
        assert!(out.len() + A_RECORD_LEN > MAX_UDP, "{} bytes", out.len());
    }

    #[test]
    fn a_long_name_still_fits() {
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        let mut out = Vec::new();
        let q = query(&long, TYPE::A);
        let lookup = |_: &str| Answer::Addresses {
            addrs: (0..100).map(|i| Ipv4Addr::new(10, 0, 2, i)).collect(),
            ttl: 5,
        };
        assert!(respond(&q, lookup, &mut out));
        assert!(out.len() <= MAX_UDP);
        let a = Packet::parse(&out).unwrap();
        assert!(a.has_flags(PacketFlag::TRUNCATION));
        assert!(!a.answers.is_empty());
    }

    #[test]
    fn edns_queries_are_answered_without_opt() {
        let plain = query("web", TYPE::A);
        let mut q = Packet::parse(&plain).unwrap();
        *q.opt_mut() = Some(simple_dns::rdata::OPT {
            opt_codes: Vec::new(),
            udp_packet_size: 1232,
            version: 0,
        });
        let q = q.build_bytes_vec().unwrap();
        let mut out = Vec::new();
        let a = answer_to(&q, &mut out);
        assert_eq!(addresses(&a), [WEB]);
        assert!(a.opt().is_none());
        assert_eq!(out[10..12], [0, 0]);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut out = Vec::new();
            if respond(&bytes, lookup, &mut out) {
                prop_assert!(out.len() <= MAX_UDP);
                prop_assert_eq!(&out[..2], &bytes[..2]);
            } else {
                prop_assert!(out.is_empty());
            }
        }

        /// Mutations of a real query reach deeper than random bytes.
        #[test]
        fn never_panics_on_a_mutated_query(
            name in "[a-zA-Z0-9.]{0,40}",
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        ) {
            let mut q = query_of(1, &name, TYPE::A, true);
            for (at, b) in flips {
                let n = q.len();
                q[at % n] ^= b;
            }
            let mut out = Vec::new();
            if respond(&q, lookup, &mut out) {
                prop_assert!(out.len() <= MAX_UDP);
            }
        }
    }
}
