//! The cluster CA, node certificates and the rustls configurations.
//!
//! The CA is made at `init` (ECDSA P-256, rcgen). Every node gets a certificate signed by it at
//! join, for a key pair the node made itself, binding its node ID and its role, as docker's do:
//!
//! | role | subject | DNS names | extended key usage |
//! |---|---|---|---|
//! | manager | CN = node ID, OU = `swarm-manager` | `swarm-manager`, `node-<node ID>` | server and client |
//! | worker | CN = node ID, OU = `swarm-worker` | `swarm-worker`, `node-<node ID>` | client only |
//!
//! (The node ID goes into a DNS name behind `node-`: a name of digits only, which a node ID
//! can be, is not a valid DNS name.)
//!
//! So only a manager's certificate can serve the manager API: a worker's has neither the
//! server name `swarm-manager` nor server use, and every verifier here asks for both. A member
//! connecting to its manager ([`manager_client_config`]) also asks that the certificate name the
//! manager node it expects (the view's leader). Certificates live [`DEFAULT_CERT_EXPIRY`]
//! unless `init --cert-expiry` says otherwise, and agents renew theirs when a third of that is
//! left; promote and demote reissue them with the new role.
//!
//! A joining node has no CA yet: it trusts the manager only through [`PinnedCa`], which accepts
//! a chain only if it holds a CA certificate whose SHA-256 equals the token's digest and the
//! leaf is a manager certificate validly signed by that CA. There is no trust on first use.

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

use std::sync::Mutex;
use std::time::Duration;

use crate::cluster::Role;
use crate::id::NodeId;
use crate::token::CaDigest;

/// The TLS server name every node uses for the manager, as docker does.
pub const SERVER_NAME: &str = "swarm-manager";

/// How long a node certificate is valid unless `init --cert-expiry` says otherwise: 90 days,
/// as docker's.
pub const DEFAULT_CERT_EXPIRY: Duration =
    Duration::from_secs(shoal_proto::view::DEFAULT_CERT_EXPIRY_SECS);
/// The shortest `--cert-expiry` (docker's is an hour; a minute lets a lab see a renewal).
pub const MIN_CERT_EXPIRY: Duration = Duration::from_secs(60);
/// A certificate is valid from this long before it was issued, for clocks slightly behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// The DNS name that names node `id` in a certificate.
pub fn node_dns_name(id: &NodeId) -> String {
    format!("node-{}", id.as_str())
}

/// The organizational unit that names a role in a certificate, as docker's.
pub fn role_unit(role: Role) -> &'static str {
    match role {
        Role::Manager => "swarm-manager",
        Role::Worker => "swarm-worker",
    }
}

/// When a certificate is valid, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not before.
    pub not_before: u64,
    /// Not after.
    pub not_after: u64,
}

impl Validity {
    /// Issued at `now` for `lifetime`.
    pub fn from_now(now: u64, lifetime: Duration) -> Self {
        Validity {
            not_before: now.saturating_sub(CLOCK_SKEW.as_secs()),
            not_after: now.saturating_add(lifetime.as_secs()),
        }
    }
}

/// Whether a certificate that expires at `not_after`, issued for `lifetime`, is due for
/// renewal at `now` (Unix seconds): a third of its lifetime or less is left, or it is gone.
pub fn renewal_due(not_after: u64, lifetime: Duration, now: u64) -> bool {
    now.saturating_add(lifetime.as_secs() / 3) >= not_after
}

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
    /// A validity time that cannot be written in a certificate.
    #[error("certificate validity out of range: {0}")]
    Time(String),
    /// An issued certificate that is not what was asked for.
    #[error("{0}")]
    NotIssuedAsAsked(String),
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

fn unix_time(secs: u64) -> Result<time::OffsetDateTime, TlsError> {
    let secs = i64::try_from(secs).map_err(|e| TlsError::Time(e.to_string()))?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| TlsError::Time(e.to_string()))
}

