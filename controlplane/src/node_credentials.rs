//! Node-RED's encrypted credentials, as its runtime stores them: `{"$": "<iv><ciphertext>"}`,
//! where `<iv>` is 16 random bytes as 32 hex characters and `<ciphertext>` is base64 of
//! AES-256-CTR over the JSON of the credentials object, with the raw SHA-256 digest of the
//! instance's credential secret as the key (`@node-red/runtime/lib/nodes/credentials.js`).
//!
//! Tandem stores what the runtime hands its storage module, still encrypted; it decrypts only to
//! move credentials to another secret: snapshot export and import, and pipeline deploys between
//! instances.

use aes::cipher::{KeyIvInit, StreamCipher};
use base64::Engine;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// Why credentials cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// Not `{}`, `{"$": "..."}` nor an object of plain credentials.
    #[error(
        "credentials must be an object, either {{\"$\": \"<encrypted>\"}} or node id → credentials"
    )]
    Shape,
    /// The text after the IV is not base64, or the IV is not hex.
    #[error("the encrypted credentials are not in Node-RED's format (32 hex characters of IV, then base64)")]
    Format,
    /// Decrypted with this secret, they are not JSON: another secret encrypted them.
    #[error("the credentials cannot be decrypted with this credential secret")]
    WrongSecret,
    /// The system gave no random bytes for the IV (reusing one would leak the credentials).
    #[error("no randomness for an IV: {0}")]
    NoRandomness(String),
}

/// The plain credentials of `stored`, decrypted with `secret` when encrypted.
pub fn decrypt(stored: &Value, secret: &str) -> Result<Map<String, Value>, CredentialsError> {
    let obj = stored.as_object().ok_or(CredentialsError::Shape)?;
    let Some(sealed) = obj.get("$") else {
        // Empty, or plain (an instance whose runtime had no credential secret).
        return Ok(obj.clone());
    };
    let text = sealed.as_str().ok_or(CredentialsError::Shape)?;
    if text.len() < 32 || !text.is_char_boundary(32) {
        return Err(CredentialsError::Format);
    }
    let iv = decode_hex(&text[..32]).ok_or(CredentialsError::Format)?;
    let mut data = base64::engine::general_purpose::STANDARD
        .decode(&text[32..])
        .map_err(|_| CredentialsError::Format)?;
    let mut cipher = Aes256Ctr::new(&key(secret).into(), iv.as_slice().into());
    cipher.apply_keystream(&mut data);
    match serde_json::from_slice::<Value>(&data) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(CredentialsError::WrongSecret),
    }
}

/// `plain` encrypted with `secret` under a fresh IV; `{}` when there are none.
pub fn encrypt(plain: &Map<String, Value>, secret: &str) -> Result<Value, CredentialsError> {
    if plain.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    let mut iv = [0u8; 16];
    getrandom::fill(&mut iv).map_err(|e| CredentialsError::NoRandomness(e.to_string()))?;
    let mut data = Value::Object(plain.clone()).to_string().into_bytes();
    let mut cipher = Aes256Ctr::new(&key(secret).into(), (&iv).into());
    cipher.apply_keystream(&mut data);
    let text = format!(
        "{}{}",
        crate::store::hex(&iv),
        base64::engine::general_purpose::STANDARD.encode(data)
    );
    Ok(serde_json::json!({ "$": text }))
}

/// `stored`, encrypted with `from`, encrypted again with `to`.
pub fn reencrypt(stored: &Value, from: &str, to: &str) -> Result<Value, CredentialsError> {
    encrypt(&decrypt(stored, from)?, to)
}

fn key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn decode_hex(s: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_move_from_one_secret_to_another() {
        let plain = json!({ "req": { "user": "u", "password": "p@ss" } });
        let plain = plain.as_object().unwrap().clone();
        let a = encrypt(&plain, "secret-a").unwrap();
        assert_eq!(decrypt(&a, "secret-a").unwrap(), plain);
        assert_eq!(decrypt(&a, "secret-b"), Err(CredentialsError::WrongSecret));
        let b = reencrypt(&a, "secret-a", "secret-b").unwrap();
        assert_ne!(a, b);
        assert_eq!(decrypt(&b, "secret-b").unwrap(), plain);
        // A fresh IV each time.
        assert_ne!(encrypt(&plain, "secret-a").unwrap(), a);
    }

    #[test]
    fn what_node_red_wrote_is_read_and_bad_input_is_named() {
        // Node-RED's own code (Node.js crypto, `aes-256-ctr`, key SHA-256 of "tandem").
        let stored = json!({ "$": "0f8c0b52a1a3c7d9e2f4a6b8c0d2e4f6dQqE5M09JVlrIrRLsuahcoUCS0kaxkIrcrgjbxFZ7KrtwmQLLiw=" });
        assert_eq!(
            Value::Object(decrypt(&stored, "tandem").unwrap()),
            json!({ "req": { "user": "u", "password": "p@ss" } })
        );
        assert_eq!(decrypt(&json!({}), "x").unwrap(), Map::new());
        assert_eq!(decrypt(&json!([1]), "x"), Err(CredentialsError::Shape));
        assert_eq!(
            decrypt(&json!({ "$": "0f8c0b52" }), "x"),
            Err(CredentialsError::Format)
        );
        assert_eq!(
            decrypt(&json!({ "$": "zz8c0b52a1a3c7d9e2f4a6b8c0d2e4f6AAAA" }), "x"),
            Err(CredentialsError::Format)
        );
    }
}
