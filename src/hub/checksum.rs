//! What a downloaded file's etag promises about its content: the Hub names an LFS file
//! (every weights file) by the sha256 of its content, and a small file kept in git by its
//! git blob id, the sha1 of `blob <size>\0` followed by the content.

use sha1::Digest;

/// A running hash of a download, of the kind its etag is.
pub enum Checksum {
    /// A 64-hex-digit etag: sha256 of the content.
    Sha256(sha2::Sha256, String),
    /// A 40-hex-digit etag: git's blob sha1.
    GitSha1(sha1::Sha1, String),
    /// An etag of another form (a mirror's own): only the size is checked.
    SizeOnly,
}

impl Checksum {
    /// The check that `etag` (lower-case hex, quotes removed) implies for `size` bytes.
    pub fn for_etag(etag: &str, size: u64) -> Self {
        let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
        match etag.len() {
            64 if hex => Checksum::Sha256(sha2::Sha256::new(), etag.to_ascii_lowercase()),
            40 if hex => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Checksum::GitSha1(h, etag.to_ascii_lowercase())
            }
            _ => Checksum::SizeOnly,
        }
    }

    /// Feed the next bytes of the content.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Checksum::Sha256(h, _) => h.update(bytes),
            Checksum::GitSha1(h, _) => h.update(bytes),
            Checksum::SizeOnly => {}
        }
    }

    /// `Err((what was computed, what the etag said))` when they differ, e.g.
    /// `("sha256 ab12…", "cd34…")`.
    pub fn verify(self) -> Result<(), (String, String)> {
        let (name, got, want) = match self {
            Checksum::Sha256(h, want) => ("sha256", hex(&h.finalize()), want),
            Checksum::GitSha1(h, want) => ("git blob sha1", hex(&h.finalize()), want),
            Checksum::SizeOnly => return Ok(()),
        };
        if got == want {
            Ok(())
        } else {
            Err((format!("{name} {got}"), want))
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(etag: &str, content: &[u8]) -> Result<(), (String, String)> {
        let mut c = Checksum::for_etag(etag, content.len() as u64);
        c.update(content);
        c.verify()
    }

    #[test]
    fn known_digests() {
        // sha256("hello") and `git hash-object` of "hello\n"
        let sha256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(digest(sha256, b"hello"), Ok(()));
        assert_eq!(
            digest("ce013625030ba8dba906f756967f9e9ca394464a", b"hello\n"),
            Ok(())
        );
        let (got, want) = digest(sha256, b"hellO").unwrap_err();
        assert!(got.starts_with("sha256 ") && want == sha256, "{got} {want}");
        assert_eq!(digest("W/xyz-mirror-etag", b"anything"), Ok(()));
    }
}
