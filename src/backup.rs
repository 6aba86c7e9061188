//! `tinyfleet backup` and `tinyfleet restore`: a data directory copied consistently while
//! `serve` runs, and put back only after every byte of the copy is checked.
//!
//! A backup is a directory (mode 0700, every file 0600) holding:
//! - `ingest.journal`: the intact records of the ingest journal, read *before* the database,
//!   so that messages acknowledged to the broker but not yet checkpointed are in the backup
//!   too (`serve` replays them on start; the ones the snapshot already holds are duplicates,
//!   which dedup refuses);
//! - `tinyfleet.db`: a consistent snapshot of the database (`VACUUM INTO`, taken from its own
//!   connection while the server keeps writing: [`tinyfleet_store::backup::snapshot`]);
//! - `master.key` (every device's message key and MQTT password derive from it: without it no
//!   device can connect or be verified), `ota-signing.key` (the key devices trust for offers)
//!   and `api-token` (the generated operator token, when there is one);
//! - `artifacts/<sha256>`: the content-addressed model images and patches, copied *after* the
//!   snapshot: artifacts are written before anything refers to them and never deleted, so every
//!   one the snapshot refers to is there;
//! - `backup.json`: the manifest (each file's size and SHA-256), written last; a directory
//!   without it is an interrupted backup.
//!
//! `restore` checks a backup (manifest digests, artifact names = digests, `PRAGMA
//! integrity_check`, every artifact the database refers to present, keys well-formed) and
//! copies it into a new or empty data directory (the server stopped), giving the files to the
//! directory's owner. `restore --check` only checks.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MANIFEST: &str = "backup.json";
const FORMAT: &str = "tinyfleet-backup/1";
const DATABASE: &str = "tinyfleet.db";
const JOURNAL: &str = "ingest.journal";
const MASTER_KEY: &str = "master.key";
const SIGNING_KEY: &str = "ota-signing.key";
const API_TOKEN: &str = "api-token";
const ARTIFACTS: &str = "artifacts";

/// `tinyfleet backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Where to write the backup: a new directory, or an empty one.
    #[arg(long)]
    out: PathBuf,
    /// The data directory to back up (default: `data_dir` of --config and the `TINYFLEET__...`
    /// environment, as `serve` resolves it).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The configuration `serve` runs with: its `data_dir` and `ota.signing_key`.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

/// `tinyfleet restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup (a directory written by `tinyfleet backup --out`).
    #[arg(long)]
    from: PathBuf,
    /// The data directory to restore into: a new or empty directory (an empty volume's
    /// `lost+found` is allowed). `serve` must not run on it.
    #[arg(long, required_unless_present = "check", conflicts_with = "check")]
    data_dir: Option<PathBuf>,
    /// Only check the backup; write nothing.
    #[arg(long)]
    check: bool,
}

/// `backup.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    tinyfleet_version: String,
    created_ms: i64,
    /// The data directory backed up.
    source: String,
    /// `PRAGMA user_version` of the snapshot.
    schema_version: i64,
    devices: u64,
    journal_records: usize,
    /// `ota.signing_key` when the configuration put the key outside the data directory; it is
    /// in the backup as `ota-signing.key` all the same.
    signing_key_path: Option<String>,
    /// Artifacts the database refers to that were already missing from the data directory.
    missing_artifacts: Vec<String>,
    files: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    /// Relative to the backup directory, `/`-separated.
    path: String,
    bytes: u64,
    sha256: String,
}

/// Runs `tinyfleet backup`.
pub fn backup(args: BackupArgs) -> Result<(), String> {
    let config = crate::config::Config::load(args.config.as_deref())?;
    let data = args.data_dir.unwrap_or(config.data_dir);
    let signing_key =
        (!config.ota.signing_key.is_empty()).then(|| PathBuf::from(&config.ota.signing_key));
    let db = data.join(DATABASE);
    if !db.is_file() {
        return Err(format!(
            "{} has no {DATABASE}: not a tinyfleet data directory (give --data-dir or the \
             --config serve runs with)",
            data.display()
        ));
    }
    let out = args.out;
    new_or_empty_dir(&out)?;
    let result = write_backup(&data, signing_key.as_deref(), &out);
    if result.is_err() {
        eprintln!(
            "tinyfleet: the backup in {} is incomplete (no {MANIFEST}); delete it",
            out.display()
        );
    }
    let manifest = result?;
    let artifacts = manifest
        .files
        .iter()
        .filter(|f| f.path.starts_with("artifacts/"))
        .count();
    let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    println!(
        "backup of {} written to {}: {} devices, schema version {}, {} artifacts, {} journal \
         records, {} bytes",
        data.display(),
        out.display(),
        manifest.devices,
        manifest.schema_version,
        artifacts,
        manifest.journal_records,
        bytes
    );
    for sha in &manifest.missing_artifacts {
        eprintln!(
            "tinyfleet: warning: the database refers to artifact {sha}, which {} lacks; the \
             backup lacks it too",
            data.display()
        );
    }
    Ok(())
}

