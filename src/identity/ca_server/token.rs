//! Bearer tokens kept as SHA-256 digests and compared in constant time.
//!
//! Input: a presented token (the `authorization: Bearer` value) or a stored form: the clear token, or the
//! 64 hex digits of its SHA-256 (what `sha256sum` prints). Output: a [`TokenDigest`]; only digests are kept
//! in memory and compared, so neither a timing difference nor a memory dump gives a token away.

use subtle::ConstantTimeEq;

/// Length of a SHA-256 digest.
const DIGEST_LEN: usize = 32;

/// The SHA-256 of a bearer token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest([u8; DIGEST_LEN]);

impl TokenDigest {
    /// The digest of a clear token.
    pub fn of(token: &str) -> TokenDigest {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(d.as_ref());
        TokenDigest(out)
    }

    /// A digest written as 64 hex digits (either case); anything else is refused with the reason.
    pub fn from_hex(hex: &str) -> Result<TokenDigest, String> {
        let hex = hex.trim();
        if hex.len() != 2 * DIGEST_LEN || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "must be the SHA-256 of the token as {} hex digits (e.g. `printf %s TOKEN | sha256sum`)",
                2 * DIGEST_LEN
            ));
        }
        let mut out = [0u8; DIGEST_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("not hex: {e}"))?;
        }
        Ok(TokenDigest(out))
    }

    /// The digest as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Equality that takes the same time whichever bytes differ.
    pub fn matches(&self, other: &TokenDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// Prints a short prefix only: enough to tell tokens apart in logs.
impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}…", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hex_digest_and_the_clear_token_are_the_same_digest() {
        // printf %s node-1-secret | sha256sum
        let hex = TokenDigest::of("node-1-secret").to_hex();
        assert_eq!(hex.len(), 64);
        let parsed = TokenDigest::from_hex(&hex.to_uppercase()).unwrap();
        assert!(parsed.matches(&TokenDigest::of("node-1-secret")));
        assert!(!parsed.matches(&TokenDigest::of("node-1-secreT")));
        assert_eq!(
            TokenDigest::of("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(TokenDigest::from_hex("abc").is_err());
        assert!(TokenDigest::from_hex(&"g".repeat(64)).is_err());
    }
}
