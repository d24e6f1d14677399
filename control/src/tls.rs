//! The cluster CA, node certificates and the rustls configurations.
//!
//! The CA is made at `init` (ECDSA P-256, rcgen). Every node gets a certificate signed by it
//! at join, naming its node ID and `swarm-manager`; the leader serves the API with its own,
//! and every node uses its own as its mTLS client identity. A joining node has no CA yet:
//! it trusts the manager only through [`PinnedCa`], which accepts a chain only if it holds a
//! CA certificate whose SHA-256 equals the token's digest and the leaf is validly signed by
//! that CA. There is no trust on first use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest as _, Sha256};

use crate::id::NodeId;
use crate::state::{CaMaterial, Role};
use crate::token::CaDigest;

/// The TLS server name every node uses for the manager, as docker does.
pub const SERVER_NAME: &str = "swarm-manager";

/// Errors making certificates or TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Key or certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused a certificate, key or configuration (a damaged state dir).
    #[error("TLS setup failed: {0}; the CA or node certificate in the state dir is damaged")]
    Config(#[from] rustls::Error),
    /// A joining node sent a certificate public key that is not an uncompressed P-256 point.
    #[error("the node's certificate public key has {0} bytes and is not an uncompressed P-256 point (65 bytes starting with 04); the agent is not of this version")]
    BadPublicKey(usize),
    /// The client certificate verifier could not be built.
    #[error("TLS setup failed: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A certificate and its private key.
#[derive(Clone)]
pub struct Issued {
    /// Certificate, DER.
    pub cert_der: Vec<u8>,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued(..)")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "shoal swarm CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Makes a new cluster CA.
pub fn generate_ca() -> Result<CaMaterial, TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    Ok(CaMaterial {
        cert_der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
    })
}

/// A node's certificate key pair, made by the node itself: only the public half leaves it.
pub struct NodeKey {
    key: KeyPair,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

impl NodeKey {
    /// A fresh ECDSA P-256 key pair.
    pub fn generate() -> Result<Self, TlsError> {
        Ok(Self {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// The public key as an uncompressed P-256 point (65 bytes): what the manager signs.
    pub fn public_raw(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    /// The private key, PKCS#8 PEM, for the node's own store.
    pub fn private_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// Length of an uncompressed P-256 point.
pub const P256_RAW_LEN: usize = 65;

/// A P-256 public key received from a joining node.
struct RawP256<'a>(&'a [u8]);

impl rcgen::PublicKeyData for RawP256<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Issues a node certificate (server and client use) for `node_id` and the node's own
/// P-256 public key `public_raw` (uncompressed point), signed by `ca`.
pub fn sign_node_cert(
    ca: &CaMaterial,
    node_id: &NodeId,
    role: Role,
    public_raw: &[u8],
) -> Result<Vec<u8>, TlsError> {
    if public_raw.len() != P256_RAW_LEN || public_raw[0] != 4 {
        return Err(TlsError::BadPublicKey(public_raw.len()));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    // rcgen signs with the issuer's name and key; both are what the CA certificate holds.
    let issuer = ca_params().self_signed(&ca_key)?;
    let mut params =
        CertificateParams::new(vec![SERVER_NAME.to_owned(), node_id.as_str().to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id.as_str());
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&RawP256(public_raw), &issuer, &ca_key)?;
    Ok(cert.der().to_vec())
}

/// Makes a key pair here and issues its certificate: for the node that runs `init`, which is
/// its own CA.
pub fn issue_node_cert(ca: &CaMaterial, node_id: &NodeId, role: Role) -> Result<Issued, TlsError> {
    let key = NodeKey::generate()?;
    Ok(Issued {
        cert_der: sign_node_cert(ca, node_id, role, &key.public_raw())?,
        key_pem: key.private_pem(),
    })
}

/// SHA-256 of a certificate.
pub fn cert_digest(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key = KeyPair::from_pem(pem)?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key.serialize_der(),
    )))
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(Arc::new(roots))
}

/// The manager's server configuration: its node certificate with the CA in the chain, and
/// optional client certificates checked against the CA (join requests come without one).
pub fn server_config(ca_der: &[u8], node: &Issued) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider.clone())
        .allow_unauthenticated()
        .build()?;
    let chain = vec![
        CertificateDer::from(node.cert_der.clone()),
        CertificateDer::from(ca_der.to_vec()),
    ];
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key(&node.key_pem)?)?;
    Ok(Arc::new(config))
}

/// A member's client configuration: the cluster CA as the only root, its node certificate
/// as client identity.
pub fn node_client_config(ca_der: &[u8], node: &Issued) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_der)?)
        .with_client_auth_cert(
            vec![CertificateDer::from(node.cert_der.clone())],
            private_key(&node.key_pem)?,
        )?;
    Ok(Arc::new(config))
}