fn write_backup(data: &Path, signing_key: Option<&Path>, out: &Path) -> Result<Manifest, String> {
    let mut files = Vec::new();

    // 1. The journal before the database: together they hold every acknowledged message.
    let journal_records = match std::fs::read(data.join(JOURNAL)) {
        Ok(bytes) => {
            let records = tinyfleet_ingest::journal::decode(&bytes);
            if !records.is_empty() {
                let mut encoded = Vec::with_capacity(bytes.len());
                for r in &records {
                    tinyfleet_ingest::journal::encode(
                        &mut encoded,
                        r.received_ms,
                        &r.topic,
                        &r.payload,
                    );
                }
                let path = out.join(JOURNAL);
                write_new(&path, &encoded)?;
                files.push(FileEntry {
                    path: JOURNAL.to_owned(),
                    bytes: encoded.len() as u64,
                    sha256: hex::encode(Sha256::digest(&encoded)),
                });
            }
            records.len()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("cannot read {}: {e}", data.join(JOURNAL).display())),
    };

    // 2. The database: a consistent snapshot while the server keeps writing.
    let db_out = out.join(DATABASE);
    tinyfleet_store::backup::snapshot(&data.join(DATABASE), &db_out)
        .map_err(|e| format!("snapshot of {}: {e}", data.join(DATABASE).display()))?;
    let info = tinyfleet_store::backup::check(&db_out)
        .map_err(|e| format!("the snapshot {}: {e}", db_out.display()))?;
    files.push(entry(out, DATABASE)?);

    // 3. The keys and the generated token.
    copy_file(&data.join(MASTER_KEY), &out.join(MASTER_KEY)).map_err(|e| {
        format!("{e} (without the master key no device can connect or be verified)")
    })?;
    files.push(entry(out, MASTER_KEY)?);
    let signing_source = signing_key
        .map(Path::to_owned)
        .unwrap_or_else(|| data.join(SIGNING_KEY));
    if copy_optional(&signing_source, &out.join(SIGNING_KEY))? {
        files.push(entry(out, SIGNING_KEY)?);
    } else if signing_key.is_some() {
        return Err(format!(
            "the OTA signing key {} (ota.signing_key) does not exist",
            signing_source.display()
        ));
    }
    if copy_optional(&data.join(API_TOKEN), &out.join(API_TOKEN))? {
        files.push(entry(out, API_TOKEN)?);
    }

    // 4. The artifacts after the snapshot: every one it refers to exists by now.
    let artifacts_out = out.join(ARTIFACTS);
    create_private_dir(&artifacts_out)?;
    let mut copied = BTreeSet::new();
    let artifacts_in = data.join(ARTIFACTS);
    match std::fs::read_dir(&artifacts_in) {
        Ok(entries) => {
            for item in entries {
                let item =
                    item.map_err(|e| format!("cannot list {}: {e}", artifacts_in.display()))?;
                let name = item.file_name();
                let Some(name) = name.to_str().filter(|n| is_digest(n)) else {
                    // Temporary files of an artifact being written, or strangers.
                    continue;
                };
                let (bytes, sha) = copy_file(&item.path(), &artifacts_out.join(name))?;
                if sha != name {
                    return Err(format!(
                        "artifact {} is damaged: its content has digest {sha}; the data \
                         directory needs repair before it can be backed up",
                        item.path().display()
                    ));
                }
                files.push(FileEntry {
                    path: format!("{ARTIFACTS}/{name}"),
                    bytes,
                    sha256: sha,
                });
                copied.insert(name.to_owned());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot list {}: {e}", artifacts_in.display())),
    }
    let missing_artifacts: Vec<String> = info
        .artifacts
        .iter()
        .filter(|sha| !copied.contains(*sha))
        .cloned()
        .collect();
    sync_dir(&artifacts_out)?;

    // 5. The manifest last: its presence says the backup is complete.
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        tinyfleet_version: env!("CARGO_PKG_VERSION").to_owned(),
        created_ms: tinyfleet_store::now_ms(),
        source: data.display().to_string(),
        schema_version: info.schema_version,
        devices: info.devices,
        journal_records,
        signing_key_path: signing_key.map(|p| p.display().to_string()),
        missing_artifacts,
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?;
    let tmp = out.join(format!("{MANIFEST}.tmp"));
    write_new(&tmp, &json)?;
    std::fs::rename(&tmp, out.join(MANIFEST))
        .map_err(|e| format!("cannot write {}: {e}", out.join(MANIFEST).display()))?;
    sync_dir(out)?;
    Ok(manifest)
}

/// Runs `tinyfleet restore`.
pub fn restore(args: RestoreArgs) -> Result<(), String> {
    let from = args.from;
    let checked = check_backup(&from)?;
    for w in &checked.warnings {
        eprintln!("tinyfleet: warning: {w}");
    }
    let m = &checked.manifest;
    let summary = format!(
        "{} devices, schema version {}, {} artifacts, {} journal records, OTA signing key {}",
        m.devices,
        m.schema_version,
        m.files
            .iter()
            .filter(|f| f.path.starts_with("artifacts/"))
            .count(),
        m.journal_records,
        checked
            .signing_kid
            .as_deref()
            .map_or("absent".to_owned(), |kid| format!("kid {kid}")),
    );
    let Some(target) = args.data_dir else {
        println!(
            "backup {} is intact (taken {} by tinyfleet {} from {}): {summary}",
            from.display(),
            utc(m.created_ms),
            m.tinyfleet_version,
            m.source
        );
        return Ok(());
    };
    new_or_empty_dir(&target)?;
    let owner = Owner::of(&target)?;
    if let Err(e) = copy_backup(&from, &target, m, &owner) {
        return Err(format!(
            "{e}; {} now holds a partial copy: empty it before trying again",
            target.display()
        ));
    }
    println!(
        "restored {} into {}: {summary}; start `tinyfleet serve` on it",
        from.display(),
        target.display()
    );
    if let Some(path) = &m.signing_key_path {
        eprintln!(
            "tinyfleet: note: the OTA signing key was configured at {path} (ota.signing_key); \
             it is restored as {}: copy it back there, or leave ota.signing_key empty",
            target.join(SIGNING_KEY).display()
        );
    }
    Ok(())
}

/// A backup that passed every check.
#[derive(Debug)]
struct Checked {
    manifest: Manifest,
    signing_kid: Option<String>,
    warnings: Vec<String>,
}

fn check_backup(dir: &Path) -> Result<Checked, String> {
    let manifest_path = dir.join(MANIFEST);
    let text = match std::fs::read(&manifest_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{} is not a complete tinyfleet backup: it has no {MANIFEST} (the backup was \
                 interrupted, or this is not a backup directory)",
                dir.display()
            ));
        }
        Err(e) => return Err(format!("cannot read {}: {e}", manifest_path.display())),
    };
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a backup manifest: {e}", manifest_path.display()))?;
    if manifest.format != FORMAT {
        return Err(format!(
            "{}: backup format {:?}, this tinyfleet reads {FORMAT:?}",
            manifest_path.display(),
            manifest.format
        ));
    }
    let bad = |what: String| format!("backup {} is damaged: {what}", dir.display());
    let mut listed = BTreeSet::new();
    for f in &manifest.files {
        if !allowed_path(&f.path) {
            return Err(bad(format!(
                "the manifest names an unexpected file {:?}",
                f.path
            )));
        }
        if !listed.insert(f.path.clone()) {
            return Err(bad(format!("the manifest names {} twice", f.path)));
        }
        let path = dir.join(&f.path);
        let (bytes, sha) = hash_file(&path).map_err(bad)?;
        if bytes != f.bytes || sha != f.sha256 {
            return Err(bad(format!(
                "{} has {bytes} bytes with SHA-256 {sha}, the manifest says {} bytes with {}",
                f.path, f.bytes, f.sha256
            )));
        }
        if let Some(name) = f.path.strip_prefix("artifacts/")
            && name != sha
        {
            return Err(bad(format!("artifact {name} has digest {sha}")));
        }
    }
    for required in [DATABASE, MASTER_KEY] {
        if !listed.contains(required) {
            return Err(bad(format!("it has no {required}")));
        }
    }
    let info = tinyfleet_store::backup::check(&dir.join(DATABASE))
        .map_err(|e| bad(format!("{DATABASE}: {e}")))?;
    if info.schema_version != manifest.schema_version || info.devices != manifest.devices {
        return Err(bad(format!(
            "{DATABASE} is at schema version {} with {} devices, the manifest says {} with {}",
            info.schema_version, info.devices, manifest.schema_version, manifest.devices
        )));
    }
    let mut warnings = Vec::new();
    for sha in &info.artifacts {
        if listed.contains(&format!("{ARTIFACTS}/{sha}")) {
            continue;
        }
        if manifest.missing_artifacts.contains(sha) {
            warnings.push(format!(
                "the database refers to artifact {sha}, which the backed-up data directory \
                 already lacked"
            ));
        } else {
            return Err(bad(format!(
                "the database refers to artifact {sha}, which is not in the backup"
            )));
        }
    }
    let master =
        std::fs::metadata(dir.join(MASTER_KEY)).map_err(|e| bad(format!("{MASTER_KEY}: {e}")))?;
    if master.len() != 32 {
        return Err(bad(format!("{MASTER_KEY} must hold exactly 32 bytes")));
    }
    let signing_kid = if listed.contains(SIGNING_KEY) {
        let signer = tinyfleet_ota_service::keys::Signer::load_or_generate(&dir.join(SIGNING_KEY))
            .map_err(bad)?;
        Some(hex::encode(signer.kid()))
    } else {
        None
    };
    // Files nobody listed are left behind (and named).
    let mut strangers = Vec::new();
    for (sub, names) in [
        ("", list_dir(dir)?),
        ("artifacts/", list_dir(&dir.join(ARTIFACTS))?),
    ] {
        for name in names {
            let path = format!("{sub}{name}");
            if path != MANIFEST && path != ARTIFACTS && !listed.contains(&path) {
                strangers.push(path);
            }
        }
    }
    if !strangers.is_empty() {
        warnings.push(format!(
            "files not in the manifest are not restored: {}",
            strangers.join(", ")
        ));
    }
    Ok(Checked {
        manifest,
        signing_kid,
        warnings,
    })
}

