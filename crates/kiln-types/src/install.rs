//! Values an install plan carries from users to the installer: SSH public
//! keys and root password hashes. They are parsed once at the edge (the API,
//! the CLI) so that templates only ever see well-formed values — and
//! templates still escape them, because well-formed is not the same as
//! inert (a key's comment may hold quotes, `$(…)` or `{{ }}`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallValueError {
    #[error("invalid SSH public key: {0}")]
    SshKey(String),
    #[error(
        "invalid root password hash: {0}; give a SHA-512 crypt hash such as \
         the output of `mkpasswd -m sha-512` (`$6$salt$…`), or a plaintext \
         password for kiln to hash"
    )]
    CryptHash(String),
}

/// Key types OpenSSH accepts in `authorized_keys` (DSA is gone from
/// OpenSSH 9.8 and not offered).
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// An SSH public key in `authorized_keys` form: `TYPE BASE64 [COMMENT]`,
/// one line, no options prefix (`command=…` would let a tenant restrict or
/// redirect root's login in ways the operator did not choose).
#[derive(Clone, PartialEq, Eq, ToSchema)]
#[schema(value_type = String, example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI… alice@laptop")]
pub struct SshPublicKey(String);

impl SshPublicKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SshPublicKey {
    type Err = InstallValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| Err(InstallValueError::SshKey(why.to_string()));
        let s = s.trim();
        if s.len() > 16 * 1024 {
            return err("longer than 16 KiB");
        }
        if s.chars().any(char::is_control) {
            return err("it contains a line break or control character: give one key per value");
        }
        let mut parts = s.splitn(3, ' ');
        let kind = parts.next().unwrap_or_default();
        let blob = parts.next().unwrap_or_default();
        let comment = parts.next().map(str::trim).unwrap_or_default();
        if !SSH_KEY_TYPES.contains(&kind) {
            return err(&format!(
                "it must start with the key type ({}), not options or anything else",
                SSH_KEY_TYPES.join(", ")
            ));
        }
        let base64 = |c: char| c.is_ascii_alphanumeric() || "+/".contains(c);
        let data = blob.trim_end_matches('=');
        if blob.len() < 16 || !blob.len().is_multiple_of(4) || blob.len() - data.len() > 2 || !data.chars().all(base64)
        {
            return err("the key data after the type is not base64");
        }
        // The blob starts with the type again (a length-prefixed string):
        // catches a blob pasted under the wrong type.
        if !blob.starts_with(&expected_prefix(kind)) {
            return err("the key data does not match its type");
        }
        let mut key = format!("{kind} {blob}");
        if !comment.is_empty() {
            key.push(' ');
            key.push_str(comment);
        }
        Ok(SshPublicKey(key))
    }
}

/// The base64 of a key blob's first bytes: the big-endian length of the type
/// name and the type name. Only the whole 3-byte groups are compared, since
/// the last group's encoding depends on the bytes after it.
fn expected_prefix(kind: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bytes = (kind.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(kind.as_bytes());
    let whole = bytes.len() / 3 * 3;
    let mut out = String::new();
    for chunk in bytes[..whole].chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]);
        for shift in [18, 12, 6, 0] {
            out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
        }
    }
    out
}

/// A SHA-512 crypt hash (`$6$[rounds=N$]salt$hash`), the form Debian's
/// installer, kickstart, cloud-init and Ignition all take. A plaintext
/// password is never stored or sent to a template: the caller hashes it.
#[derive(Clone, PartialEq, Eq, ToSchema)]
#[schema(value_type = String, example = "$6$kHc8ZqFw1aVbM3xY$…")]
pub struct CryptHash(String);

impl CryptHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CryptHash {
    type Err = InstallValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why: &str| Err(InstallValueError::CryptHash(why.to_string()));
        let crypt64 = |v: &str| v.chars().all(|c| c.is_ascii_alphanumeric() || "./".contains(c));
        let Some(rest) = s.strip_prefix("$6$") else {
            return err("it does not start with `$6$`");
        };
        let mut fields: Vec<&str> = rest.split('$').collect();
        if let Some(rounds) = fields.first().and_then(|f| f.strip_prefix("rounds=")) {
            match rounds.parse::<u32>() {
                Ok(1_000..=999_999_999) => {}
                _ => return err("`rounds=` must be a number from 1000 to 999999999"),
            }
            fields.remove(0);
        }
        match fields.as_slice() {
            [salt, hash] => {
                if salt.is_empty() || salt.len() > 16 || !crypt64(salt) {
                    return err("the salt must be 1 to 16 characters of a-z A-Z 0-9 . /");
                }
                if hash.len() != 86 || !crypt64(hash) {
                    return err("the hash part must be 86 characters of a-z A-Z 0-9 . /");
                }
                Ok(CryptHash(s.to_string()))
            }
            _ => err("expected `$6$salt$hash`"),
        }
    }
}

