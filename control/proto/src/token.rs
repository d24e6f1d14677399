//! Join tokens: `SWMTKN-1-<CA digest>-<secret>`, as docker swarm writes them.
//!
//! The digest is the SHA-256 of the cluster CA certificate (DER), written in lowercase base 36
//! and zero-padded to 50 characters. The joining node pins the manager's CA with it before it
//! sends anything. The secret is 128 random bits in lowercase base 36, 25 characters; one per
//! role, and it is what the manager checks.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::id::{decode_base36, encode_base36, is_base36, ID_LEN};

/// The fixed first part of every token.
pub const PREFIX: &str = "SWMTKN";
/// The only token version there is.
pub const VERSION: &str = "1";
/// Length of the CA digest part.
pub const DIGEST_LEN: usize = 50;
/// Length of the secret part.
pub const SECRET_LEN: usize = ID_LEN;

/// SHA-256 of a CA certificate in DER form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaDigest(pub [u8; 32]);

impl CaDigest {
    /// The digest of `ca_der`.
    pub fn of(ca_der: &[u8]) -> Self {
        Self(Sha256::digest(ca_der).into())
    }
}

impl fmt::Display for CaDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_base36(&self.0, DIGEST_LEN))
    }
}

impl fmt::Debug for CaDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaDigest({self})")
    }
}

/// A join secret: 25 lowercase base-36 characters.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret made from 128 random bits (pass them from a CSPRNG).
    pub fn from_random(bits: u128) -> Self {
        Self(encode_base36(&bits.to_be_bytes(), SECRET_LEN))
    }

    /// The secret as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in time that does not depend on where the strings differ.
    pub fn matches(&self, other: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), other.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Token {
    /// Digest of the cluster CA the manager must present.
    pub ca_digest: CaDigest,
    /// The role secret.
    pub secret: Secret,
}

/// Why a string is not a join token. Every variant means: nothing was sent anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token does not start with `SWMTKN`.
    #[error("invalid join token: it must start with SWMTKN-; copy the whole token that `shoal join-token worker` prints on a manager")]
    Prefix,
    /// The token does not have four dash-separated parts.
    #[error("invalid join token: expected SWMTKN-1-<digest>-<secret>, found {0} dash-separated parts; copy the whole token")]
    Parts(usize),
    /// The version part is not `1`.
    #[error("invalid join token: unsupported version {0:?} (only 1 is known); get a new token with `shoal join-token`")]
    Version(String),
    /// The digest part has the wrong length.
    #[error("invalid join token: the CA digest has {0} characters, expected 50; the token is truncated or altered")]
    DigestLength(usize),
    /// The digest part has a character outside `[0-9a-z]`.
    #[error("invalid join token: the CA digest has characters other than 0-9 and a-z; the token is altered")]
    DigestCharset,
    /// The digest part is not a 256-bit number.
    #[error("invalid join token: the CA digest is larger than a SHA-256; the token is altered")]
    DigestRange,
    /// The secret part has the wrong length.
    #[error("invalid join token: the secret has {0} characters, expected 25; the token is truncated or altered")]
    SecretLength(usize),
    /// The secret part has a character outside `[0-9a-z]`.
    #[error("invalid join token: the secret has characters other than 0-9 and a-z; the token is altered")]
    SecretCharset,
}

