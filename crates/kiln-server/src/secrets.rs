//! Secrets at rest: BMC passwords are sealed with ChaCha20-Poly1305 under a
//! 256-bit key that lives in a file (mode 0600) the server creates on first
//! start, or at a path the config names. The store only ever sees sealed
//! text; API responses only ever say whether a password is set.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use kiln_store::SealedPassword;
use kiln_types::Secret;

const PREFIX: &str = "v1:";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("cannot create the secret key file {path}")]
    Create {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error(
        "the secret key file {path} does not hold 32 bytes in base64: restore it from backup (sealed BMC passwords need the same key)"
    )]
    BadKey { path: PathBuf },
    #[error("the secret key file {path} is readable by others (mode {mode:o}): chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("a sealed secret cannot be opened with this key (wrong key file, or a damaged record)")]
    Open,
    #[error("the system random number generator failed")]
    Random,
}

/// Seals and opens secrets with the server's key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
    /// For MACs (job tokens): derived from the key, never the key itself.
    mac_key: [u8; 32],
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// Loads the key at `path`, creating it (0600, fresh random key) if it
    /// does not exist yet.
    pub fn load_or_create(path: &Path) -> Result<SecretBox, SecretError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path)
                    .map_err(|err| SecretError::Read { path: path.into(), err })?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(SecretError::Exposed {
                        path: path.into(),
                        mode: mode & 0o777,
                    });
                }
                let key = B64
                    .decode(text.trim())
                    .ok()
                    .filter(|k| k.len() == 32)
                    .ok_or_else(|| SecretError::BadKey { path: path.into() })?;
                Ok(SecretBox::from_key(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|_| SecretError::Random)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|err| SecretError::Create { path: path.into(), err })?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|err| SecretError::Create { path: path.into(), err })?;
                writeln!(f, "{}", B64.encode(key)).map_err(|err| SecretError::Create { path: path.into(), err })?;
                f.sync_all()
                    .map_err(|err| SecretError::Create { path: path.into(), err })?;
                Ok(SecretBox::from_key(&key))
            }
            Err(err) => Err(SecretError::Read { path: path.into(), err }),
        }
    }

    /// A box over a fixed key, for unit tests of what is derived from it.
    #[cfg(test)]
    pub(crate) fn for_tests(key: &[u8]) -> SecretBox {
        SecretBox::from_key(key)
    }

    fn from_key(key: &[u8]) -> SecretBox {
        use sha2::Digest;
        let mac_key = sha2::Sha256::new()
            .chain_update(b"kiln mac key\0")
            .chain_update(key)
            .finalize()
            .into();
        SecretBox {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            mac_key,
        }
    }

    /// HMAC-SHA256 of `msg` under the server's MAC key, URL-safe base64.
    pub fn mac_b64(&self, msg: &[u8]) -> String {
        use hmac::Mac;
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.mac_key).expect("HMAC takes any key length");
        mac.update(msg);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    pub fn seal(&self, secret: &Secret) -> Result<SealedPassword, SecretError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|_| SecretError::Random)?;
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), secret.expose().as_bytes())
            .map_err(|_| SecretError::Open)?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        Ok(SealedPassword(format!("{PREFIX}{}", B64.encode(blob))))
    }

    pub fn open(&self, sealed: &SealedPassword) -> Result<Secret, SecretError> {
        let blob = sealed
            .0
            .strip_prefix(PREFIX)
            .and_then(|b| B64.decode(b).ok())
            .filter(|b| b.len() > 12)
            .ok_or(SecretError::Open)?;
        let (nonce, ct) = blob.split_at(12);
        let pt = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| SecretError::Open)?;
        String::from_utf8(pt).map(Secret::new).map_err(|_| SecretError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let a = SecretBox::load_or_create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let sealed = a.seal(&Secret::new("canary-pw")).unwrap();
        assert!(!sealed.0.contains("canary"));
        let b = SecretBox::load_or_create(&path).unwrap();
        assert_eq!(b.open(&sealed).unwrap().expose(), "canary-pw");
        // Same plaintext, different ciphertext (fresh nonce).
        assert_ne!(a.seal(&Secret::new("canary-pw")).unwrap(), sealed);
    }

    #[test]
    fn wrong_key_or_tampering_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretBox::load_or_create(&dir.path().join("a")).unwrap();
        let b = SecretBox::load_or_create(&dir.path().join("b")).unwrap();
        let sealed = a.seal(&Secret::new("pw")).unwrap();
        assert!(matches!(b.open(&sealed), Err(SecretError::Open)));
        let mut bad = sealed.0.clone();
        bad.push('A');
        assert!(a.open(&SealedPassword(bad)).is_err());
    }

    #[test]
    fn exposed_or_broken_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        SecretBox::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretBox::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "short").unwrap();
        let e = SecretBox::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("32 bytes"), "{e}");
    }
}
