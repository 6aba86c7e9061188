//! The OTA service: model versions and their artifacts, delta patches between them, signed
//! update offers, and what the transports serve.
//!
//! - [`delta`]: the `TFP1` patch builder (the device's `ota::patch` applies it).
//! - [`artifacts`]: content-addressed artifact files (images and patches).
//! - [`keys`]: the Ed25519 manifest signing key.
//! - [`blocks`]: answers to MQTT block requests.
//! - [`service`]: the staged-rollout service around the [`rollout`] engine (persistence,
//!   offers, rollback versions, continuous-delivery policies).
//! - [`Ota`]: registering versions (anti-rollback `seq`), building and caching patches, and
//!   signing offers (COSE_Sign1 manifests, `docs/protocol.md`).
//!
//! Metadata lives in the store (`model_versions`, `patches`); bytes live in artifact files.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod artifacts;
pub mod blocks;
pub mod delta;
pub mod keys;
pub mod rollout;
pub mod service;

use std::path::Path;

use tinyfleet_device::ota::manifest::{self, Delta, Digest as ManifestDigest, Manifest};
use tinyfleet_store::{ModelVersion, PatchRecord, Store, StoreError};

pub use artifacts::Artifacts;
pub use keys::Signer;

/// Why an OTA call failed.
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("artifact storage: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for OtaError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ModelConflict(m) => Self::Conflict(m),
            e => Self::Store(e),
        }
    }
}

/// Settings of the OTA service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtaConfig {
    /// Base URL devices download objects from (`{public_url}/ota/v1/objects/{sha256}`); empty
    /// for MQTT-only fleets.
    pub public_url: String,
    /// Output block of patches and block size of MQTT transfers (256-4096; the device's
    /// patcher needs about three blocks of RAM).
    pub block_size: u16,
    /// Largest accepted artifact.
    pub max_artifact_bytes: u64,
    /// How often the rollouts re-evaluate their gates, soak times and offer pacing (ms).
    pub rollout_tick_ms: u64,
    /// The signing key file (a hex Ed25519 seed, 0600); empty: `<data_dir>/ota-signing.key`,
    /// generated on first start. `tinyfleet keys generate FILE` makes one for a rotation.
    pub signing_key: String,
    /// Public keys (hex) devices still trust besides the signing key, listed by
    /// `GET /api/v1/ota/keys` during a rotation (the previous signing key, a backup key).
    pub trusted_keys: Vec<String>,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            public_url: String::new(),
            block_size: delta::DEFAULT_BLOCK_SIZE,
            max_artifact_bytes: 16 * 1024 * 1024,
            rollout_tick_ms: 2000,
            signing_key: String::new(),
            trusted_keys: Vec::new(),
        }
    }
}

impl OtaConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(manifest::MIN_BLOCK..=manifest::MAX_BLOCK).contains(&self.block_size) {
            return Err(format!(
                "ota.block_size {} must be {}..={}",
                self.block_size,
                manifest::MIN_BLOCK,
                manifest::MAX_BLOCK
            ));
        }
        let url = &self.public_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "ota.public_url {:?} must be http(s)://...",
                self.public_url
            ));
        }
        if self.max_artifact_bytes == 0 || self.max_artifact_bytes > u64::from(u32::MAX) {
            return Err("ota.max_artifact_bytes must be 1..=4294967295".into());
        }
        for (i, k) in self.trusted_keys.iter().enumerate() {
            let ok = hex::decode(k).is_ok_and(|b| {
                <[u8; 32]>::try_from(b.as_slice())
                    .is_ok_and(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).is_ok())
            });
            if !ok {
                return Err(format!(
                    "ota.trusted_keys[{i}]: not a hex Ed25519 public key (64 hex digits)"
                ));
            }
        }
        if !(100..=60_000).contains(&self.rollout_tick_ms) {
            return Err(format!(
                "ota.rollout_tick_ms {} must be 100..=60000",
                self.rollout_tick_ms
            ));
        }
        Ok(())
    }
}

/// What an operator uploads with an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub model_id: String,
    pub model_version: String,
    pub seq: u32,
    pub hw: String,
    pub min_fw: u32,
    pub arena: u32,
    pub by: String,
}