/// A joining node's client configuration: trust only a manager whose chain holds the CA
/// with `digest`. The returned verifier says afterwards whether a handshake failed on that.
pub fn join_client_config(
    digest: CaDigest,
) -> Result<(Arc<ClientConfig>, Arc<PinnedCa>), TlsError> {
    let provider = provider();
    let pinned = Arc::new(PinnedCa {
        digest,
        provider: provider.clone(),
        mismatch: AtomicBool::new(false),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(pinned.clone())
        .with_no_client_auth();
    Ok((Arc::new(config), pinned))
}

/// The server name to connect with.
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(SERVER_NAME)
            .map(|n| n.to_owned())
            .unwrap_or_else(|_| unreachable_dns()),
    )
}

#[cold]
fn unreachable_dns() -> rustls::pki_types::DnsName<'static> {
    // SERVER_NAME is a constant valid DNS name; a test checks it.
    rustls::pki_types::DnsName::try_from("localhost")
        .map(|n| n.to_owned())
        .unwrap_or_else(|_| unreachable_dns())
}

/// Server certificate verifier pinned to the CA digest from a join token.
#[derive(Debug)]
pub struct PinnedCa {
    digest: CaDigest,
    provider: Arc<CryptoProvider>,
    mismatch: AtomicBool,
}

impl PinnedCa {
    /// True if a handshake failed because the manager's chain did not match the digest.
    pub fn mismatched(&self) -> bool {
        self.mismatch.load(Ordering::Relaxed)
    }

    fn refuse(&self) -> rustls::Error {
        self.mismatch.store(true, Ordering::Relaxed);
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| CaDigest::of(c.as_ref()) == self.digest)
        else {
            return Err(self.refuse());
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|_| self.refuse())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
            .map_err(|_| self.refuse())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_is_valid() {
        assert_eq!(server_name().to_str(), SERVER_NAME);
    }

    fn verify(pinned: &PinnedCa, leaf: &[u8], chain: &[&[u8]]) -> bool {
        let inter: Vec<CertificateDer<'_>> = chain
            .iter()
            .map(|c| CertificateDer::from(c.to_vec()))
            .collect();
        pinned
            .verify_server_cert(
                &CertificateDer::from(leaf.to_vec()),
                &inter,
                &server_name(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    #[test]
    fn pinned_ca_accepts_only_the_right_ca() {
        let ca = generate_ca().unwrap();
        let other = generate_ca().unwrap();
        let id = NodeId::from_random(1);
        let leaf = issue_node_cert(&ca, &id, Role::Manager).unwrap();
        let forged = issue_node_cert(&other, &id, Role::Manager).unwrap();
        let (_, pinned) = join_client_config(CaDigest::of(&ca.cert_der)).unwrap();

        assert!(verify(&pinned, &leaf.cert_der, &[&ca.cert_der]));
        assert!(!pinned.mismatched());
        // No CA in the chain.
        assert!(!verify(&pinned, &leaf.cert_der, &[]));
        assert!(pinned.mismatched());
        // Another cluster's CA and leaf.
        assert!(!verify(&pinned, &forged.cert_der, &[&other.cert_der]));
        // The right CA in the chain but a leaf signed by another CA.
        assert!(!verify(&pinned, &forged.cert_der, &[&ca.cert_der]));
    }

    #[test]
    fn the_node_keeps_its_private_key() {
        let ca = generate_ca().unwrap();
        let key = NodeKey::generate().unwrap();
        let id = NodeId::from_random(3);
        let cert = sign_node_cert(&ca, &id, Role::Worker, &key.public_raw()).unwrap();
        let node = Issued {
            cert_der: cert,
            key_pem: key.private_pem(),
        };
        // The certificate verifies under the CA and works with the node's own key.
        let (_, pinned) = join_client_config(CaDigest::of(&ca.cert_der)).unwrap();
        assert!(verify(&pinned, &node.cert_der, &[&ca.cert_der]));
        node_client_config(&ca.cert_der, &node).unwrap();
        server_config(&ca.cert_der, &node).unwrap();
        for bad in [vec![], vec![4; 64], vec![2; 65], vec![4; 66]] {
            assert!(matches!(
                sign_node_cert(&ca, &id, Role::Worker, &bad),
                Err(TlsError::BadPublicKey(n)) if n == bad.len()
            ));
        }
    }

    #[test]
    fn configs_build_from_issued_material() {
        let ca = generate_ca().unwrap();
        let leaf = issue_node_cert(&ca, &NodeId::from_random(2), Role::Worker).unwrap();
        server_config(&ca.cert_der, &leaf).unwrap();
        node_client_config(&ca.cert_der, &leaf).unwrap();
        let broken = Issued {
            cert_der: leaf.cert_der.clone(),
            key_pem: "garbage".into(),
        };
        assert!(server_config(&ca.cert_der, &broken).is_err());
    }
}
