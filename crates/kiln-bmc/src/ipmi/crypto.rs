//! RMCP+ cryptography as pure functions: the RAKP key-exchange codes, the
//! session integrity key (SIK) and the keys K1/K2 derived from it, the
//! per-packet integrity code, and AES-CBC-128 with the IPMI confidentiality
//! pad (IPMI 2.0 §13.28–13.32).
//!
//! Only the algorithms of cipher suites 3 (RAKP-HMAC-SHA1, HMAC-SHA1-96,
//! AES-CBC-128) and 17 (RAKP-HMAC-SHA256, HMAC-SHA256-128, AES-CBC-128) are
//! here: kiln never negotiates anything weaker (see `suite.rs`).

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::NoPadding};
use hmac::{Hmac, Mac};

/// The hash behind RAKP, the SIK, K1/K2 and the integrity code. Suite 3
/// uses SHA-1 throughout, suite 17 SHA-256 throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    /// Length of a full HMAC output: the RAKP 2/3 codes, the SIK, K1, K2.
    pub fn output_len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
        }
    }

    /// Length of the truncated codes: the RAKP 4 integrity check value and
    /// the per-packet AuthCode (HMAC-SHA1-96 → 12, HMAC-SHA256-128 → 16).
    pub fn truncated_len(self) -> usize {
        match self {
            Hash::Sha1 => 12,
            Hash::Sha256 => 16,
        }
    }
}