impl Token {
    /// Parses a token, with an exact error for every malformed case.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if !text.starts_with(PREFIX) {
            return Err(TokenError::Prefix);
        }
        let parts: Vec<&str> = text.split('-').collect();
        if parts[0] != PREFIX {
            return Err(TokenError::Prefix);
        }
        if parts.len() != 4 {
            return Err(TokenError::Parts(parts.len()));
        }
        let (version, digest, secret) = (parts[1], parts[2], parts[3]);
        if version != VERSION {
            return Err(TokenError::Version(version.to_owned()));
        }
        if digest.len() != DIGEST_LEN {
            return Err(TokenError::DigestLength(digest.len()));
        }
        if !is_base36(digest) {
            return Err(TokenError::DigestCharset);
        }
        let digest = decode_base36::<32>(digest).ok_or(TokenError::DigestRange)?;
        if secret.len() != SECRET_LEN {
            return Err(TokenError::SecretLength(secret.len()));
        }
        if !is_base36(secret) {
            return Err(TokenError::SecretCharset);
        }
        Ok(Self {
            ca_digest: CaDigest(digest),
            secret: Secret(secret.to_owned()),
        })
    }

    /// The secret, checked to be well-formed, for a state file or an API message.
    pub fn parse_secret(text: &str) -> Result<Secret, TokenError> {
        if text.len() != SECRET_LEN {
            return Err(TokenError::SecretLength(text.len()));
        }
        if !is_base36(text) {
            return Err(TokenError::SecretCharset);
        }
        Ok(Secret(text.to_owned()))
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}-{VERSION}-{}-{}",
            self.ca_digest,
            self.secret.as_str()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "17kzaepw2mumbb2qjtxw216kjkno1q3j7psyst3quyryhyrmly";
    const SECRET: &str = "0000000000002lsohxawjui8i";
    const GOLDEN: &str =
        "SWMTKN-1-17kzaepw2mumbb2qjtxw216kjkno1q3j7psyst3quyryhyrmly-0000000000002lsohxawjui8i";

    #[test]
    fn golden_token() {
        let token = Token {
            ca_digest: CaDigest::of(b"shoal test ca"),
            secret: Secret::from_random(12_345_678_901_234_567_890),
        };
        assert_eq!(token.to_string(), GOLDEN);
        assert_eq!(Token::parse(GOLDEN), Ok(token.clone()));
        assert_eq!(Token::parse(&format!("  {GOLDEN}\n")), Ok(token));
    }

    #[test]
    fn round_trip_extremes() {
        for digest in [[0u8; 32], [0xff; 32]] {
            let token = Token {
                ca_digest: CaDigest(digest),
                secret: Secret::from_random(u128::MAX),
            };
            let text = token.to_string();
            assert_eq!(text.len(), 6 + 1 + 1 + 1 + 50 + 1 + 25);
            assert_eq!(Token::parse(&text), Ok(token));
        }
    }

    #[test]
    fn every_malformed_case() {
        let cases: Vec<(String, TokenError)> = vec![
            (String::new(), TokenError::Prefix),
            (format!("SWMTKX-1-{DIGEST}-{SECRET}"), TokenError::Prefix),
            (format!("swmtkn-1-{DIGEST}-{SECRET}"), TokenError::Prefix),
            (format!("SWMTKNX-1-{DIGEST}-{SECRET}"), TokenError::Prefix),
            (format!("SWMTKN-1-{DIGEST}"), TokenError::Parts(3)),
            (
                format!("SWMTKN-1-{DIGEST}-{SECRET}-x"),
                TokenError::Parts(5),
            ),
            (
                format!("SWMTKN-2-{DIGEST}-{SECRET}"),
                TokenError::Version("2".into()),
            ),
            (
                format!("SWMTKN--{DIGEST}-{SECRET}"),
                TokenError::Version(String::new()),
            ),
            (
                format!("SWMTKN-1-{}-{SECRET}", &DIGEST[1..]),
                TokenError::DigestLength(49),
            ),
            (
                format!("SWMTKN-1-{DIGEST}0-{SECRET}"),
                TokenError::DigestLength(51),
            ),
            (
                format!("SWMTKN-1-{}A-{SECRET}", &DIGEST[1..]),
                TokenError::DigestCharset,
            ),
            (
                format!("SWMTKN-1-{}-{SECRET}", "z".repeat(50)),
                TokenError::DigestRange,
            ),
            (
                format!("SWMTKN-1-{DIGEST}-{}", &SECRET[1..]),
                TokenError::SecretLength(24),
            ),
            (
                format!("SWMTKN-1-{DIGEST}-{SECRET}0"),
                TokenError::SecretLength(26),
            ),
            (format!("SWMTKN-1-{DIGEST}-"), TokenError::SecretLength(0)),
            (
                format!("SWMTKN-1-{DIGEST}-{}!", &SECRET[1..]),
                TokenError::SecretCharset,
            ),
            (
                format!("SWMTKN-1-{DIGEST}-{}", SECRET.to_uppercase()),
                TokenError::SecretCharset,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Token::parse(&text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn secret_matching() {
        let s = Secret::from_random(42);
        assert!(s.matches(s.as_str()));
        assert!(!s.matches(Secret::from_random(43).as_str()));
        assert!(!s.matches(""));
        assert!(Token::parse_secret(s.as_str()).is_ok());
        assert_eq!(Token::parse_secret("x"), Err(TokenError::SecretLength(1)));
    }
}
