//! Stored passwords: salted hashes in RabbitMQ's own format.
//!
//! RabbitMQ keeps a password as `base64(salt ++ H(salt ++ password))` with
//! a 4-byte random salt, and names `H` by its hashing module
//! (`rabbit_password_hashing_sha256`, `_sha512`). wasmq keeps exactly that,
//! so a definitions export of RabbitMQ imports here and its users log in
//! with their old passwords, and an export of wasmq imports into RabbitMQ.
//! New passwords are hashed with SHA-256, RabbitMQ's default. MD5 (the
//! format of RabbitMQ before 3.6) is refused on import: such a user must be
//! given a new password. The comparison runs in constant time.

use base64::Engine as _;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

/// RabbitMQ's salt length.
const SALT: usize = 4;

/// A hash function RabbitMQ names in `hashing_algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// `rabbit_password_hashing_sha256` (RabbitMQ's default).
    Sha256,
    /// `rabbit_password_hashing_sha512`.
    Sha512,
}

impl Algorithm {
    /// RabbitMQ's name of it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "rabbit_password_hashing_sha256",
            Algorithm::Sha512 => "rabbit_password_hashing_sha512",
        }
    }

    /// The algorithm RabbitMQ names `name`.
    pub fn from_name(name: &str) -> Result<Algorithm, String> {
        match name {
            "rabbit_password_hashing_sha256" | "" => Ok(Algorithm::Sha256),
            "rabbit_password_hashing_sha512" => Ok(Algorithm::Sha512),
            "rabbit_password_hashing_md5" => Err(
                "rabbit_password_hashing_md5 is not accepted (MD5 is broken): give the user a new password"
                    .into(),
            ),
            other => Err(format!(
                "unknown hashing_algorithm '{}' (rabbit_password_hashing_sha256 or rabbit_password_hashing_sha512)",
                crate::untrusted::text(other)
            )),
        }
    }

    fn digest(self, salt: &[u8], password: &[u8]) -> Vec<u8> {
        match self {
            Algorithm::Sha256 => Sha256::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
            Algorithm::Sha512 => Sha512::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
        }
    }

    fn digest_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

/// A user's stored password (or none: such a user logs in only with a
/// client certificate, as a RabbitMQ user with an empty hash).
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    algorithm: Algorithm,
    /// Salt then digest; empty for no password.
    bytes: Vec<u8>,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordHash")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl PasswordHash {
    /// Hash `password` with a new random salt (SHA-256).
    pub fn new(password: &str) -> PasswordHash {
        let mut salt = [0u8; SALT];
        getrandom::fill(&mut salt).expect("the OS has randomness");
        PasswordHash::with_salt(Algorithm::Sha256, salt, password)
    }

    fn with_salt(algorithm: Algorithm, salt: [u8; SALT], password: &str) -> PasswordHash {
        let mut bytes = salt.to_vec();
        bytes.extend(algorithm.digest(&salt, password.as_bytes()));
        PasswordHash { algorithm, bytes }
    }

    /// No password: only a certificate logs this user in.
    pub fn none() -> PasswordHash {
        PasswordHash {
            algorithm: Algorithm::Sha256,
            bytes: Vec::new(),
        }
    }

    /// A hash as RabbitMQ writes it (`password_hash`, base64) with its
    /// `hashing_algorithm`. An empty hash is no password.
    pub fn from_rabbitmq(hash: &str, algorithm: &str) -> Result<PasswordHash, String> {
        let algorithm = Algorithm::from_name(algorithm)?;
        if hash.is_empty() {
            return Ok(PasswordHash {
                algorithm,
                bytes: Vec::new(),
            });
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(hash)
            .map_err(|e| format!("password_hash is not base64: {e}"))?;
        let want = SALT + algorithm.digest_len();
        if bytes.len() != want {
            return Err(format!(
                "password_hash has {} bytes; {} holds a {SALT}-byte salt and a {}-byte digest ({want} bytes)",
                bytes.len(),
                algorithm.name(),
                algorithm.digest_len()
            ));
        }
        Ok(PasswordHash { algorithm, bytes })
    }

    /// The hash as RabbitMQ writes it: `password_hash` (base64) and
    /// `hashing_algorithm`.
    pub fn to_rabbitmq(&self) -> (String, &'static str) {
        (
            base64::engine::general_purpose::STANDARD.encode(&self.bytes),
            self.algorithm.name(),
        )
    }

    /// Whether this is a password at all.
    pub fn is_set(&self) -> bool {
        !self.bytes.is_empty()
    }

    /// Whether `password` is the password, compared in constant time.
    pub fn verify(&self, password: &str) -> bool {
        if self.bytes.len() < SALT {
            return false;
        }
        let (salt, digest) = self.bytes.split_at(SALT);
        let candidate = self.algorithm.digest(salt, password.as_bytes());
        bool::from(candidate.ct_eq(digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmqs_own_hashes_verify() {
        // The example of RabbitMQ's documentation ("Computing Password
        // Hash"): the password test12, SHA-256.
        let h = PasswordHash::from_rabbitmq(
            "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR",
            "rabbit_password_hashing_sha256",
        )
        .unwrap();
        assert!(h.verify("test12"));
        assert!(!h.verify("test13"));
        assert!(!h.verify(""));
    }

    #[test]
    fn sha512_hashes_round_trip_and_new_ones_are_salted() {
        let h = PasswordHash::with_salt(Algorithm::Sha512, [1, 2, 3, 4], "s3cret");
        let (text, name) = h.to_rabbitmq();
        assert_eq!(name, "rabbit_password_hashing_sha512");
        let back = PasswordHash::from_rabbitmq(&text, name).unwrap();
        assert!(back.verify("s3cret") && !back.verify("s3cres"));
        let (a, b) = (PasswordHash::new("pw"), PasswordHash::new("pw"));
        assert_ne!(a.to_rabbitmq().0, b.to_rabbitmq().0, "a fresh salt each");
        assert!(a.verify("pw") && b.verify("pw"));
    }

    #[test]
    fn bad_hashes_name_what_is_wrong() {
        let e = PasswordHash::from_rabbitmq("AAAA", "rabbit_password_hashing_sha256").unwrap_err();
        assert!(e.contains("3 bytes"), "{e}");
        let e = PasswordHash::from_rabbitmq("%%%", "rabbit_password_hashing_sha256").unwrap_err();
        assert!(e.contains("not base64"), "{e}");
        let e = PasswordHash::from_rabbitmq("x", "rabbit_password_hashing_md5").unwrap_err();
        assert!(e.contains("MD5"), "{e}");
        let e = PasswordHash::from_rabbitmq("x", "bcrypt").unwrap_err();
        assert!(e.contains("unknown hashing_algorithm 'bcrypt'"), "{e}");
        // An empty hash: no password, nothing verifies.
        let none = PasswordHash::from_rabbitmq("", "").unwrap();
        assert!(!none.is_set() && !none.verify(""));
    }
}