/// What a device fetches to get from `base` (or nothing) to a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectPlan {
    /// SHA-256 (hex) and size of the object: the patch, or the image itself.
    pub object_sha256: String,
    pub object_size: u64,
    /// The patch's base image, when the object is a patch.
    pub base: Option<(String, u64)>,
}

/// The OTA service.
#[derive(Debug)]
pub struct Ota {
    store: Store,
    artifacts: Artifacts,
    signer: Signer,
    config: OtaConfig,
}

fn digest(hex_sha: &str) -> Result<ManifestDigest, OtaError> {
    let bytes =
        hex::decode(hex_sha).map_err(|_| OtaError::Invalid(format!("bad digest {hex_sha:?}")))?;
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| OtaError::Invalid(format!("bad digest {hex_sha:?}")))?;
    Ok(ManifestDigest(arr))
}

fn check_name(what: &str, s: &str) -> Result<(), OtaError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(OtaError::Invalid(format!(
            "{what} {s:?}: use 1-64 of A-Z a-z 0-9 . _ - +"
        )))
    }
}

impl Ota {
    /// Opens the service on `data_dir` (artifacts in `<data_dir>/artifacts`, the signing key in
    /// `<data_dir>/ota-signing.key`, generated on first use).
    pub fn open(store: Store, data_dir: &Path, config: OtaConfig) -> Result<Self, String> {
        config.validate()?;
        let artifacts = Artifacts::open(&data_dir.join("artifacts"))
            .map_err(|e| format!("cannot open {}/artifacts: {e}", data_dir.display()))?;
        let key_file = if config.signing_key.is_empty() {
            data_dir.join("ota-signing.key")
        } else {
            Path::new(&config.signing_key).to_owned()
        };
        let signer = Signer::load_or_generate(&key_file)?;
        Ok(Self {
            store,
            artifacts,
            signer,
            config,
        })
    }

