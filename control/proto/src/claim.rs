//! What a joining node sends the manager (see `docs/api.md`, "Join"): who it says it is,
//! and the transcript its proofs cover. The proofs themselves are made and checked in
//! `shoal-control` (`trust::join`); this crate has no crypto.
//!
//! The transcript is `"shoal join v1" || exporter (32) || hostname || addr || public_key (32)
//! || signing_key (32) || cert_public_key || engine_version`, variable fields each preceded by
//! their length as a u16 big-endian, the address as its text form so prefixed. The exporter
//! bytes come from the TLS session ([RFC 5705], label [`EXPORTER_LABEL`]), so a proof is
//! worth nothing on another connection.
//!
//! [RFC 5705]: https://www.rfc-editor.org/rfc/rfc5705

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The TLS exporter label of the join proofs.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-shoal-join-v1";
/// Bytes exported from the TLS session.
pub const EXPORTER_LEN: usize = 32;

const TRANSCRIPT_LABEL: &[u8] = b"shoal join v1";

/// What a joining node says it is, and its proofs (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// HMAC of the exporter bytes under the token's secret.
    pub secret_proof: [u8; 32],
    /// Our host name.
    pub hostname: String,
    /// Our advertise address.
    pub addr: IpAddr,
    /// Our X25519 public key.
    pub public_key: [u8; 32],
    /// Our Ed25519 public key.
    pub signing_key: [u8; 32],
    /// The public half of our certificate key (uncompressed P-256 point); the private half
    /// never leaves our state dir.
    pub cert_public_key: Vec<u8>,
    /// Our agent version.
    pub engine_version: String,
    /// Proof that we hold the X25519 private key.
    pub key_proof: [u8; 32],
    /// Ed25519 signature of the transcript.
    #[serde(with = "signature_bytes")]
    pub signature: [u8; 64],
}

mod signature_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(sig)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v = Vec::<u8>::deserialize(d)?;
        v.try_into()
            .map_err(|v: Vec<u8>| serde::de::Error::invalid_length(v.len(), &"64 bytes"))
    }
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&field[..usize::from(len)]);
}

impl Claim {
    /// The transcript the proofs cover (see the module docs).
    pub fn transcript(&self, exporter: &[u8; EXPORTER_LEN]) -> Vec<u8> {
        let mut t = Vec::with_capacity(256);
        t.extend_from_slice(TRANSCRIPT_LABEL);
        t.extend_from_slice(exporter);
        put(&mut t, self.hostname.as_bytes());
        put(&mut t, self.addr.to_string().as_bytes());
        t.extend_from_slice(&self.public_key);
        t.extend_from_slice(&self.signing_key);
        put(&mut t, &self.cert_public_key);
        put(&mut t, self.engine_version.as_bytes());
        t
    }
}
