//! The manifest signing key: Ed25519, generated once into `<data_dir>/ota-signing.key` (the
//! 32-byte seed in hex, mode 0600), identified by its key id (the first 8 bytes of the SHA-256
//! of the public key), which offers carry in their protected header.

use std::path::Path;

use ed25519_dalek::SigningKey;
use rand::RngCore;
pub use tinyfleet_device::ota::manifest::kid_of;

/// The signing key and its id. `Debug` never shows the key.
pub struct Signer {
    key: SigningKey,
    kid: [u8; 8],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kid", &hex::encode(self.kid))
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads the key from `path`, generating it (0600) when the file does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, String> {
        let seed = match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim())
                    .map_err(|_| format!("{}: not a hex Ed25519 seed", path.display()))?;
                <[u8; 32]>::try_from(bytes.as_slice())
                    .map_err(|_| format!("{}: an Ed25519 seed is 32 bytes", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                rand::rng().fill_bytes(&mut seed);
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts
                    .open(path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                std::io::Write::write_all(&mut f, hex::encode(seed).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), "generated the OTA signing key");
                seed
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let key = SigningKey::from_bytes(&seed);
        let kid = kid_of(&key.verifying_key().to_bytes());
        Ok(Self { key, kid })
    }

    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    pub fn kid(&self) -> [u8; 8] {
        self.kid
    }

    /// The public key devices must trust (32 bytes).
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ota-signing.key");
        let a = Signer::load_or_generate(&path).unwrap();
        let b = Signer::load_or_generate(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.kid(), kid_of(&a.public_key()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{a:?}").contains(&std::fs::read_to_string(&path).unwrap()));
        std::fs::write(&path, "zz").unwrap();
        assert!(Signer::load_or_generate(&path).unwrap_err().contains("hex"));
    }
}
