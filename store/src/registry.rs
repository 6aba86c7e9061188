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
//! Lookups on the hot paths (broker auth, ingest verify) read an in-memory map; they touch the
//! database only for an id the map does not hold (see below).
//!
//! Several replicas (processes sharing the SQLite file or the PostgreSQL database) each keep
//! their own map, so a device provisioned or revoked through one must reach the others:
//! - A lookup of an id the map lacks reads that one row (a device provisioned elsewhere is
//!   usable at once). Ids not found are remembered for [`MISS_TTL`], invalid ids are never
//!   looked up, and at most [`LOOKUP_BURST`] such reads (refilled at [`LOOKUP_RATE`] per second)
//!   run at once, so CONNECT floods with unknown ids do not hammer the database.
//! - [`Registry::refresh`] re-reads the rows changed since the last one (every provisioning
//!   and revocation stamps its row with the next number of a counter whose row lock orders
//!   them), which is how revocations made elsewhere arrive: the service calls it every few
//!   seconds, and that period bounds how long another replica still accepts a revoked device.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tinyfleet_device::{DeviceId, DeviceKey};

use crate::db::{Db, Row, args};
use crate::{Result, StoreError, now_ms};

/// How long an id not found in the database is answered "unknown" without looking again.
pub const MISS_TTL: Duration = Duration::from_secs(5);
/// Database lookups of unknown ids per second, sustained...
pub const LOOKUP_RATE: f64 = 100.0;
/// ...and at once.
pub const LOOKUP_BURST: f64 = 200.0;
/// Remembered misses at most (beyond, expired ones go, then all).
const MAX_MISSES: usize = 100_000;

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
    /// The registry change number that last touched the row: a row read back never replaces
    /// a newer one.
    changed: i64,
}

/// What keeps the map in step with the database.
struct SyncState {
    /// The highest change number read: [`Registry::refresh`] reads the rows above it.
    seen: i64,
    /// Ids looked up and not found, with when.
    misses: HashMap<String, Instant>,
    /// Lookups of unknown ids allowed now (a token bucket).
    tokens: f64,
    refilled: Instant,
}

impl SyncState {
    fn take_token(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * LOOKUP_RATE).min(LOOKUP_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn remember_miss(&mut self, id: &str, now: Instant) {
        if self.misses.len() >= MAX_MISSES {
            self.misses
                .retain(|_, at| now.duration_since(*at) < MISS_TTL);
            if self.misses.len() >= MAX_MISSES {
                self.misses.clear();
            }
        }
        self.misses.insert(id.to_owned(), now);
    }
}

/// Device ids may not start with this: tinyfleet's own MQTT clients (`tinyfleet-ingest`, the
/// embedded broker's `tinyfleet-router-wake`, ...) use it as their client id, and a device with
/// such an id could take over their sessions.
pub const RESERVED_PREFIX: &str = "tinyfleet-";

/// The registry. Cheap to clone; all clones share one map and connection.
#[derive(Clone)]
pub struct Registry {
    db: Arc<Mutex<Db>>,
    master: Arc<[u8; 32]>,
    devices: Arc<RwLock<HashMap<String, Entry>>>,
    sync: Arc<Mutex<SyncState>>,
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

/// Reads `<dir>/master.key`, creating it (mode 0600) with 32 random bytes if absent. The new
/// key is written to a temporary file and linked into place, so processes opening a new data
/// directory at once agree on one key and none reads a half-written file.
fn load_master_key(dir: &Path) -> Result<[u8; 32]> {
    let path = dir.join("master.key");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    let read = |bytes: Vec<u8>| -> Result<[u8; 32]> {
        bytes.try_into().map_err(|_| StoreError::Corrupt {
            table: "master.key",
            detail: format!("{} must hold exactly 32 bytes", path.display()),
        })
    };
    match std::fs::read(&path) {
        Ok(bytes) => read(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            let mut suffix = [0u8; 8];
            rand::rng().fill_bytes(&mut suffix);
            let tmp = dir.join(format!(".master.key.{}", hex::encode(suffix)));
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let written = opts.open(&tmp).and_then(|mut f| {
                std::io::Write::write_all(&mut f, &key)?;
                f.sync_all()
            });
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(&tmp)(e));
            }
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    // The new name is durable once the directory is.
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io(dir))?;
                    Ok(key)
                }
                // Another process created it first: use theirs (complete: it was linked after
                // being written).
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    read(std::fs::read(&path).map_err(io(&path))?)
                }
                Err(e) => Err(io(&path)(e)),
            }
        }
        Err(e) => Err(io(&path)(e)),
    }
}

