//! Content-addressed artifact files: `<dir>/<sha256 hex>`, written once (temporary file,
//! fsync, rename, fsync of the directory), never changed, read by range.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The artifact directory.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
}

/// A lowercase SHA-256 hex digest, checked.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Artifacts {
    /// Opens (creating) the directory.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, sha: &str) -> Option<PathBuf> {
        is_digest(sha).then(|| self.dir.join(sha))
    }

    /// Stores `bytes` durably; returns their SHA-256 (hex). Storing the same bytes twice is a
    /// no-op.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let sha = hex::encode(Sha256::digest(bytes));
        let path = self.dir.join(&sha);
        if path.exists() {
            return Ok(sha);
        }
        let tmp = self.dir.join(format!(".{sha}.{}.tmp", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(sha)
    }

    /// The whole artifact, if stored.
    pub fn get(&self, sha: &str) -> std::io::Result<Option<Vec<u8>>> {
        let Some(path) = self.path(sha) else {
            return Ok(None);
        };
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Size of an artifact, if stored.
    pub fn size(&self, sha: &str) -> std::io::Result<Option<u64>> {
        let Some(path) = self.path(sha) else {
            return Ok(None);
        };
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `len` bytes from `offset` (fewer at the end), if stored.
    pub fn read_range(&self, sha: &str, offset: u64, len: u64) -> std::io::Result<Option<Vec<u8>>> {
        let Some(path) = self.path(sha) else {
            return Ok(None);
        };
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(offset))?;
        let mut out = Vec::new();
        f.take(len).read_to_end(&mut out)?;
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_range() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(&dir.path().join("artifacts")).unwrap();
        let sha = a.put(b"hello model").unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello model")));
        assert_eq!(a.put(b"hello model").unwrap(), sha);
        assert_eq!(a.get(&sha).unwrap().unwrap(), b"hello model");
        assert_eq!(a.size(&sha).unwrap(), Some(11));
        assert_eq!(a.read_range(&sha, 6, 100).unwrap().unwrap(), b"model");
        assert_eq!(a.get(&"0".repeat(64)).unwrap(), None);
        assert_eq!(
            a.get("../etc/passwd").unwrap(),
            None,
            "only digests name files"
        );
    }
}
