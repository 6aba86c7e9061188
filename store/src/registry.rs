//! The device registry: provisioning, revocation, CONNECT credentials and message keys.
//!
//! A device gets two secrets, once, at provisioning: an MQTT password (checked by the broker at
//! CONNECT) and a 32-byte message key (for the COSE_Mac0 tag on every message it sends).
//! - The password is derived as `hex(HMAC-SHA256(master, "tinyfleet/mqtt/v1/" || id || "/" ||
//!   epoch))` and stored only as `SHA-256(salt || password)`. It has 256 bits of entropy, so a
//!   fast hash is safe (there is nothing to brute-force), and CONNECT storms stay cheap. Being
//!   derived, it can be handed to an external broker's password file at any time
//!   ([`Registry::broker_passwords`]) without ever being stored. Devices provisioned before
//!   passwords were derived keep their random password and cannot be exported.
//! - The message key is never stored: it is derived as
//!   `HMAC-SHA256(master, "tinyfleet/mac/v1/" || id || "/" || epoch)` from the master key in
//!   `<data dir>/master.key` (created with mode 0600). Losing that file invalidates every
//!   device's message key and password; back it up with the database.
//!
//! Lookups on the hot paths (broker auth, ingest verify) read an in-memory map kept in step with
//! the table under one lock; they never touch SQLite.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use hmac::{KeyInit, Mac};
use rand::RngCore;
use rusqlite::{Connection, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tinyfleet_device::{DeviceId, DeviceKey};

use crate::{Result, StoreError, now_ms};

/// What a device is given once, at provisioning. Never stored; `Debug` redacts the secrets.
#[derive(Clone, Serialize)]
pub struct Credentials {
    pub device_id: String,
    /// MQTT password (username = client id = device id).
    pub mqtt_password: String,
    /// The 32-byte message key, hex.
    pub mac_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("device_id", &self.device_id)
            .field("mqtt_password", &"<redacted>")
            .field("mac_key", &"<redacted>")
            .finish()
    }
}

/// A registered device, without secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRecord {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

#[derive(Clone)]
struct Entry {
    record: DeviceRecord,
    salt: [u8; 16],
    password_hash: [u8; 32],
    epoch: i64,
    key: DeviceKey,
}