/// Copies the files of a checked backup into `target`; the database last, so that a failure
/// leaves no database a server could start on with artifacts or keys missing.
fn copy_backup(from: &Path, target: &Path, m: &Manifest, owner: &Owner) -> Result<(), String> {
    let artifacts = target.join(ARTIFACTS);
    create_private_dir(&artifacts)?;
    owner.give(&artifacts)?;
    let mut ordered: Vec<&FileEntry> = m.files.iter().filter(|f| f.path != DATABASE).collect();
    ordered.extend(m.files.iter().filter(|f| f.path == DATABASE));
    for f in ordered {
        let to = target.join(&f.path);
        let (bytes, sha) = copy_file(&from.join(&f.path), &to)?;
        if bytes != f.bytes || sha != f.sha256 {
            return Err(format!(
                "{} changed while it was restored (SHA-256 {sha}, expected {})",
                f.path, f.sha256
            ));
        }
        owner.give(&to)?;
    }
    sync_dir(&artifacts)?;
    sync_dir(target)
}

/// Whether a manifest path is one a backup writes (so a tampered manifest cannot point
/// outside the directory).
fn allowed_path(path: &str) -> bool {
    match path.strip_prefix("artifacts/") {
        Some(name) => is_digest(name),
        None => [DATABASE, JOURNAL, MASTER_KEY, SIGNING_KEY, API_TOKEN].contains(&path),
    }
}

