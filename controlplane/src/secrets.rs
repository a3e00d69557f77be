//! Instance secrets: the admin secret replicas accept and the credential secret that encrypts
//! flow credentials. They are not stored: they are derived from the platform key in
//! `<data-dir>/secret-key` (32 random bytes, created at first start, mode 0600) and the instance
//! id. A restart or an upgrade of Tandem derives the same ones, so running replicas are adopted
//! and their credentials still decrypt.
//!
//! What must be stored but never shown (secret variables, custom hostnames' private keys) is
//! sealed with a key derived the same way ([`PlatformKey::seal`]).

use std::path::Path;

use anyhow::Context;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

/// The key instance secrets are derived from.
#[derive(Clone)]
pub struct PlatformKey([u8; 32]);

impl std::fmt::Debug for PlatformKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlatformKey(..)")
    }
}

impl PlatformKey {
    /// Reads `<data_dir>/secret-key`, creating it on first use.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("secret-key");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let bytes = decode_hex(text.trim())
                .filter(|b| b.len() == 32)
                .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
            let mut key = [0; 32];
            key.copy_from_slice(&bytes);
            return Ok(Self(key));
        }
        let mut key = [0; 32];
        getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        std::fs::create_dir_all(data_dir)?;
        crate::serve_cmd::write_private(&path, &format!("{}\n", crate::store::hex(&key)))?;
        Ok(Self(key))
    }

    /// The key in `path` (64 hex digits, as `<data-dir>/secret-key`): `--platform-key-file`, for
    /// control planes that share a database.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the platform key file {}", path.display()))?;
        let bytes = decode_hex(text.trim())
            .filter(|b| b.len() == 32)
            .with_context(|| format!("{} is not 64 hex digits", path.display()))?;
        let mut key = [0; 32];
        key.copy_from_slice(&bytes);
        Ok(Self(key))
    }

    /// The key as 64 hex digits, for a backup.
    pub fn to_hex(&self) -> String {
        crate::store::hex(&self.0)
    }

    /// Checks the key against the database's `key_check`, recording it on first use: a control
    /// plane with another key than the database's secrets were made with refuses to start.
    pub async fn check_against(&self, store: &crate::store::Store) -> anyhow::Result<()> {
        use sqlx::Row as _;
        let mine = self.derive("key-check", "platform");
        // The first control plane records its key's check; one starting at the same time
        // finds it.
        sqlx::query(
            "INSERT INTO platform_meta (name, value) VALUES ('key_check', $1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&mine)
        .execute(&store.pool)
        .await?;
        let stored: String =
            sqlx::query("SELECT value FROM platform_meta WHERE name = 'key_check'")
                .fetch_one(&store.pool)
                .await?
                .get(0);
        if stored != mine {
            anyhow::bail!(
                "the platform key does not match this database's: its instances' secrets were made with another key. Every control plane on one database needs the same key (--platform-key-file, 64 hex digits, as <data-dir>/secret-key)"
            );
        }
        Ok(())
    }

    /// A key for tests.
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    /// The secret for `purpose` of instance `id`: SHA-256 over key, purpose and id, in hex.
    pub fn derive(&self, purpose: &str, id: &str) -> String {
        crate::store::hex(&self.derive_bytes(purpose, id))
    }

    /// [`PlatformKey::derive`] as bytes: a 256-bit key for `purpose` of instance `id`.
    pub fn derive_bytes(&self, purpose: &str, id: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(purpose.as_bytes());
        h.update([0]);
        h.update(id.as_bytes());
        h.finalize().into()
    }

    /// Seals `value` for `purpose` of instance `id`, bound to `aad` (what it is the value of):
    /// XChaCha20-Poly1305 under [`PlatformKey::derive_bytes`]`(purpose, id)` with a fresh
    /// 24-byte nonce. Returns the hex of nonce and ciphertext. A sealed value opens only for the
    /// same purpose, instance and `aad`.
    pub fn seal(&self, purpose: &str, id: &str, aad: &str, value: &str) -> anyhow::Result<String> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let sealed = self
            .cipher(purpose, id)
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| anyhow::anyhow!("cannot seal {aad} of {id}"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(crate::store::hex(&out))
    }

    /// Opens what [`PlatformKey::seal`] sealed; `None` when it does not open (another purpose's,
    /// instance's or `aad`'s, another key's, or damaged).
    pub fn open(&self, purpose: &str, id: &str, aad: &str, sealed: &str) -> Option<String> {
        let bytes = decode_hex(sealed)?;
        if bytes.len() < 24 {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(24);
        let plain = self
            .cipher(purpose, id)
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
    }

    fn cipher(&self, purpose: &str, id: &str) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(&self.derive_bytes(purpose, id)))
    }
}

pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