// A hash is not the password, but it can be attacked offline: keep it out
// of logs like a secret.
impl fmt::Debug for CryptHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CryptHash([redacted])")
    }
}

impl fmt::Display for SshPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SshPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SshPublicKey({:?})", self.0)
    }
}

macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_via_str!(SshPublicKey, CryptHash);

#[cfg(test)]
mod tests {
    use super::*;

    // A real key made with `ssh-keygen -t ed25519`.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBo1DFLOjhJu9VihAJLwnWUkTo81xeod3+XAAIuQa9Py alice@laptop";
    const RSA_PREFIX: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7";

    #[test]
    fn ssh_keys() {
        let k: SshPublicKey = ED25519.parse().unwrap();
        assert_eq!(k.as_str(), ED25519);
        let k: SshPublicKey = format!("  {ED25519}  ").parse().unwrap();
        assert_eq!(k.as_str(), ED25519);
        // A comment may hold anything printable: templates escape it.
        let hostile = format!(
            "{} x'; reboot; $(id) `id` {{{{ 7*7 }}}}",
            &ED25519[..ED25519.len() - 13]
        );
        assert_eq!(hostile.parse::<SshPublicKey>().unwrap().as_str(), hostile);
        assert!(
            format!("{RSA_PREFIX}{}", "A".repeat(40))
                .parse::<SshPublicKey>()
                .is_ok()
        );

        for bad in [
            "",
            "ssh-ed25519",
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
            "command=\"/bin/sh\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBo1DFLOjhJu9VihAJLwnWUkTo81xeod3+XAAIuQa9Py",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBo1DFLOjhJu9VihAJLwnWUkTo81xeod3+XAAIuQa9Py\nssh-ed25519 AAAA",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBo1DFLOjhJu9VihAJLwnWUk$o81xeod3+XAAIuQa9Py",
            // An RSA blob under the ed25519 type.
            "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQC7AAAAAAAA",
        ] {
            assert!(bad.parse::<SshPublicKey>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn crypt_hashes() {
        // `openssl passwd -6 -salt saltsalt hunter2`
        let good = "$6$saltsalt$8iYtNHxjWRl.NF6oNZ5tF.iKFlQREaXBLlSmZKP6dy9l5z3vsooWNW0/GZ6Nej73/TFug6pIPSqbJoCT6dfnj.";
        assert_eq!(good.parse::<CryptHash>().unwrap().as_str(), good);
        let rounds = good.replacen("$6$", "$6$rounds=10000$", 1);
        assert!(rounds.parse::<CryptHash>().is_ok());
        for bad in [
            "hunter2",
            "$1$saltsalt$abc",
            "$y$j9T$abc$def",
            "$6$saltsalt$short",
            "$6$$8iYtNHxjWRl.NF6oNZ5tF.iKFlQREaXBLlSmZKP6dy9l5z3vsooWNW0/GZ6Nej73/TFug6pIPSqbJoCT6dfnj.",
            "$6$rounds=5$saltsalt$8iYtNHxjWRl.NF6oNZ5tF.iKFlQREaXBLlSmZKP6dy9l5z3vsooWNW0/GZ6Nej73/TFug6pIPSqbJoCT6dfnj.",
            "$6$salt\nd-i x$8iYtNHxjWRl.NF6oNZ5tF.iKFlQREaXBLlSmZKP6dy9l5z3vsooWNW0/GZ6Nej73/TFug6pIPSqbJoCT6dfnj.",
        ] {
            assert!(bad.parse::<CryptHash>().is_err(), "{bad:?} was accepted");
        }
        let h: CryptHash = good.parse().unwrap();
        assert!(!format!("{h:?}").contains("saltsalt"));
    }

    #[test]
    fn serde_goes_through_validation() {
        let k: SshPublicKey = serde_json::from_str(&serde_json::to_string(ED25519).unwrap()).unwrap();
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            serde_json::to_string(ED25519).unwrap()
        );
        let e = serde_json::from_str::<CryptHash>("\"hunter2\"").unwrap_err();
        assert!(e.to_string().contains("$6$"), "{e}");
    }
}