/// Issues a node certificate for `node_id` in `role` (see the module docs for what each role's
/// says) and the node's own P-256 public key `public_raw` (uncompressed point), signed by `ca`,
/// valid for `validity`.
pub fn sign_node_cert(
    ca: &CaMaterial,
    node_id: &NodeId,
    role: Role,
    public_raw: &[u8],
    validity: Validity,
) -> Result<Vec<u8>, TlsError> {
    if public_raw.len() != P256_RAW_LEN || public_raw[0] != 4 {
        return Err(TlsError::BadPublicKey(public_raw.len()));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    // rcgen signs with the issuer's name and key; both are what the CA certificate holds.
    let issuer = ca_params().self_signed(&ca_key)?;
    let names = vec![role_unit(role).to_owned(), node_dns_name(node_id)];
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node_id.as_str());
    dn.push(DnType::OrganizationalUnitName, role_unit(role));
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Manager => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Worker => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.not_before = unix_time(validity.not_before)?;
    params.not_after = unix_time(validity.not_after)?;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&RawP256(public_raw), &issuer, &ca_key)?;
    Ok(cert.der().to_vec())
}

/// Makes a key pair here and issues its certificate: for the node that runs `init`, which is
/// its own CA.
pub fn issue_node_cert(
    ca: &CaMaterial,
    node_id: &NodeId,
    role: Role,
    validity: Validity,
) -> Result<Issued, TlsError> {
    let key = NodeKey::generate()?;
    Ok(Issued {
        cert_der: sign_node_cert(ca, node_id, role, &key.public_raw(), validity)?,
        key_pem: key.private_pem(),
    })
}

/// The node ID and role a certificate names (its DNS names `node-<node ID>` and
/// `swarm-manager` or `swarm-worker`). Read it only from a certificate already verified
/// against the cluster CA.
pub fn cert_identity(der: &[u8]) -> Option<(NodeId, Role)> {
    let der = CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    let mut id = None;
    let mut role = None;
    for name in cert.valid_dns_names() {
        let found = if let Some(n) = name.strip_prefix("node-") {
            id.replace(n.parse::<NodeId>().ok()?).is_some()
        } else if name == role_unit(Role::Manager) {
            role.replace(Role::Manager).is_some()
        } else if name == role_unit(Role::Worker) {
            role.replace(Role::Worker).is_some()
        } else {
            false
        };
        if found {
            return None; // a name twice: not one of ours
        }
    }
    Some((id?, role?))
}

/// Checks a certificate the manager issued to this node before it is kept: it chains to the
/// cluster CA, is valid now, is for client use, and names `node_id` in `role`.
pub fn verify_issued(
    ca_der: &[u8],
    cert_der: &[u8],
    node_id: &NodeId,
    role: Role,
) -> Result<(), TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider()).build()?;
    verifier
        .verify_client_cert(&CertificateDer::from(cert_der), &[], UnixTime::now())
        .map_err(|e| {
            TlsError::NotIssuedAsAsked(format!("it does not verify under the cluster CA: {e}"))
        })?;
    match cert_identity(cert_der) {
        Some((id, r)) if &id == node_id && r == role => Ok(()),
        Some((id, r)) => Err(TlsError::NotIssuedAsAsked(format!(
            "it names node {id} as a {} instead of node {node_id} as a {}",
            r.as_str(),
            role.as_str()
        ))),
        None => Err(TlsError::NotIssuedAsAsked("it names no node ID".to_owned())),
    }
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

/// A member's client configuration for its manager: the cluster CA as the only root, its node
/// certificate as client identity, and only a manager certificate naming `manager` (the view's
/// leader) accepted from the server.
pub fn manager_client_config(
    ca_der: &[u8],
    node: &Issued,
    manager: &NodeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_der)?, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let expected = rustls::pki_types::DnsName::try_from(node_dns_name(manager))
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(Verifier {
        check: Arc::new(ManagerCert {
            inner,
            expected: ServerName::DnsName(expected),
        }),
        provider: provider.clone(),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            vec![CertificateDer::from(node.cert_der.clone())],
            private_key(&node.key_pem)?,
        )?;
    Ok(Arc::new(config))
}

/// Accepts only a manager certificate (server name `swarm-manager`, server use, chained to the
/// cluster CA, valid now) that also names the expected manager node.
#[derive(Debug)]
struct ManagerCert {
    inner: Arc<WebPkiServerVerifier>,
    expected: ServerName<'static>,
}