const SELECT_DEVICES: &str =
    "SELECT id, salt, password_hash, key_epoch, tags, created_ms, revoked_ms, changed FROM devices";

fn entry_from_row(master: &[u8; 32], mut r: Row) -> Result<Entry> {
    let id = r.text(0)?;
    let corrupt = |detail: &str| StoreError::Corrupt {
        table: "devices",
        detail: format!("{id}: {detail}"),
    };
    let epoch = r.i64(3)?;
    Ok(Entry {
        salt: r.blob(1)?.try_into().map_err(|_| corrupt("salt"))?,
        password_hash: r
            .blob(2)?
            .try_into()
            .map_err(|_| corrupt("password hash"))?,
        epoch,
        key: derive_key(master, &id, epoch),
        changed: r.i64(7)?,
        record: DeviceRecord {
            tags: serde_json::from_str(&r.text(4)?).map_err(|_| corrupt("tags"))?,
            created_ms: r.i64(5)?,
            revoked_ms: r.opt_i64(6)?,
            id,
        },
    })
}

/// Takes the next registry change number (inside the caller's transaction; the counter's row
/// stays locked until it ends, so numbers become visible in order).
fn next_change(db: &mut Db) -> Result<i64> {
    db.query_one(
        "UPDATE registry_version SET version = version + 1 WHERE id = 1 RETURNING version",
        &[],
    )?
    .i64(0)
}

impl Registry {
    /// Opens the registry on `db`, with the master key in `data_dir`.
    pub(crate) fn open(db: Arc<Mutex<Db>>, data_dir: &Path) -> Result<Self> {
        let master = load_master_key(data_dir)?;
        // The counter first: rows changed after it was read are read again by `refresh`.
        let (seen, rows) = {
            let mut c = lock(&db);
            let seen = c
                .query_one("SELECT version FROM registry_version WHERE id = 1", &[])?
                .i64(0)?;
            (seen, c.query(SELECT_DEVICES, &[])?)
        };
        let mut devices = HashMap::with_capacity(rows.len());
        for row in rows {
            let entry = entry_from_row(&master, row)?;
            devices.insert(entry.record.id.clone(), entry);
        }
        Ok(Self {
            db,
            master: Arc::new(master),
            devices: Arc::new(RwLock::new(devices)),
            sync: Arc::new(Mutex::new(SyncState {
                seen,
                misses: HashMap::new(),
                tokens: LOOKUP_BURST,
                refilled: Instant::now(),
            })),
        })
    }

    /// Puts rows read from the database into the map, unless the map holds newer ones.
    fn merge(&self, entries: Vec<Entry>) -> usize {
        let mut changed = 0;
        let mut devices = write(&self.devices);
        for e in entries {
            let newer = devices
                .get(&e.record.id)
                .is_none_or(|old| old.changed <= e.changed);
            if newer {
                lock(&self.sync).misses.remove(&e.record.id);
                devices.insert(e.record.id.clone(), e);
                changed += 1;
            }
        }
        changed
    }

    /// Re-reads the devices provisioned or revoked (here or by another replica) since the last
    /// refresh and returns how many rows it read. One indexed query that returns only changed
    /// rows: the service calls it every few seconds (`serve` does), which bounds how long a
    /// device revoked through another replica can still connect here.
    pub fn refresh(&self) -> Result<usize> {
        let seen = lock(&self.sync).seen;
        let rows = lock(&self.db).query(
            &format!("{SELECT_DEVICES} WHERE changed > ?1 ORDER BY changed"),
            args![seen],
        )?;
        let n = rows.len();
        let entries = rows
            .into_iter()
            .map(|r| entry_from_row(&self.master, r))
            .collect::<Result<Vec<_>>>()?;
        let newest = entries.iter().map(|e| e.changed).max();
        self.merge(entries);
        if let Some(newest) = newest {
            let mut sync = lock(&self.sync);
            sync.seen = sync.seen.max(newest);
        }
        Ok(n)
    }