fn is_digest(name: &str) -> bool {
    tinyfleet_ota_service::artifacts::is_digest(name)
}

/// The owner of a restore's target directory; restored files are given to it (a restore run
/// as root into a directory the service user owns).
#[derive(Debug)]
struct Owner {
    #[cfg(unix)]
    uid: u32,
    #[cfg(unix)]
    gid: u32,
}

impl Owner {
    fn of(dir: &Path) -> Result<Self, String> {
        let meta =
            std::fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Ok(Self {
                uid: meta.uid(),
                gid: meta.gid(),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = meta;
            Ok(Self {})
        }
    }

    fn give(&self, path: &Path) -> Result<(), String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if (meta.uid(), meta.gid()) != (self.uid, self.gid) {
                std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(|e| {
                    format!(
                        "cannot give {} to the data directory's owner ({}:{}): {e}; run the \
                         restore as that user, or as root",
                        path.display(),
                        self.uid,
                        self.gid
                    )
                })?;
            }
        }
        #[cfg(not(unix))]
        let _ = path;
        Ok(())
    }
}

/// Creates `dir` (mode 0700, parents as needed) or accepts it when empty (`lost+found` aside).
fn new_or_empty_dir(dir: &Path) -> Result<(), String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for item in entries {
                let item = item.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
                if item.file_name() != "lost+found" {
                    return Err(format!(
                        "{} exists and is not empty ({} is in it): give a new or empty directory",
                        dir.display(),
                        item.file_name().to_string_lossy()
                    ));
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder
                .create(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))
        }
        Err(e) => Err(format!("cannot use {}: {e}", dir.display())),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Names in `dir` (none when it does not exist).