impl CheckServer for ManagerCert {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            &self.expected,
            ocsp_response,
            now,
        )
    }
}

/// How a server certificate is checked; [`Verifier`] adds the signature checks, which are the
/// provider's for every verifier here.
trait CheckServer: std::fmt::Debug + Send + Sync {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error>;
}

/// A rustls server certificate verifier from a [`CheckServer`] and the crypto provider.
#[derive(Debug)]
struct Verifier<C> {
    check: Arc<C>,
    provider: Arc<CryptoProvider>,
}

impl<C: CheckServer> ServerCertVerifier for Verifier<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check
            .check(end_entity, intermediates, server_name, ocsp_response, now)
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

/// A joining node's client configuration: trust only a manager whose chain holds the CA
/// with `digest`. The returned verifier says afterwards why a handshake failed on that.
pub fn join_client_config(
    digest: CaDigest,
) -> Result<(Arc<ClientConfig>, Arc<PinnedCa>), TlsError> {
    let provider = provider();
    let pinned = Arc::new(PinnedCa {
        digest,
        provider: provider.clone(),
        failure: Mutex::new(None),
        leaf: Mutex::new(None),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier {
            check: pinned.clone(),
            provider: pinned.provider.clone(),
        }))
        .with_no_client_auth();
    Ok((Arc::new(config), pinned))
}

/// The server name to connect with.
#[expect(
    clippy::unwrap_used,
    reason = "SERVER_NAME is a constant valid DNS name (the test server_name_is_valid checks it)"
)]
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(SERVER_NAME)
            .unwrap()
            .to_owned(),
    )
}

/// Why a joining node refused the manager's certificate chain (see [`PinnedCa`]). Each says
/// what was wrong and what to check; the join's error puts the server's address before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinFailure {
    /// No certificate in the chain has the token's CA digest.
    #[error("does not hold the swarm CA named in the token: the token is for another swarm, or the address is wrong")]
    OtherSwarm,
    /// The chain holds the token's CA, but the server's own certificate is not signed by it.
    #[error("shows the swarm CA named in the token, but its own certificate is not signed by that CA: it is not this swarm's manager (check the address)")]
    NotSignedByCa,
    /// A certificate of the swarm, past its end.
    #[error("presents a certificate of this swarm that expired at {not_after} (Unix time; this node's clock says {now}): the manager has not renewed it, or one of the two clocks is wrong")]
    Expired {
        /// The certificate's end, Unix seconds.
        not_after: u64,
        /// This node's clock, Unix seconds.
        now: u64,
    },
    /// A certificate of the swarm, before its start.
    #[error("presents a certificate of this swarm that is valid only from {not_before} (Unix time; this node's clock says {now}): one of the two clocks is wrong")]
    NotYetValid {
        /// The certificate's start, Unix seconds.
        not_before: u64,
        /// This node's clock, Unix seconds.
        now: u64,
    },
    /// Signed by the token's CA, but not for the manager's name or server use (a worker's).
    #[error("presents a certificate of this swarm that is not a manager's (a worker's?): check the manager address")]
    NotManager,
    /// Anything else the certificate check refused.
    #[error("presents a certificate chain that does not verify ({0})")]
    Other(String),
}

/// Server certificate verifier pinned to the CA digest from a join token: the chain must hold
/// that CA, and the leaf must be a manager certificate it signed, valid now.
#[derive(Debug)]
pub struct PinnedCa {
    digest: CaDigest,
    provider: Arc<CryptoProvider>,
    failure: Mutex<Option<PinFailure>>,
    leaf: Mutex<Option<Vec<u8>>>,
}