/// HMAC of `parts` (concatenated) under `key`.
pub fn hmac(hash: Hash, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC pads a short key with zeros to the block size, so the password
    // "abc" and the 20-byte, zero-padded K_UID "abc\0…" of the spec give the
    // same MAC: no explicit padding is needed (IPMI keys are at most 20
    // bytes, below both block sizes).
    match hash {
        Hash::Sha1 => {
            let mut m = <Hmac<sha1::Sha1> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
        Hash::Sha256 => {
            let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
            for p in parts {
                m.update(p);
            }
            m.finalize().into_bytes().to_vec()
        }
    }
}

/// Compares two codes in time independent of where they differ.
pub fn codes_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Everything both sides know after RAKP messages 1 and 2; the inputs of
/// every code of the exchange.
#[derive(Clone, PartialEq, Eq)]
pub struct RakpState {
    pub hash: Hash,
    /// The remote console's (our) session ID, "SID_M" in the spec.
    pub console_session_id: u32,
    /// The BMC's session ID, "SID_C".
    pub bmc_session_id: u32,
    /// Our random number, "R_M".
    pub console_random: [u8; 16],
    /// The BMC's random number, "R_C".
    pub bmc_random: [u8; 16],
    /// The BMC's GUID as sent in RAKP 2, "GUID_C".
    pub bmc_guid: [u8; 16],
    /// The role byte of RAKP 1 (privilege and lookup bit), "ROLE_M".
    pub role: u8,
    /// The user name, at most 16 bytes.
    pub username: Vec<u8>,
}

impl std::fmt::Debug for RakpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The randoms are not secret on the wire, but there is no reason to
        // put them in logs either.
        f.debug_struct("RakpState")
            .field("hash", &self.hash)
            .field("console_session_id", &self.console_session_id)
            .field("bmc_session_id", &self.bmc_session_id)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl RakpState {
    fn ulen(&self) -> [u8; 1] {
        [self.username.len() as u8]
    }

    /// The data the BMC's RAKP 2 code covers:
    /// SID_M, SID_C, R_M, R_C, GUID_C, ROLE_M, ULENGTH_M, UNAME_M.
    pub fn rakp2_input(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(58 + self.username.len());
        v.extend_from_slice(&self.console_session_id.to_le_bytes());
        v.extend_from_slice(&self.bmc_session_id.to_le_bytes());
        v.extend_from_slice(&self.console_random);
        v.extend_from_slice(&self.bmc_random);
        v.extend_from_slice(&self.bmc_guid);
        v.push(self.role);
        v.extend_from_slice(&self.ulen());
        v.extend_from_slice(&self.username);
        v
    }

    /// The code the BMC proves its knowledge of the password with.
    pub fn rakp2_code(&self, password: &[u8]) -> Vec<u8> {
        hmac(self.hash, password, &[&self.rakp2_input()])
    }

    /// The data our RAKP 3 code covers: R_C, SID_M, ROLE_M, ULENGTH_M, UNAME_M.
    pub fn rakp3_input(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(22 + self.username.len());
        v.extend_from_slice(&self.bmc_random);
        v.extend_from_slice(&self.console_session_id.to_le_bytes());
        v.push(self.role);
        v.extend_from_slice(&self.ulen());
        v.extend_from_slice(&self.username);
        v
    }

    /// The code we prove our knowledge of the password with.
    pub fn rakp3_code(&self, password: &[u8]) -> Vec<u8> {
        hmac(self.hash, password, &[&self.rakp3_input()])
    }

    /// The session integrity key: HMAC_KG(R_M, R_C, ROLE_M, ULENGTH_M,
    /// UNAME_M). K_G is the BMC key when one is set, else the password.
    pub fn sik(&self, kg: &[u8]) -> Vec<u8> {
        hmac(
            self.hash,
            kg,
            &[
                &self.console_random,
                &self.bmc_random,
                &[self.role],
                &self.ulen(),
                &self.username,
            ],
        )
    }

    /// The BMC's RAKP 4 integrity check value: HMAC_SIK(R_M, SID_C,
    /// GUID_C), truncated (12 bytes for SHA-1, 16 for SHA-256).
    pub fn rakp4_icv(&self, sik: &[u8]) -> Vec<u8> {
        let mut v = hmac(
            self.hash,
            sik,
            &[&self.console_random, &self.bmc_session_id.to_le_bytes(), &self.bmc_guid],
        );
        v.truncate(self.hash.truncated_len());
        v
    }
}

/// The keys of an established session. `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    pub hash: Hash,
    /// K1, the integrity key (full hash length).
    pub k1: Vec<u8>,
    /// The first 16 bytes of K2: the AES-128 key.
    pub aes_key: [u8; 16],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeys")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    /// K1 = HMAC_SIK(0x01 × 20) and K2 = HMAC_SIK(0x02 × 20) (§13.32).
    /// The constants are 20 bytes for every hash: the spec fixes them at
    /// 20, and SHA-256 did not change that. Reading them as "hash length"
    /// (32 for suite 17) was our first version's bug, caught by the
    /// ipmitool cross-check (tests/ipmitool_cross_check.rs).
    pub fn derive(hash: Hash, sik: &[u8]) -> SessionKeys {
        let k1 = hmac(hash, sik, &[&[0x01; 20]]);
        let k2 = hmac(hash, sik, &[&[0x02; 20]]);
        let mut aes_key = [0u8; 16];
        aes_key.copy_from_slice(&k2[..16]);
        SessionKeys { hash, k1, aes_key }
    }

    /// The AuthCode of a packet: HMAC_K1 over everything from the session
    /// header's auth-type byte through the "next header" byte, truncated.
    pub fn integrity_code(&self, covered: &[u8]) -> Vec<u8> {
        let mut v = hmac(self.hash, &self.k1, &[covered]);
        v.truncate(self.hash.truncated_len());
        v
    }

    /// Encrypts a payload: IV ‖ AES-CBC-128(payload ‖ pad ‖ pad length).
    /// The IPMI pad is the bytes 1, 2, 3, … and its length byte makes the
    /// whole a multiple of 16 (it is not PKCS#7).
    pub fn encrypt(&self, iv: [u8; 16], payload: &[u8]) -> Vec<u8> {
        let mut buf = payload.to_vec();
        let pad = (16 - (payload.len() + 1) % 16) % 16;
        buf.extend((1..=pad as u8).collect::<Vec<u8>>());
        buf.push(pad as u8);
        debug_assert_eq!(buf.len() % 16, 0);
        let len = buf.len();
        cbc::Encryptor::<aes::Aes128>::new(&self.aes_key.into(), &iv.into())
            .encrypt_padded_mut::<NoPadding>(&mut buf, len)
            .expect("the buffer is a whole number of blocks");
        let mut out = Vec::with_capacity(16 + len);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&buf);
        out
    }

    /// Decrypts IV ‖ ciphertext and checks and strips the IPMI pad.
    pub fn decrypt(&self, data: &[u8]) -> Result<Vec<u8>, &'static str> {
        if data.len() < 32 || !data.len().is_multiple_of(16) {
            return Err("encrypted payload is not an IV and a whole number of AES blocks");
        }
        let (iv, ct) = data.split_at(16);
        let mut buf = ct.to_vec();
        let iv: [u8; 16] = iv.try_into().expect("16 bytes");
        let plain = cbc::Decryptor::<aes::Aes128>::new(&self.aes_key.into(), &iv.into())
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| "AES-CBC decryption failed")?;
        let len = plain.len();
        let pad = plain[len - 1] as usize;
        if pad > 15 || pad + 1 > len {
            return Err("confidentiality pad length out of range");
        }
        let body = len - 1 - pad;
        // The pad must read 1, 2, 3, …: anything else is a wrong key or a
        // forged packet (integrity has been checked before, so a wrong key).
        for (i, b) in plain[body..len - 1].iter().enumerate() {
            if *b as usize != i + 1 {
                return Err("confidentiality pad bytes are wrong");
            }
        }
        Ok(plain[..body].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn hmac_matches_the_rfc_vectors() {
        // RFC 2202 test case 2 and RFC 4231 test case 2 ("Jefe").
        let data = b"what do ya want for nothing?";
        assert_eq!(
            hmac(Hash::Sha1, b"Jefe", &[data]),
            h("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79")
        );
        assert_eq!(
            hmac(Hash::Sha256, b"Jefe", &[&data[..10], &data[10..]]),
            h("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
    }

    fn state(hash: Hash) -> RakpState {
        RakpState {
            hash,
            console_session_id: 0x0403_0201,
            bmc_session_id: 0x0807_0605,
            console_random: *b"RMRMRMRMRMRMRMRM",
            bmc_random: *b"RCRCRCRCRCRCRCRC",
            bmc_guid: [0x4c, 0x61, 0x62, 0, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 1],
            role: 0x14,
            username: b"admin".to_vec(),
        }
    }

    #[test]
    fn rakp_inputs_are_laid_out_as_the_spec_says() {
        let s = state(Hash::Sha1);
        // SID_M (LE), SID_C (LE), R_M, R_C, GUID_C, ROLE_M, ULENGTH_M, UNAME_M
        let mut want = h("01020304 05060708");
        want.extend_from_slice(b"RMRMRMRMRMRMRMRM");
        want.extend_from_slice(b"RCRCRCRCRCRCRCRC");
        want.extend(h("4c616200000040008000000000000001"));
        want.extend(h("14 05"));
        want.extend_from_slice(b"admin");
        assert_eq!(s.rakp2_input(), want);

        // R_C, SID_M (LE), ROLE_M, ULENGTH_M, UNAME_M
        let mut want = b"RCRCRCRCRCRCRCRC".to_vec();
        want.extend(h("01020304 14 05"));
        want.extend_from_slice(b"admin");
        assert_eq!(s.rakp3_input(), want);
    }

    // The expected codes below were computed from the spec's formulas with
    // an independent HMAC implementation (Python's hmac module), not with
    // this code; see docs/bmc.md.
    #[test]
    fn rakp_codes_and_keys_sha1_known_vectors() {
        let s = state(Hash::Sha1);
        let pw = b"password";
        assert_eq!(s.rakp2_code(pw), h("54e816ed50d3b29ef70844490fe2cc994093da55"));
        assert_eq!(s.rakp3_code(pw), h("09df77040ce401b0e7494292232443e5fef50628"));
        let sik = s.sik(pw);
        assert_eq!(sik, h("a4c9bcef1e103ea0523916d9b21c69155bc31fa6"));
        assert_eq!(s.rakp4_icv(&sik), h("b5563f71c036d7dd9d90a5c9"));
        let k = SessionKeys::derive(Hash::Sha1, &sik);
        assert_eq!(k.k1, h("ab7112e89209682e8b155b14875b04e94ed7808d"));
        assert_eq!(k.aes_key.to_vec(), h("c5bd8180bd443d2dec9764c0c41b1b4b"));
    }

    #[test]
    fn rakp_codes_and_keys_sha256_known_vectors() {
        let s = state(Hash::Sha256);
        let pw = b"password";
        assert_eq!(
            s.rakp2_code(pw),
            h("87101961a8340f9da077c5bf81a8c33fcc9ab4c1d1e64325ae26991e035c436c")
        );
        assert_eq!(
            s.rakp3_code(pw),
            h("8b59d9bca07351d4f593b4a6483ccaacb69280b864a5bdb33d56e7c4580d0ec1")
        );
        let sik = s.sik(pw);
        assert_eq!(
            sik,
            h("5aa53c51691e4a94b9c91d2ce0dd26ff5822a04e28f815f7319e32c133e6486f")
        );
        assert_eq!(s.rakp4_icv(&sik), h("5a89fc686a37e66a2d110fda855ec05e"));
        let k = SessionKeys::derive(Hash::Sha256, &sik);
        assert_eq!(
            k.k1,
            h("c2e2e30d8b62a94240e206d5016fb0fd6afc2bf74d07ed30a1769b478eb7adb9")
        );
        assert_eq!(k.aes_key.to_vec(), h("2c7c8d6fc9ba58915cdb5daaab0a92fb"));
    }

    #[test]
    fn confidentiality_pad_and_round_trip() {
        let k = SessionKeys::derive(Hash::Sha1, b"0123456789abcdefghij");
        let iv = [7u8; 16];
        for len in 0..40usize {
            let payload: Vec<u8> = (0..len as u8).collect();
            let ct = k.encrypt(iv, &payload);
            // IV + ⌈(len + 1) / 16⌉ blocks: the pad-length byte is always there.
            assert_eq!(ct.len(), 16 + (len + 1).div_ceil(16) * 16, "len {len}");
            assert_eq!(&ct[..16], &iv);
            assert_eq!(k.decrypt(&ct).unwrap(), payload);
        }
    }

    #[test]
    fn confidentiality_rejects_a_bad_pad_and_short_input() {
        let k = SessionKeys::derive(Hash::Sha1, b"key");
        assert!(k.decrypt(&[0u8; 16]).is_err());
        assert!(k.decrypt(&[0u8; 33]).is_err());
        // A wrong key decrypts to garbage whose pad does not read 1, 2, 3…
        let other = SessionKeys::derive(Hash::Sha1, b"other key");
        let ct = k.encrypt([1; 16], b"hello, bmc");
        assert!(other.decrypt(&ct).is_err());
    }

    #[test]
    fn codes_compare() {
        assert!(codes_equal(b"abc", b"abc"));
        assert!(!codes_equal(b"abc", b"abd"));
        assert!(!codes_equal(b"abc", b"ab"));
    }
}