fn list_dir(dir: &Path) -> Result<Vec<String>, String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|item| {
                item.map(|i| i.file_name().to_string_lossy().into_owned())
                    .map_err(|e| format!("cannot list {}: {e}", dir.display()))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot list {}: {e}", dir.display())),
    }
}

/// Opens a new file with mode 0600 (never overwriting).
fn create_new(path: &Path) -> Result<std::fs::File, String> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut f = create_new(path)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Copies `from` into a new file `to` (0600), hashing on the way, and fsyncs it. Returns the
/// size and the SHA-256 (hex) of what was written.
fn copy_file(from: &Path, to: &Path) -> Result<(u64, String), String> {
    let mut src =
        std::fs::File::open(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    let mut dst = create_new(to)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", from.display())),
        };
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .map_err(|e| format!("cannot write {}: {e}", to.display()))?;
        total += n as u64;
    }
    dst.sync_all()
        .map_err(|e| format!("cannot write {}: {e}", to.display()))?;
    Ok((total, hex::encode(hasher.finalize())))
}

/// [`copy_file`] of a file that may not exist; whether it did.
fn copy_optional(from: &Path, to: &Path) -> Result<bool, String> {
    if std::fs::symlink_metadata(from).is_err() {
        return Ok(false);
    }
    copy_file(from, to).map(|_| true)
}

fn hash_file(path: &Path) -> Result<(u64, String), String> {
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// The manifest entry of a file just written into the backup.
fn entry(out: &Path, name: &str) -> Result<FileEntry, String> {
    let (bytes, sha256) = hash_file(&out.join(name))?;
    Ok(FileEntry {
        path: name.to_owned(),
        bytes,
        sha256,
    })
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds).
fn utc(ms: i64) -> String {
    tinyfleet_alerts::payload::rfc3339_ms(ms.div_euclid(1000) * 1000)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Component;

    #[test]
    fn manifest_paths_stay_inside_the_backup() {
        let sha = "a".repeat(64);
        assert!(allowed_path(DATABASE));
        assert!(allowed_path(&format!("artifacts/{sha}")));
        for bad in [
            "../master.key",
            "/etc/passwd",
            "artifacts/../../x",
            "artifacts/short",
            "backup.json",
            "",
        ] {
            assert!(!allowed_path(bad), "{bad}");
        }
        // `Component` is what `join` would follow: nothing allowed has more than a name.
        for ok in [DATABASE, &format!("artifacts/{sha}")] {
            assert!(
                Path::new(ok)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
            );
        }
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_767_225_599_999), "2025-12-31T23:59:59Z");
        assert_eq!(utc(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn new_or_empty_dirs_only() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("a/b");
        new_or_empty_dir(&fresh).unwrap();
        new_or_empty_dir(&fresh).unwrap();
        std::fs::create_dir(fresh.join("lost+found")).unwrap();
        new_or_empty_dir(&fresh).unwrap();
        std::fs::write(fresh.join("x"), b"").unwrap();
        let err = new_or_empty_dir(&fresh).unwrap_err();
        assert!(err.contains("not empty"), "{err}");
    }
}