impl PinnedCa {
    /// Why the last handshake failed on the pinned chain, if it did.
    pub fn failure(&self) -> Option<PinFailure> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The manager certificate the last handshake accepted, to check once the node list says
    /// which node is the manager.
    pub fn accepted_leaf(&self) -> Option<Vec<u8>> {
        self.leaf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn refuse(&self, failure: PinFailure, error: rustls::Error) -> rustls::Error {
        *self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(failure);
        error
    }
}

impl CheckServer for PinnedCa {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let unknown = || rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let Some(ca) = intermediates
            .iter()
            .find(|c| CaDigest::of(c.as_ref()) == self.digest)
        else {
            return Err(self.refuse(PinFailure::OtherSwarm, unknown()));
        };
        let mut roots = RootCertStore::empty();
        if let Err(e) = roots.add(ca.clone().into_owned()) {
            // The certificate with the token's digest is not a usable CA certificate.
            return Err(self.refuse(PinFailure::Other(e.to_string()), unknown()));
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verify = |at: UnixTime| {
            verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, at)
        };
        match verify(now) {
            Ok(ok) => {
                *self
                    .leaf
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(end_entity.as_ref().to_vec());
                Ok(ok)
            }
            Err(e) => Err(self.refuse(pin_failure(&e, now, verify), e)),
        }
    }
}

/// What a refusal of the pinned chain means. A certificate outside its validity is checked
/// again at its own end (or start): only one the token's CA signed, for the manager, is
/// reported as expired (or not yet valid); another is reported for what else is wrong.
fn pin_failure(
    error: &rustls::Error,
    now: UnixTime,
    verify_at: impl Fn(UnixTime) -> Result<ServerCertVerified, rustls::Error>,
) -> PinFailure {
    let now = now.as_secs();
    let (at, outside) = match error {
        rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
            not_after, ..
        }) => (
            *not_after,
            PinFailure::Expired {
                not_after: not_after.as_secs(),
                now,
            },
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext {
            not_before,
            ..
        }) => (
            *not_before,
            PinFailure::NotYetValid {
                not_before: not_before.as_secs(),
                now,
            },
        ),
        other => return untimed_failure(other),
    };
    match verify_at(at) {
        Ok(_) => outside,
        Err(e) => untimed_failure(&e),
    }
}

fn untimed_failure(error: &rustls::Error) -> PinFailure {
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => PinFailure::NotSignedByCa,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. }
            | CertificateError::InvalidPurpose
            | CertificateError::InvalidPurposeContext { .. },
        ) => PinFailure::NotManager,
        other => PinFailure::Other(other.to_string()),
    }
}