    /// An id the map lacks, read from the database (provisioned by another replica), within
    /// the negative cache and the lookup budget. `None` also when the database fails: the
    /// device is refused now and found by a later lookup or refresh.
    fn load_missing(&self, id: &str) -> Option<Entry> {
        DeviceId::new(id).ok()?;
        {
            let now = Instant::now();
            let mut sync = lock(&self.sync);
            if sync
                .misses
                .get(id)
                .is_some_and(|at| now.duration_since(*at) < MISS_TTL)
            {
                return None;
            }
            if !sync.take_token(now) {
                return None;
            }
        }
        let row = lock(&self.db)
            .query_opt(&format!("{SELECT_DEVICES} WHERE id = ?1"), args![id])
            .ok()?;
        match row {
            Some(row) => {
                let entry = entry_from_row(&self.master, row).ok()?;
                self.merge(vec![entry]);
                read(&self.devices).get(id).cloned()
            }
            None => {
                lock(&self.sync).remember_miss(id, Instant::now());
                None
            }
        }
    }

    /// `f` of the device's entry: from the map, else from the database.
    fn with_entry<T>(&self, id: &str, f: impl FnOnce(&Entry) -> T) -> Option<T> {
        if let Some(e) = read(&self.devices).get(id) {
            return Some(f(e));
        }
        self.load_missing(id).map(|e| f(&e))
    }

    /// Registers a device and returns its secrets (the only time they exist in the clear).
    pub fn provision(&self, id: &str, tags: BTreeMap<String, String>) -> Result<Credentials> {
        DeviceId::new(id).map_err(|_| StoreError::BadDeviceId(id.to_owned()))?;
        if id.starts_with(RESERVED_PREFIX) {
            return Err(StoreError::ReservedDeviceId(id.to_owned()));
        }
        if read(&self.devices).contains_key(id) {
            return Err(StoreError::DeviceExists(id.to_owned()));
        }
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let password = derive_password(&self.master, id, 0);
        let hash = hash_password(&salt, password.as_bytes());
        let created_ms = now_ms();
        let tags_json = serde_json::to_string(&tags).map_err(|e| StoreError::Corrupt {
            table: "devices",
            detail: e.to_string(),
        })?;
        // The database decides (another replica may have taken the id).
        let changed = lock(&self.db).transaction(|db| {
            let changed = next_change(db)?;
            let inserted = db.execute(
                "INSERT INTO devices (id, salt, password_hash, key_epoch, tags, created_ms, \
                 changed) VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
                args![id, &salt[..], &hash[..], &tags_json, created_ms, changed],
            )?;
            if inserted == 0 {
                return Err(StoreError::DeviceExists(id.to_owned()));
            }
            Ok(changed)
        })?;
        let key = derive_key(&self.master, id, 0);
        let mac_key = hex::encode(key.0);
        self.merge(vec![Entry {
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
            changed,
        }]);
        Ok(Credentials {
            device_id: id.to_owned(),
            mqtt_password: password,
            mac_key,
        })
    }

    /// Revokes a device: its CONNECTs and messages are refused from now on (by other replicas
    /// from their next [`Registry::refresh`]). Revoking a revoked device changes nothing.
    pub fn revoke(&self, id: &str) -> Result<()> {
        let at = now_ms();
        let row = lock(&self.db).transaction(|db| {
            let Some(current) =
                db.query_opt("SELECT revoked_ms FROM devices WHERE id = ?1", args![id])?
            else {
                return Err(StoreError::NoDevice(id.to_owned()));
            };
            if current.opt_i64(0)?.is_none() {
                let changed = next_change(db)?;
                db.execute(
                    "UPDATE devices SET revoked_ms = ?2, changed = ?3 \
                     WHERE id = ?1 AND revoked_ms IS NULL",
                    args![id, at, changed],
                )?;
            }
            db.query_one(&format!("{SELECT_DEVICES} WHERE id = ?1"), args![id])
        })?;
        self.merge(vec![entry_from_row(&self.master, row)?]);
        Ok(())
    }

