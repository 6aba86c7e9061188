//! Shared by the fuzz targets: a reader that turns fuzz input into choices, the fixed keys the
//! targets sign and verify with, and a provisioned registry for the ingest targets.
//!
//! Every target states its properties at the top: at least "never panics, never hangs" (a
//! panic, a libFuzzer timeout or an out-of-memory is a finding), and where the decoder has an
//! encoder, `decode(encode(x)) == x`.

use std::path::PathBuf;
use std::sync::OnceLock;

use ed25519_dalek::{Signer, SigningKey};
use tinyfleet_device::DeviceKey;
use tinyfleet_device::ota::manifest::{self, TrustedKey};

/// Reads choices from the front of a fuzz input; past its end every read is zero or empty, so
/// any input is a valid program.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A length-prefixed (u16) frame.
    pub fn frame(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.take(n)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

/// The OTA signing key the targets sign offers with (fixed, so crashes reproduce).
pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// The device's trusted key list: the signing key under its key id.
pub fn trusted() -> &'static [TrustedKey<'static>] {
    static KEYS: OnceLock<(Vec<u8>, [u8; 32])> = OnceLock::new();
    static TRUSTED: OnceLock<[TrustedKey<'static>; 1]> = OnceLock::new();
    let (kid, public) = KEYS.get_or_init(|| {
        let public = signing_key().verifying_key().to_bytes();
        (manifest::kid_of(&public).to_vec(), public)
    });
    TRUSTED.get_or_init(|| {
        [TrustedKey {
            kid,
            public: *public,
        }]
    })
}

/// A COSE_Sign1 offer over `payload` (any bytes, not only manifests), signed with
/// [`signing_key`] in the one form devices accept. `None` when the payload is too long for it.
pub fn sign_payload(payload: &[u8]) -> Option<Vec<u8>> {
    let key = signing_key();
    let kid = manifest::kid_of(key.verifying_key().as_bytes());
    let mut protected = vec![0xa2, 0x01, 0x27, 0x04, 0x40 | kid.len() as u8];
    protected.extend_from_slice(&kid);
    let mut tbs = vec![0u8; payload.len() + protected.len() + manifest::TBS_OVERHEAD];
    let n = manifest::to_be_signed(&protected, payload, &mut tbs).ok()?;
    let signature = key.sign(&tbs[..n]).to_bytes();
    let mut out = vec![0xd2, 0x84, 0x40 | protected.len() as u8];
    out.extend_from_slice(&protected);
    out.push(0xa0);
    match payload.len() {
        0..=23 => out.push(0x40 | payload.len() as u8),
        24..=255 => out.extend_from_slice(&[0x58, payload.len() as u8]),
        256..=65535 => {
            out.push(0x59);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        _ => return None,
    }
    out.extend_from_slice(payload);
    out.extend_from_slice(&[0x58, 0x40]);
    out.extend_from_slice(&signature);
    Some(out)
}

/// A fresh directory for this fuzzing process, `<temp>/tinyfleet-fuzz-<name>-<pid>`. libFuzzer
/// ends the process without running destructors, so the directories of processes that are gone
/// are removed here instead.
pub fn scratch_dir(name: &str) -> PathBuf {
    let tmp = std::env::temp_dir();
    let prefix = format!("tinyfleet-fuzz-{name}-");
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let pid = file_name.to_str().and_then(|n| n.strip_prefix(&prefix));
            if let Some(pid) = pid
                && pid.bytes().all(|b| b.is_ascii_digit())
                && !std::path::Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the fuzz scratch directory");
    dir
}

/// The device the ingest targets provision, and its message key.
pub const DEVICE: &str = "dev-1";

/// A registry (SQLite store in a scratch directory) with [`DEVICE`] provisioned.
pub fn registry() -> &'static (tinyfleet_store::Registry, DeviceKey) {
    static REGISTRY: OnceLock<(tinyfleet_store::Registry, DeviceKey)> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let dir = scratch_dir("registry");
        let store = tinyfleet_store::Store::open(&dir).expect("open the store");
        let creds = store
            .registry()
            .provision(DEVICE, Default::default())
            .expect("provision");
        let key: [u8; 32] = hex_decode(&creds.mac_key)
            .try_into()
            .expect("a 32-byte key");
        (store.registry().clone(), DeviceKey(key))
    })
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}
