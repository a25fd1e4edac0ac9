//! Device secrets.
//!
//! A secret is 32 random bytes from the OS, shown once as 64 hex characters. Only its
//! SHA-256 is stored. A slow password hash (argon2, bcrypt) protects low-entropy human
//! passwords from brute force; a 256-bit random secret cannot be brute-forced, and a fast
//! hash lets a connect storm authenticate thousands of devices per second per core.

use sha2::{Digest, Sha256};

use crate::StoreError;

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// A new random secret.
pub fn generate() -> Result<String, StoreError> {
    Ok(hex(&random::<32>()?))
}

/// `N` random bytes from the OS.
pub fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| StoreError::Engine(format!("no randomness from the OS: {e}")))?;
    Ok(bytes)
}

/// `N` random bytes from the OS, as hex.
pub fn random_hex<const N: usize>() -> Result<String, StoreError> {
    Ok(hex(&random::<N>()?))
}

/// What the registry stores for a secret.
pub fn hash(secret: &str) -> String {
    sha256_hex(secret)
}

/// The SHA-256 of `text`, 64 lowercase hex digits.
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Whether `secret` matches `stored_hash`, in constant time.
pub fn verify(secret: &str, stored_hash: &str) -> bool {
    let candidate = hash(secret);
    candidate.len() == stored_hash.len()
        && candidate
            .bytes()
            .zip(stored_hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_verify_only_themselves() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        let h = hash(&a);
        assert!(verify(&a, &h));
        assert!(!verify(&b, &h));
        assert!(!verify("", &h));
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