    /// Whether `password` is the CONNECT password of the active device `id` (constant time).
    pub fn check_password(&self, id: &str, password: &str) -> bool {
        self.with_entry(id, |e| {
            e.record.revoked_ms.is_none()
                && ct_eq(
                    &hash_password(&e.salt, password.as_bytes()),
                    &e.password_hash,
                )
        })
        .unwrap_or(false)
    }

    /// The message key of an active device.
    pub fn mac_key(&self, id: &str) -> Option<DeviceKey> {
        self.with_entry(id, |e| e.record.revoked_ms.is_none().then(|| e.key.clone()))
            .flatten()
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

    /// Devices provisioned and not revoked, as this process knows them.
    pub fn active_count(&self) -> usize {
        read(&self.devices)
            .values()
            .filter(|e| e.record.revoked_ms.is_none())
            .count()
    }

    pub fn get(&self, id: &str) -> Option<DeviceRecord> {
        self.with_entry(id, |e| e.record.clone())
    }

    /// Tags of a device (empty for unknown ones).
    pub fn tags(&self, id: &str) -> BTreeMap<String, String> {
        self.with_entry(id, |e| e.record.tags.clone())
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

    use crate::testing::TestDb;

    /// Every byte the database holds about devices, for the "no secret at rest" check.
    fn stored_bytes(t: &TestDb) -> Vec<u8> {
        match t.raw_postgres() {
            None => std::fs::read(t.dir().join("tinyfleet.db")).unwrap(),
            Some(mut pg) => {
                let mut out = Vec::new();
                for row in pg
                    .query("SELECT id, salt, password_hash, tags FROM devices", &[])
                    .unwrap()
                {
                    out.extend(row.get::<_, String>(0).into_bytes());
                    out.extend(row.get::<_, Vec<u8>>(1));
                    out.extend(row.get::<_, Vec<u8>>(2));
                    out.extend(row.get::<_, String>(3).into_bytes());
                }
                out
            }
        }
    }

    #[test]
    fn provision_check_revoke_and_reopen() {
        for t in TestDb::all() {
            let store = t.open();
            let reg = store.registry().clone();
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
            assert!(matches!(
                reg.provision("tinyfleet-ingest", BTreeMap::new()),
                Err(StoreError::ReservedDeviceId(_))
            ));
            assert!(matches!(reg.revoke("nope"), Err(StoreError::NoDevice(_))));
            // Nothing secret is in the database.
            drop((reg, store));
            let raw = stored_bytes(&t);
            let needle = creds.mqtt_password.as_bytes();
            assert!(!raw.windows(needle.len()).any(|w| w == needle));
            let key = hex::decode(&creds.mac_key).unwrap();
            assert!(!raw.windows(32).any(|w| w == &key[..]));
            // Reopened: same key, same password, and revocation sticks.
            let reg = t.open().registry().clone();
            assert!(reg.check_password("dev-1", &creds.mqtt_password));
            assert_eq!(
                reg.mac_key("dev-1").map(|k| hex::encode(k.0)),
                Some(creds.mac_key.clone())
            );
            reg.revoke("dev-1").unwrap();
            let revoked_at = reg.get("dev-1").unwrap().revoked_ms;
            assert!(revoked_at.is_some());
            // Revoking again changes nothing.
            reg.revoke("dev-1").unwrap();
            assert_eq!(reg.get("dev-1").unwrap().revoked_ms, revoked_at);
            assert!(!reg.check_password("dev-1", &creds.mqtt_password));
            assert_eq!(reg.broker_passwords(), (vec![], 0));
            assert!(reg.mac_key("dev-1").is_none());
            let reg = t.open().registry().clone();
            assert!(reg.mac_key("dev-1").is_none());
            assert_eq!(reg.get("dev-1").unwrap().tags["site"], "a");
        }
    }

    #[test]
    fn master_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let _ = crate::Store::open(dir.path()).unwrap();
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