    pub fn artifacts(&self) -> &Artifacts {
        &self.artifacts
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    pub fn config(&self) -> &OtaConfig {
        &self.config
    }

    /// Stores an artifact and registers it as a model version. The sequence number must be
    /// above every registered version of the model (anti-rollback).
    pub fn register(
        &self,
        up: &Upload,
        bytes: &[u8],
        now_ms: i64,
    ) -> Result<ModelVersion, OtaError> {
        check_name("model id", &up.model_id)?;
        check_name("model version", &up.model_version)?;
        check_name("hardware", &up.hw)?;
        if bytes.is_empty() || bytes.len() as u64 > self.config.max_artifact_bytes {
            return Err(OtaError::Invalid(format!(
                "artifact of {} bytes: must be 1..={} bytes",
                bytes.len(),
                self.config.max_artifact_bytes
            )));
        }
        if up.seq == 0 {
            return Err(OtaError::Invalid("seq must be at least 1".into()));
        }
        let sha256 = self.artifacts.put(bytes)?;
        let version = ModelVersion {
            model_id: up.model_id.clone(),
            model_version: up.model_version.clone(),
            seq: up.seq,
            hw: up.hw.clone(),
            min_fw: up.min_fw,
            arena: up.arena,
            sha256,
            size: bytes.len() as u64,
            created_ms: now_ms,
            created_by: up.by.clone(),
        };
        self.store.add_model_version(&version)?;
        tracing::info!(model = %up.model_id, version = %up.model_version, seq = up.seq, by = %up.by, "model version registered");
        Ok(version)
    }

    pub fn versions(&self, model_id: &str) -> Result<Vec<ModelVersion>, OtaError> {
        Ok(self.store.model_versions(model_id)?)
    }

    pub fn version(&self, model_id: &str, version: &str) -> Result<ModelVersion, OtaError> {
        self.store
            .model_version(model_id, version)?
            .ok_or_else(|| OtaError::NotFound(format!("no model version {model_id}@{version}")))
    }

    /// The object that takes a device from the image `base_sha256` (if known) to `target`:
    /// a cached or newly built patch when it is smaller than the image, else the image.
    pub fn plan(
        &self,
        target: &ModelVersion,
        base_sha256: Option<&str>,
        now_ms: i64,
    ) -> Result<ObjectPlan, OtaError> {
        let full = ObjectPlan {
            object_sha256: target.sha256.clone(),
            object_size: target.size,
            base: None,
        };
        let Some(base_sha) = base_sha256.filter(|b| *b != target.sha256) else {
            return Ok(full);
        };
        let bs = self.config.block_size;
        let record = match self.store.patch(base_sha, &target.sha256, bs)? {
            Some(r) => r,
            None => {
                let (Some(base), Some(new)) = (
                    self.artifacts.get(base_sha)?,
                    self.artifacts.get(&target.sha256)?,
                ) else {
                    // An image this service never stored: the device gets the full image.
                    return Ok(full);
                };
                let (patch, stats) =
                    delta::diff(&base, &new, bs).map_err(|e| OtaError::Invalid(e.to_string()))?;
                // Every patch is applied once here with the device's own patcher before any
                // device sees it; one that does not rebuild the image is never offered.
                let verified = tinyfleet_device::ota::patch::apply_in_memory(&base, &patch, 4096)
                    .is_ok_and(|out| out == new);
                if !verified {
                    tracing::error!(base = %base_sha, target = %target.sha256, "built patch does not rebuild the image; offering the image");
                }
                let smaller = verified && patch.len() < new.len();
                let record = PatchRecord {
                    base_sha256: base_sha.to_owned(),
                    target_sha256: target.sha256.clone(),
                    block_size: bs,
                    patch_sha256: if smaller {
                        Some(self.artifacts.put(&patch)?)
                    } else {
                        None
                    },
                    size: patch.len() as u64,
                };
                tracing::info!(
                    base = %base_sha, target = %target.sha256, patch_bytes = patch.len(),
                    image_bytes = new.len(), copy = stats.copy, add = stats.add,
                    literal = stats.literal, moved = stats.moved, "patch built"
                );
                self.store.put_patch(&record, now_ms)?;
                record
            }
        };
        let (Some(patch_sha), Some(base_size)) =
            (record.patch_sha256, self.artifacts.size(base_sha)?)
        else {
            return Ok(full);
        };
        Ok(ObjectPlan {
            object_sha256: patch_sha,
            object_size: record.size,
            base: Some((base_sha.to_owned(), base_size)),
        })
    }

    /// A signed offer (COSE_Sign1 manifest) for `target`, as a patch from `base_sha256` when
    /// that is smaller.
    pub fn offer(
        &self,
        target: &ModelVersion,
        base_sha256: Option<&str>,
        now_ms: i64,
    ) -> Result<Vec<u8>, OtaError> {
        let plan = self.plan(target, base_sha256, now_ms)?;
        let url = if self.config.public_url.is_empty() {
            String::new()
        } else {
            format!(
                "{}/ota/v1/objects/{}",
                self.config.public_url.trim_end_matches('/'),
                plan.object_sha256
            )
        };
        let size32 = |n: u64| {
            u32::try_from(n).map_err(|_| OtaError::Invalid("objects are limited to 4 GiB".into()))
        };
        let delta = match &plan.base {
            Some((base_sha, base_size)) => Some(Delta {
                base_sha256: digest(base_sha)?,
                patch_size: size32(plan.object_size)?,
                patch_sha256: digest(&plan.object_sha256)?,
                base_size: size32(*base_size)?,
            }),
            None => None,
        };
        let m = Manifest {
            model_id: &target.model_id,
            model_version: &target.model_version,
            seq: target.seq,
            hw: &target.hw,
            image_size: size32(target.size)?,
            image_sha256: digest(&target.sha256)?,
            delta,
            block_size: self.config.block_size,
            url: &url,
            object: digest(&plan.object_sha256)?,
            min_fw: target.min_fw,
            arena: target.arena,
            golden: None,
        };
        manifest::sign_offer(&m, self.signer.key(), &self.signer.kid())
            .map_err(|e| OtaError::Invalid(format!("cannot sign the offer: {e:?}")))
    }
}
