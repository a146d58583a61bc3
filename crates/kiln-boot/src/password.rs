//! Root passwords become SHA-512 crypt hashes (`$6$`) before anything
//! stores or renders them: installers, cloud-init and Ignition all take the
//! hash, so the plaintext is needed only for the moment of hashing.

use kiln_types::Secret;
use kiln_types::install::CryptHash;
use sha_crypt::{PasswordHasher, ShaCrypt};

/// The SHA-512 crypt hash of `plaintext` with a fresh random salt and the
/// default 5,000 rounds (written out as `rounds=5000$`) — what
/// `mkpasswd -m sha-512` makes, and what every
/// Linux `crypt(3)` verifies. More rounds would slow down only the offline
/// attacker who got the hash, but `rounds=` is read by all the consumers
/// too, so keep the default that all of them are tested with.
pub fn hash_root_password(plaintext: &Secret) -> Result<CryptHash, String> {
    if plaintext.expose().is_empty() {
        return Err("the root password is empty".into());
    }
    // 12 random bytes make the full 16-character crypt salt.
    let mut salt = [0u8; 12];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness for the password salt: {e}"))?;
    let hash = ShaCrypt::SHA512
        .hash_password_with_salt(plaintext.expose().as_bytes(), &salt)
        .map_err(|e| format!("hashing the root password failed: {e}"))?;
    hash.as_str()
        .parse()
        .map_err(|e| format!("sha-crypt made a hash kiln does not accept: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha_crypt::PasswordVerifier;

    #[test]
    fn hash_verifies_and_salts_differ() {
        let pw = Secret::new("correct horse battery staple");
        let a = hash_root_password(&pw).unwrap();
        let b = hash_root_password(&pw).unwrap();
        assert!(a.as_str().starts_with("$6$"));
        assert_ne!(a, b, "two hashes of one password share a salt");
        ShaCrypt::SHA512
            .verify_password(pw.expose().as_bytes(), a.as_str())
            .unwrap();
        assert!(ShaCrypt::SHA512.verify_password(b"wrong", a.as_str()).is_err());
        assert!(!a.as_str().contains("horse"));
        assert!(hash_root_password(&Secret::new("")).is_err());
    }

    /// A hash made by another implementation (OpenSSL's `passwd -6`) must
    /// verify too, and ours must verify with OpenSSL: the consumers are
    /// glibc's crypt, not this crate.
    #[test]
    fn agrees_with_openssl() {
        let openssl =
            "$6$saltsalt$8iYtNHxjWRl.NF6oNZ5tF.iKFlQREaXBLlSmZKP6dy9l5z3vsooWNW0/GZ6Nej73/TFug6pIPSqbJoCT6dfnj.";
        ShaCrypt::SHA512.verify_password(b"hunter2", openssl).unwrap();

        let Ok(out) = std::process::Command::new("openssl").arg("version").output() else {
            eprintln!("openssl is not installed: only the fixed vector was checked");
            return;
        };
        assert!(out.status.success());
        let ours = hash_root_password(&Secret::new("hunter2")).unwrap();
        // sha-crypt writes the default `rounds=5000$` out; OpenSSL leaves it
        // implicit. Same rounds, same salt: the same hash.
        let fields: Vec<&str> = ours.as_str().split('$').collect();
        assert_eq!(fields[2], "rounds=5000");
        let salt = fields[3];
        let theirs = std::process::Command::new("openssl")
            .args(["passwd", "-6", "-salt", salt, "hunter2"])
            .output()
            .unwrap();
        let theirs = String::from_utf8(theirs.stdout).unwrap();
        assert_eq!(theirs.trim(), format!("$6${salt}${}", fields[4]));
    }
}