/// The registry. Cheap to clone; all clones share one map and connection.
#[derive(Clone)]
pub struct Registry {
    conn: Arc<Mutex<Connection>>,
    master: Arc<[u8; 32]>,
    devices: Arc<RwLock<HashMap<String, Entry>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn hash_password(salt: &[u8; 16], password: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password);
    h.finalize().into()
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `HMAC-SHA256(master, label || id || "/" || epoch)`: one device secret per label.
fn derive(master: &[u8; 32], label: &[u8], id: &str, epoch: i64) -> [u8; 32] {
    let mut mac = match <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(master) {
        Ok(mac) => mac,
        // HMAC takes keys of any length.
        Err(_) => return [0; 32],
    };
    mac.update(label);
    mac.update(id.as_bytes());
    mac.update(b"/");
    mac.update(epoch.to_string().as_bytes());
    mac.finalize().into_bytes().into()
}

fn derive_key(master: &[u8; 32], id: &str, epoch: i64) -> DeviceKey {
    DeviceKey(derive(master, b"tinyfleet/mac/v1/", id, epoch))
}

fn derive_password(master: &[u8; 32], id: &str, epoch: i64) -> String {
    hex::encode(derive(master, b"tinyfleet/mqtt/v1/", id, epoch))
}

/// Reads `<dir>/master.key`, creating it (mode 0600) with 32 random bytes if absent.
fn load_master_key(dir: &Path) -> Result<[u8; 32]> {
    let path = dir.join("master.key");
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => bytes.try_into().map_err(|_| StoreError::Corrupt {
            table: "master.key",
            detail: format!("{} must hold exactly 32 bytes", path.display()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&path).map_err(io)?;
            std::io::Write::write_all(&mut f, &key).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

impl Registry {
    /// Opens the registry on `conn`, with the master key in `data_dir`.
    pub(crate) fn open(conn: Arc<Mutex<Connection>>, data_dir: &Path) -> Result<Self> {
        let master = load_master_key(data_dir)?;
        let mut devices = HashMap::new();
        {
            let c = lock(&conn);
            let mut stmt = c.prepare(
                "SELECT id, salt, password_hash, key_epoch, tags, created_ms, revoked_ms FROM devices",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            })?;
            for row in rows {
                let (id, salt, hash, epoch, tags, created_ms, revoked_ms) = row?;
                let corrupt = |detail: &str| StoreError::Corrupt {
                    table: "devices",
                    detail: format!("{id}: {detail}"),
                };
                let entry = Entry {
                    salt: salt.try_into().map_err(|_| corrupt("salt"))?,
                    password_hash: hash.try_into().map_err(|_| corrupt("password hash"))?,
                    epoch,
                    key: derive_key(&master, &id, epoch),
                    record: DeviceRecord {
                        id: id.clone(),
                        tags: serde_json::from_str(&tags).map_err(|_| corrupt("tags"))?,
                        created_ms,
                        revoked_ms,
                    },
                };
                devices.insert(id, entry);
            }
        }
        Ok(Self {
            conn,
            master: Arc::new(master),
            devices: Arc::new(RwLock::new(devices)),
        })
    }

    /// Registers a device and returns its secrets (the only time they exist in the clear).
    pub fn provision(&self, id: &str, tags: BTreeMap<String, String>) -> Result<Credentials> {
        DeviceId::new(id).map_err(|_| StoreError::BadDeviceId(id.to_owned()))?;
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let password = derive_password(&self.master, id, 0);
        let hash = hash_password(&salt, password.as_bytes());
        let created_ms = now_ms();
        let tags_json = serde_json::to_string(&tags).map_err(|e| StoreError::Corrupt {
            table: "devices",
            detail: e.to_string(),
        })?;
        let mut devices = write(&self.devices);
        if devices.contains_key(id) {
            return Err(StoreError::DeviceExists(id.to_owned()));
        }
        lock(&self.conn).execute(
            "INSERT INTO devices (id, salt, password_hash, key_epoch, tags, created_ms) \
             VALUES (?1, ?2, ?3, 0, ?4, ?5)",
            params![id, &salt[..], &hash[..], tags_json, created_ms],
        )?;
        let key = derive_key(&self.master, id, 0);
        let mac_key = hex::encode(key.0);
        devices.insert(
            id.to_owned(),
            Entry {
                record: DeviceRecord {
                    id: id.to_owned(),
                    tags,
                    created_ms,
                    revoked_ms: None,
                },
                salt,
                password_hash: hash,
                epoch: 0,
                key,
            },
        );
        Ok(Credentials {
            device_id: id.to_owned(),
            mqtt_password: password,
            mac_key,
        })
    }

    /// Revokes a device: its CONNECTs and messages are refused from now on.
    pub fn revoke(&self, id: &str) -> Result<()> {
        let mut devices = write(&self.devices);
        let entry = devices
            .get_mut(id)
            .ok_or_else(|| StoreError::NoDevice(id.to_owned()))?;
        let at = now_ms();
        lock(&self.conn).execute(
            "UPDATE devices SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, at],
        )?;
        entry.record.revoked_ms.get_or_insert(at);
        Ok(())
    }

    /// Whether `password` is the CONNECT password of the active device `id` (constant time).
    pub fn check_password(&self, id: &str, password: &str) -> bool {
        let devices = read(&self.devices);
        match devices.get(id) {
            Some(e) if e.record.revoked_ms.is_none() => ct_eq(
                &hash_password(&e.salt, password.as_bytes()),
                &e.password_hash,
            ),
            _ => false,
        }
    }

    /// The message key of an active device.
    pub fn mac_key(&self, id: &str) -> Option<DeviceKey> {
        let devices = read(&self.devices);
        devices
            .get(id)
            .filter(|e| e.record.revoked_ms.is_none())
            .map(|e| e.key.clone())
    }

    /// The CONNECT password of every active device, for an external broker's password file
    /// (hashed there again, e.g. Mosquitto's PBKDF2). Devices whose stored hash does not match
    /// the derived password (provisioned before passwords were derived) are left out and
    /// counted in the second value: re-provision them to move them to an external broker.
    pub fn broker_passwords(&self) -> (Vec<(String, String)>, usize) {
        let devices = read(&self.devices);
        let mut out = Vec::with_capacity(devices.len());
        let mut legacy = 0;
        for (id, e) in devices.iter() {
            if e.record.revoked_ms.is_some() {
                continue;
            }
            let password = derive_password(&self.master, id, e.epoch);
            if ct_eq(
                &hash_password(&e.salt, password.as_bytes()),
                &e.password_hash,
            ) {
                out.push((id.clone(), password));
            } else {
                legacy += 1;
            }
        }
        out.sort();
        (out, legacy)
    }

    pub fn get(&self, id: &str) -> Option<DeviceRecord> {
        read(&self.devices).get(id).map(|e| e.record.clone())
    }

    /// Tags of a device (empty for unknown ones).
    pub fn tags(&self, id: &str) -> BTreeMap<String, String> {
        read(&self.devices)
            .get(id)
            .map(|e| e.record.tags.clone())
            .unwrap_or_default()
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain data; keep going.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Registry {
        let store = crate::Store::open(dir).unwrap();
        store.registry().clone()
    }

    #[test]
    fn provision_check_revoke_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path());
        let creds = reg
            .provision("dev-1", BTreeMap::from([("site".into(), "a".into())]))
            .unwrap();
        assert!(reg.check_password("dev-1", &creds.mqtt_password));
        assert!(!reg.check_password("dev-1", "wrong"));
        assert!(!reg.check_password("dev-2", &creds.mqtt_password));
        assert_eq!(
            reg.broker_passwords(),
            (vec![("dev-1".to_owned(), creds.mqtt_password.clone())], 0)
        );
        assert_eq!(
            reg.mac_key("dev-1").map(|k| hex::encode(k.0)),
            Some(creds.mac_key.clone())
        );
        assert!(matches!(
            reg.provision("dev-1", BTreeMap::new()),
            Err(StoreError::DeviceExists(_))
        ));
        assert!(matches!(
            reg.provision("a/b", BTreeMap::new()),
            Err(StoreError::BadDeviceId(_))
        ));
        // Nothing secret is in the database file.
        drop(reg);
        let raw = std::fs::read(dir.path().join("tinyfleet.db")).unwrap();
        let needle = creds.mqtt_password.as_bytes();
        assert!(!raw.windows(needle.len()).any(|w| w == needle));
        let key = hex::decode(&creds.mac_key).unwrap();
        assert!(!raw.windows(32).any(|w| w == &key[..]));
        // Reopened: same key, same password, and revocation sticks.
        let reg = open(dir.path());
        assert!(reg.check_password("dev-1", &creds.mqtt_password));
        assert_eq!(
            reg.mac_key("dev-1").map(|k| hex::encode(k.0)),
            Some(creds.mac_key.clone())
        );
        reg.revoke("dev-1").unwrap();
        assert!(!reg.check_password("dev-1", &creds.mqtt_password));
        assert_eq!(reg.broker_passwords(), (vec![], 0));
        assert!(reg.mac_key("dev-1").is_none());
        let reg = open(dir.path());
        assert!(reg.mac_key("dev-1").is_none());
        assert_eq!(reg.get("dev-1").unwrap().tags["site"], "a");
    }

    #[test]
    fn master_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let _ = open(dir.path());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("master.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let c = Credentials {
            device_id: "d".into(),
            mqtt_password: "p4ss".into(),
            mac_key: "k3y".into(),
        };
        let s = format!("{c:?}");
        assert!(!s.contains("p4ss") && !s.contains("k3y"));
    }
}