/// The cluster CA: certificate (public) and key (manager-only).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaMaterial {
    /// CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// CA private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaMaterial(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn valid() -> Validity {
        Validity::from_now(now(), DEFAULT_CERT_EXPIRY)
    }

    fn cert(ca: &CaMaterial, n: u128, role: Role) -> Issued {
        issue_node_cert(ca, &NodeId::from_random(n), role, valid()).unwrap()
    }

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
            .check(
                &CertificateDer::from(leaf.to_vec()),
                &inter,
                &server_name(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    /// What a joining node pinned to `ca` says of a server that shows `leaf` and `chain`.
    fn pin(ca: &CaMaterial, leaf: &[u8], chain: &[&[u8]]) -> Result<Vec<u8>, PinFailure> {
        let (_, pinned) = join_client_config(CaDigest::of(&ca.cert_der)).unwrap();
        if verify(&pinned, leaf, chain) {
            assert_eq!(pinned.failure(), None);
            Ok(pinned.accepted_leaf().unwrap())
        } else {
            assert_eq!(pinned.accepted_leaf(), None);
            Err(pinned.failure().expect("a refusal says why"))
        }
    }

    fn at(not_before: u64, not_after: u64) -> Validity {
        Validity {
            not_before,
            not_after,
        }
    }

    #[test]
    fn pinned_ca_accepts_only_a_manager_of_the_right_ca() {
        let ca = generate_ca().unwrap();
        let other = generate_ca().unwrap();
        let leaf = cert(&ca, 1, Role::Manager);
        let forged = cert(&other, 1, Role::Manager);

        assert_eq!(pin(&ca, &leaf.cert_der, &[&ca.cert_der]), Ok(leaf.cert_der));
        // No CA in the chain, or another swarm's CA and leaf.
        assert_eq!(pin(&ca, &forged.cert_der, &[]), Err(PinFailure::OtherSwarm));
        assert_eq!(
            pin(&ca, &forged.cert_der, &[&other.cert_der]),
            Err(PinFailure::OtherSwarm)
        );
        // The right CA in the chain but a leaf signed by another CA.
        assert_eq!(
            pin(&ca, &forged.cert_der, &[&ca.cert_der]),
            Err(PinFailure::NotSignedByCa)
        );
        // A worker's certificate, signed by the right CA: not a manager.
        let worker = cert(&ca, 2, Role::Worker);
        assert_eq!(
            pin(&ca, &worker.cert_der, &[&ca.cert_der]),
            Err(PinFailure::NotManager)
        );
    }

    /// A certificate outside its validity is reported as such only if it is otherwise right:
    /// a manager's, signed by the token's CA.
    #[test]
    fn pinned_ca_says_when_a_certificate_is_out_of_date() {
        let ca = generate_ca().unwrap();
        let other = generate_ca().unwrap();
        let now = now();
        let manager = |ca, v| issue_node_cert(ca, &NodeId::from_random(1), Role::Manager, v);
        let expired = manager(&ca, at(1_000, 2_000)).unwrap();
        match pin(&ca, &expired.cert_der, &[&ca.cert_der]) {
            Err(PinFailure::Expired { not_after, now: n }) => {
                assert_eq!(not_after, 2_000);
                assert!(n >= now, "{n} {now}");
            }
            other => panic!("{other:?}"),
        }
        let early = manager(&ca, at(now + 10_000, now + 20_000)).unwrap();
        assert!(matches!(
            pin(&ca, &early.cert_der, &[&ca.cert_der]),
            Err(PinFailure::NotYetValid { not_before, .. }) if not_before == now + 10_000
        ));
        // Expired, and also not a manager's or not signed by the CA: that is what is said.
        let old_worker =
            issue_node_cert(&ca, &NodeId::from_random(2), Role::Worker, at(1_000, 2_000)).unwrap();
        assert_eq!(
            pin(&ca, &old_worker.cert_der, &[&ca.cert_der]),
            Err(PinFailure::NotManager)
        );
        let old_forged = manager(&other, at(1_000, 2_000)).unwrap();
        assert_eq!(
            pin(&ca, &old_forged.cert_der, &[&ca.cert_der]),
            Err(PinFailure::NotSignedByCa)
        );
    }

    /// Each failure's line says what failed, in words an operator can act on.
    #[test]
    fn pin_failures_say_what_failed() {
        for (failure, words) in [
            (PinFailure::OtherSwarm, "the token is for another swarm"),
            (PinFailure::NotSignedByCa, "not signed by that CA"),
            (
                PinFailure::Expired {
                    not_after: 2_000,
                    now: 3_000,
                },
                "expired at 2000 (Unix time; this node's clock says 3000)",
            ),
            (
                PinFailure::NotYetValid {
                    not_before: 4_000,
                    now: 3_000,
                },
                "valid only from 4000 (Unix time; this node's clock says 3000)",
            ),
            (PinFailure::NotManager, "not a manager's"),
            (PinFailure::Other("bad encoding".into()), "bad encoding"),
        ] {
            let line = failure.to_string();
            assert!(line.contains(words), "{line}");
            if failure != PinFailure::OtherSwarm {
                assert!(!line.contains("another swarm"), "{line}");
            }
        }
    }

    #[test]
    fn certificates_name_the_node_and_its_role() {
        let ca = generate_ca().unwrap();
        let m = cert(&ca, 1, Role::Manager);
        let w = cert(&ca, 2, Role::Worker);
        assert_eq!(
            cert_identity(&m.cert_der),
            Some((NodeId::from_random(1), Role::Manager))
        );
        assert_eq!(
            cert_identity(&w.cert_der),
            Some((NodeId::from_random(2), Role::Worker))
        );
        assert_eq!(cert_identity(&ca.cert_der), None);
        assert_eq!(cert_identity(b"junk"), None);
        verify_issued(
            &ca.cert_der,
            &w.cert_der,
            &NodeId::from_random(2),
            Role::Worker,
        )
        .unwrap();
        for (id, role) in [(2, Role::Manager), (3, Role::Worker)] {
            let err = verify_issued(&ca.cert_der, &w.cert_der, &NodeId::from_random(id), role)
                .unwrap_err();
            assert!(matches!(err, TlsError::NotIssuedAsAsked(_)), "{err}");
        }
        let other = generate_ca().unwrap();
        assert!(verify_issued(
            &other.cert_der,
            &w.cert_der,
            &NodeId::from_random(2),
            Role::Worker
        )
        .is_err());
    }

    #[test]
    fn the_node_keeps_its_private_key() {
        let ca = generate_ca().unwrap();
        let key = NodeKey::generate().unwrap();
        let id = NodeId::from_random(3);
        let cert = sign_node_cert(&ca, &id, Role::Manager, &key.public_raw(), valid()).unwrap();
        let node = Issued {
            cert_der: cert,
            key_pem: key.private_pem(),
        };
        // The certificate verifies under the CA and works with the node's own key.
        let (_, pinned) = join_client_config(CaDigest::of(&ca.cert_der)).unwrap();
        assert!(verify(&pinned, &node.cert_der, &[&ca.cert_der]));
        manager_client_config(&ca.cert_der, &node, &id).unwrap();
        server_config(&ca.cert_der, &node).unwrap();
        for bad in [vec![], vec![4; 64], vec![2; 65], vec![4; 66]] {
            assert!(matches!(
                sign_node_cert(&ca, &id, Role::Worker, &bad, valid()),
                Err(TlsError::BadPublicKey(n)) if n == bad.len()
            ));
        }
    }

    #[test]
    fn configs_build_from_issued_material() {
        let ca = generate_ca().unwrap();
        let leaf = cert(&ca, 2, Role::Worker);
        server_config(&ca.cert_der, &leaf).unwrap();
        manager_client_config(&ca.cert_der, &leaf, &NodeId::from_random(1)).unwrap();
        let broken = Issued {
            cert_der: leaf.cert_der.clone(),
            key_pem: "garbage".into(),
        };
        assert!(server_config(&ca.cert_der, &broken).is_err());
    }

    #[test]
    fn renewal_is_due_with_a_third_left() {
        let life = Duration::from_secs(900);
        let v = Validity::from_now(1_000_000, life);
        assert_eq!(v.not_after, 1_000_900);
        assert_eq!(v.not_before, 1_000_000 - CLOCK_SKEW.as_secs());
        assert!(!renewal_due(v.not_after, life, 1_000_000));
        assert!(!renewal_due(v.not_after, life, 1_000_599));
        assert!(renewal_due(v.not_after, life, 1_000_600));
        assert!(renewal_due(v.not_after, life, 2_000_000));
        // A record with no expiry (older agents): due at once.
        assert!(renewal_due(0, life, 1));
    }

    /// A TLS handshake in memory: `server` serves, a member with `client` credentials connects
    /// expecting manager `expected`.
    async fn handshake(ca: &CaMaterial, server: &Issued, client: &Issued, expected: u128) -> bool {
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor =
            tokio_rustls::TlsAcceptor::from(server_config(&ca.cert_der, server).unwrap());
        let connector = tokio_rustls::TlsConnector::from(
            manager_client_config(&ca.cert_der, client, &NodeId::from_random(expected)).unwrap(),
        );
        let srv = tokio::spawn(async move { acceptor.accept(a).await.is_ok() });
        let ok = connector.connect(server_name(), b).await.is_ok();
        let _ = srv.await;
        ok
    }

    #[tokio::test]
    async fn members_accept_only_the_manager_they_expect() {
        let ca = generate_ca().unwrap();
        let leader = cert(&ca, 1, Role::Manager);
        let other_manager = cert(&ca, 3, Role::Manager);
        let worker = cert(&ca, 2, Role::Worker);
        assert!(handshake(&ca, &leader, &worker, 1).await);
        // A worker's certificate cannot serve the manager API.
        assert!(!handshake(&ca, &worker, &worker, 2).await);
        assert!(!handshake(&ca, &worker, &leader, 2).await);
        // A manager certificate, but not of the manager this node expects.
        assert!(!handshake(&ca, &other_manager, &worker, 1).await);
        // An expired manager certificate.
        let old = issue_node_cert(
            &ca,
            &NodeId::from_random(1),
            Role::Manager,
            Validity {
                not_before: 1_000,
                not_after: 2_000,
            },
        )
        .unwrap();
        assert!(!handshake(&ca, &old, &worker, 1).await);
    }
}
