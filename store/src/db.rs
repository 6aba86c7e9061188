//! The two database backends behind one small interface: the embedded SQLite file (the default)
//! and PostgreSQL (several `serve` replicas on one database).
//!
//! [`Db`] offers what the store needs and nothing more: execute, query rows, run a closure in a
//! transaction, and a bulk upsert. SQL is written once where the dialects agree, with SQLite's
//! `?N` placeholders (translated to `$N` for PostgreSQL) and `ON CONFLICT ... DO UPDATE`; the few
//! places where they differ (DDL, JSON access) ask [`Db::dialect`]. Integers are `INTEGER` in
//! SQLite and `BIGINT` in PostgreSQL, bytes `BLOB`/`BYTEA`, text `TEXT` in both, so every
//! integer parameter and column is an `i64` here.
//!
//! PostgreSQL goes through the synchronous `postgres` crate, which drives its connection with a
//! private tokio runtime and would panic when called on a thread that is running async tasks.
//! Every call to the client goes through [`off_runtime`], which makes such a call safe (at the
//! cost of blocking that thread, exactly as SQLite does); callers still belong on blocking
//! threads. Prepared statements are cached per connection, and a dropped connection is opened
//! again on the next call outside a transaction. Every connection is made from one
//! [`PgTarget`]: plain text, or TLS with the server verified when the URL says
//! `sslmode=require`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{Result, StoreError};

/// Which SQL dialect a [`Db`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A statement parameter (borrowed; integers of every width are `i64`, booleans 0 or 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum P<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
    /// A `text[]` (PostgreSQL only: `= ANY(?N)`).
    TextArray(&'a [&'a str]),
}

macro_rules! int_params {
    ($($t:ty),*) => {$(
        impl From<$t> for P<'_> {
            fn from(v: $t) -> Self {
                P::Int(i64::from(v))
            }
        }
    )*};
}
int_params!(i64, i32, u32, u16, u8, bool);

impl<'a> From<&'a str> for P<'a> {
    fn from(v: &'a str) -> Self {
        P::Text(v)
    }
}

impl<'a> From<&'a String> for P<'a> {
    fn from(v: &'a String) -> Self {
        P::Text(v)
    }
}

impl<'a> From<&'a [u8]> for P<'a> {
    fn from(v: &'a [u8]) -> Self {
        P::Blob(v)
    }
}

impl<'a, T: Into<P<'a>>> From<Option<T>> for P<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(P::Null, Into::into)
    }
}

/// `args![a, b, c]`: a parameter slice.
macro_rules! args {
    ($($x:expr),* $(,)?) => {
        &[$($crate::db::P::from($x)),*] as &[$crate::db::P<'_>]
    };
}
pub(crate) use args;

impl rusqlite::ToSql for P<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            P::Null => ValueRef::Null,
            P::Int(v) => ValueRef::Integer(v),
            P::Text(s) => ValueRef::Text(s.as_bytes()),
            P::Blob(b) => ValueRef::Blob(b),
            P::TextArray(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "arrays are for PostgreSQL only".into(),
                ));
            }
        }))
    }
}

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl ToSql for P<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        match *self {
            P::Null => Ok(IsNull::Yes),
            P::Int(v) => match *ty {
                Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
                Type::BOOL => (v != 0).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            P::Text(s) => s.to_sql(ty, out),
            P::Blob(b) => b.to_sql(ty, out),
            P::TextArray(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A column value read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum V {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl V {
    fn kind(&self) -> &'static str {
        match self {
            V::Null => "NULL",
            V::Int(_) => "an integer",
            V::Text(_) => "text",
            V::Blob(_) => "bytes",
        }
    }
}

/// One result row. Getters fail with [`StoreError::Corrupt`] on a type or range mismatch.
#[derive(Debug)]
pub(crate) struct Row(Vec<V>);

fn mismatch(i: usize, want: &str, got: &V) -> StoreError {
    StoreError::Corrupt {
        table: "query result",
        detail: format!("column {i}: expected {want}, found {}", got.kind()),
    }
}

impl Row {
    fn at(&self, i: usize) -> Result<&V> {
        self.0.get(i).ok_or_else(|| StoreError::Corrupt {
            table: "query result",
            detail: format!("no column {i}"),
        })
    }

    fn take(&mut self, i: usize) -> Result<V> {
        self.at(i)?;
        Ok(std::mem::replace(&mut self.0[i], V::Null))
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>> {
        match self.at(i)? {
            V::Null => Ok(None),
            V::Int(v) => Ok(Some(*v)),
            other => Err(mismatch(i, "an integer", other)),
        }
    }

    pub fn i64(&self, i: usize) -> Result<i64> {
        self.opt_i64(i)?
            .ok_or_else(|| mismatch(i, "an integer", &V::Null))
    }

    /// An integer that must fit `T` (as rusqlite's `get::<u32>` and friends did).
    pub fn int<T: TryFrom<i64>>(&self, i: usize) -> Result<T> {
        let v = self.i64(i)?;
        T::try_from(v).map_err(|_| StoreError::Corrupt {
            table: "query result",
            detail: format!("column {i}: {v} is out of range"),
        })
    }

    pub fn opt_int<T: TryFrom<i64>>(&self, i: usize) -> Result<Option<T>> {
        match self.opt_i64(i)? {
            None => Ok(None),
            Some(_) => self.int(i).map(Some),
        }
    }

    pub fn opt_bool(&self, i: usize) -> Result<Option<bool>> {
        Ok(self.opt_i64(i)?.map(|v| v != 0))
    }

    pub fn bool(&self, i: usize) -> Result<bool> {
        Ok(self.i64(i)? != 0)
    }

    /// Moves a text column out of the row.
    pub fn opt_text(&mut self, i: usize) -> Result<Option<String>> {
        match self.take(i)? {
            V::Null => Ok(None),
            V::Text(s) => Ok(Some(s)),
            other => Err(mismatch(i, "text", &other)),
        }
    }

    pub fn text(&mut self, i: usize) -> Result<String> {
        self.opt_text(i)?
            .ok_or_else(|| mismatch(i, "text", &V::Null))
    }

    /// Moves a byte column out of the row.
    pub fn blob(&mut self, i: usize) -> Result<Vec<u8>> {
        match self.take(i)? {
            V::Blob(b) => Ok(b),
            other => Err(mismatch(i, "bytes", &other)),
        }
    }
}

/// The element type of a bulk-upserted column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Int,
    Text,
}

/// An `INSERT ... ON CONFLICT (key) DO UPDATE` over whole rows, for [`Db::upsert`].
#[derive(Debug)]
pub(crate) struct Upsert {
    pub table: &'static str,
    pub columns: &'static [(&'static str, Ty)],
    /// The first `key` columns are the conflict target; the others are updated.
    pub key: usize,
    /// A condition on the update (`excluded.x` is the new row, `<table>.x` the stored one).
    pub only_if: Option<&'static str>,
}

impl Upsert {
    fn conflict_clause(&self) -> String {
        let key: Vec<&str> = self.columns[..self.key].iter().map(|c| c.0).collect();
        let set: Vec<String> = self.columns[self.key..]
            .iter()
            .map(|(c, _)| format!("{c} = excluded.{c}"))
            .collect();
        let mut sql = format!(
            " ON CONFLICT ({}) DO UPDATE SET {}",
            key.join(", "),
            set.join(", ")
        );
        if let Some(cond) = self.only_if {
            sql.push_str(" WHERE ");
            sql.push_str(cond);
        }
        sql
    }

    fn names(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One row per execution (SQLite: in-process, a prepared statement per row is fastest).
    fn sqlite_sql(&self) -> String {
        let slots: Vec<String> = (1..=self.columns.len()).map(|i| format!("?{i}")).collect();
        format!(
            "INSERT INTO {} ({}) VALUES ({}){}",
            self.table,
            self.names(),
            slots.join(", "),
            self.conflict_clause()
        )
    }

    /// All rows in one statement: one array parameter per column, zipped by `unnest`.
    fn pg_sql(&self) -> String {
        let arrays: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| {
                let t = match ty {
                    Ty::Int => "bigint",
                    Ty::Text => "text",
                };
                format!("${}::{t}[]", i + 1)
            })
            .collect();
        format!(
            "INSERT INTO {} ({}) SELECT * FROM unnest({}){}",
            self.table,
            self.names(),
            arrays.join(", "),
            self.conflict_clause()
        )
    }
}

/// One column of a bulk upsert, as a PostgreSQL array.
#[derive(Debug)]
enum Col<'a> {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<&'a str>>),
}

impl ToSql for Col<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        match self {
            Col::Int(v) => v.to_sql(ty, out),
            Col::Text(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// Runs `f`, which calls the synchronous PostgreSQL client, where that is allowed: directly on
/// plain and blocking threads; through `block_in_place` on a multi-threaded runtime's worker;
/// on a short-lived scoped thread on a current-thread runtime (the embedded broker's threads).
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Err(_) => f(),
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        // A thread that could not be started panics, as any spawn does.
        Ok(_) => match std::thread::scope(|s| s.spawn(f).join()) {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        },
    }
}

/// The message of a PostgreSQL error with its causes (the crate's `Display` leaves them out).
/// It never holds the password: the client's errors do not include the connection settings.
pub(crate) fn pg_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{db} (SQLSTATE {})", db.code().code());
    }
    let mut msg = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Postgres(pg_message(&e))
    }
}

/// Replaces every form of the password `url` carries (URL userinfo, `password=` setting; raw
/// and percent-decoded) in `msg` with `***`.
pub(crate) fn redact(msg: &str, url: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    if let Some((_, rest)) = url.split_once("://") {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
        {
            secrets.push(password.to_owned());
            secrets.push(percent_decode(password));
        }
        if let Some((_, query)) = rest.split_once('?') {
            for pair in query.split('&') {
                if let Some(v) = pair.strip_prefix("password=") {
                    secrets.push(v.to_owned());
                    secrets.push(percent_decode(v));
                }
            }
        }
    } else {
        // key=value settings: password=secret or password='se cret'
        let mut rest = url;
        while let Some(at) = rest.find("password") {
            rest = &rest[at + "password".len()..];
            let Some(value) = rest.trim_start().strip_prefix('=') else {
                continue;
            };
            let value = value.trim_start();
            let secret = match value.strip_prefix('\'') {
                Some(quoted) => quoted.split('\'').next().unwrap_or(""),
                None => value.split_whitespace().next().unwrap_or(""),
            };
            secrets.push(secret.to_owned());
        }
    }
    let mut out = msg.to_owned();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a PostgreSQL URL (`postgres://user:password@host:port/db?...`) or `key=value`
/// settings, with defaults for what the store needs (a connect timeout, an application name).
pub(crate) fn pg_config(url: &str) -> Result<postgres::Config> {
    let mut config: postgres::Config = url.parse().map_err(|e: postgres::Error| {
        let mut msg = format!("invalid PostgreSQL URL: {}", pg_message(&e));
        if url.contains("sslmode=verify") || url.contains("sslmode='verify") {
            // libpq's verify-ca/verify-full: what `require` does here.
            msg.push_str(
                "; use sslmode=require: tinyfleet always verifies the server's certificate \
                 and host name (as libpq's verify-full), against the Mozilla roots and \
                 [store] postgres_ca_file",
            );
        }
        StoreError::Postgres(redact(&msg, url))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("tinyfleet");
    }
    Ok(config)
}

/// `postgres://user@host:port/db`: where the database is, for messages (no password).
pub(crate) fn describe(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// How to reach PostgreSQL beyond its URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostgresOptions {
    /// A PEM file of CA certificates trusted, besides the Mozilla roots, to sign the server's
    /// certificate (`[store] postgres_ca_file`). Only with `sslmode=require` in the URL.
    pub ca_file: Option<PathBuf>,
}

/// Where and how the store connects: the parsed settings and, when they say
/// `sslmode=require`, the TLS connector (rustls) that verifies the server's certificate against
/// the Mozilla roots plus the configured CA file, and its host name. `prefer` (the default) and
/// `disable` connect in plain text: rustls always verifies, so trying TLS against a server with
/// a self-signed certificate (Debian's default "snakeoil") would fail where plain text works.
#[derive(Clone)]
pub(crate) struct PgTarget {
    pub(crate) config: postgres::Config,
    tls: Option<MakeRustlsConnect>,
    ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("database", &describe(&self.config))
            .field("tls", &self.tls.is_some())
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl PgTarget {
    /// Parses `url` and prepares TLS as it asks; reads the CA file. Errors never show the
    /// password.
    pub(crate) fn new(url: &str, options: &PostgresOptions) -> Result<PgTarget> {
        let config = pg_config(url)?;
        let ca_file = options.ca_file.clone();
        let tls = match config.get_ssl_mode() {
            postgres::config::SslMode::Require => Some(tls_connector(ca_file.as_deref())?),
            _ => {
                if let Some(path) = &ca_file {
                    return Err(StoreError::Postgres(format!(
                        "[store] postgres_ca_file ({}) is set but postgres_url does not ask for \
                         TLS: add sslmode=require to the URL (e.g. \
                         postgres://user@host/db?sslmode=require); without it the connection \
                         is plain text",
                        path.display()
                    )));
                }
                None
            }
        };
        Ok(PgTarget {
            config,
            tls,
            ca_file,
        })
    }

    /// Whether connections use TLS.
    pub(crate) fn tls(&self) -> bool {
        self.tls.is_some()
    }

    fn connect(&self) -> Result<postgres::Client> {
        let config = &self.config;
        let tls = self.tls.clone();
        off_runtime(move || match tls {
            Some(tls) => config.connect(tls),
            None => config.connect(postgres::NoTls),
        })
        .map_err(|e| self.connect_error(&e))
    }

    fn connect_error(&self, e: &postgres::Error) -> StoreError {
        let config = &self.config;
        let mut msg = format!(
            "cannot connect to {}{}: {}",
            describe(config),
            if self.tls() { " over TLS" } else { "" },
            pg_message(e)
        );
        if self.tls()
            && let Some(hint) = tls_hint(e, self.ca_file.as_deref())
        {
            msg.push_str("; ");
            msg.push_str(&hint);
        }
        if let Some(pw) = config.get_password() {
            let pw = String::from_utf8_lossy(pw);
            if !pw.is_empty() {
                msg = msg.replace(pw.as_ref(), "***");
            }
        }
        StoreError::Postgres(msg)
    }
}

/// Reads the PEM certificates of `path` (at least one), with errors that name the file and the
/// `[store] postgres_ca_file` setting.
pub(crate) fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |what: String| {
        StoreError::Postgres(format!(
            "[store] postgres_ca_file {}: {what}",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let mut certs = Vec::new();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        certs.push(cert.map_err(|e| bad(format!("certificate {} is not valid PEM: {e}", i + 1)))?);
    }
    if certs.is_empty() {
        return Err(bad(
            "no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// The rustls connector: TLS 1.2 or 1.3 (ring), the server verified against the Mozilla roots
/// plus the certificates of `ca_file`, host names (or IP addresses) checked.
fn tls_connector(ca_file: Option<&Path>) -> Result<MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for (i, cert) in read_ca_file(path)?.into_iter().enumerate() {
            roots.add(cert).map_err(|e| {
                StoreError::Postgres(format!(
                    "[store] postgres_ca_file {}: certificate {} cannot be a CA: {e}",
                    path.display(),
                    i + 1
                ))
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Postgres(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// What to do about a failed TLS connection, when the cause is known.
fn tls_hint(e: &postgres::Error, ca_file: Option<&Path>) -> Option<String> {
    use rustls::CertificateError as C;
    let trusted = match ca_file {
        Some(p) => format!("the Mozilla roots and {}", p.display()),
        None => "the Mozilla roots only, as [store] postgres_ca_file is not set".to_owned(),
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let tls = c.downcast_ref::<rustls::Error>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(cert)) = tls {
            return Some(match cert {
                C::UnknownIssuer | C::BadSignature => format!(
                    "the server's certificate is not signed by a trusted CA (trusting {trusted}): \
                     set [store] postgres_ca_file to the PEM file of the CA that signed it"
                ),
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "the server's certificate does not name the host in postgres_url: connect \
                     by a name (or IP address) the certificate lists in its subjectAltName, or \
                     reissue the certificate for this one"
                        .to_owned()
                }
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => {
                    "the server's certificate is expired or not yet valid: renew it, or check \
                     this machine's clock"
                        .to_owned()
                }
                // webpki's reason, not a rustls variant.
                other if format!("{other:?}").contains("CaUsedAsEndEntity") => {
                    "the server presents a CA certificate (basicConstraints CA:TRUE) as its own: \
                     give the server a certificate issued by that CA, or a self-signed one with \
                     CA:FALSE"
                        .to_owned()
                }
                _ => format!(
                    "the server's certificate was refused (trusting {trusted}): check the \
                     server's certificate and [store] postgres_ca_file"
                ),
            });
        }
        if tls.is_some() {
            return Some(
                "the TLS handshake failed: check the server's TLS settings (TLS 1.2 or newer)"
                    .to_owned(),
            );
        }
        cause = c.source();
    }
    pg_message(e)
        .contains("server does not support TLS")
        .then(|| {
            "the server has TLS off: turn ssl on in its postgresql.conf, or drop sslmode=require \
         from postgres_url to connect in plain text"
                .to_owned()
        })
}

/// `?N` placeholders to PostgreSQL's `$N` (outside quoted text).
fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted && chars.peek().is_some_and(|d| d.is_ascii_digit()) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

/// Prepared statements kept per connection; more distinct statements than this (dynamic
/// filters) start the cache over.
const MAX_CACHED_STATEMENTS: usize = 512;

/// One PostgreSQL connection with its prepared statements.
pub(crate) struct Pg {
    client: Option<postgres::Client>,
    target: PgTarget,
    stmts: HashMap<String, postgres::Statement>,
    in_tx: bool,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("database", &describe(&self.target.config))
            .field("tls", &self.target.tls())
            .field("in_tx", &self.in_tx)
            .finish_non_exhaustive()
    }
}

impl Pg {
    pub fn connect(target: &PgTarget) -> Result<Box<Pg>> {
        let client = target.connect()?;
        Ok(Box::new(Pg {
            client: Some(client),
            target: target.clone(),
            stmts: HashMap::new(),
            in_tx: false,
        }))
    }

    /// The client, connected again if the connection was lost (never inside a transaction:
    /// its statements would run outside it).
    fn client(&mut self) -> Result<&mut postgres::Client> {
        let usable = self.client.as_ref().is_some_and(|c| !c.is_closed());
        if !usable {
            if self.in_tx {
                return Err(StoreError::Postgres(
                    "connection lost inside a transaction; it was rolled back".into(),
                ));
            }
            self.stmts.clear();
            if let Some(old) = self.client.take() {
                off_runtime(move || drop(old));
            }
            self.client = Some(self.target.connect()?);
        }
        self.client
            .as_mut()
            .ok_or_else(|| StoreError::Postgres("no connection".into()))
    }

    fn statement(&mut self, sql: &str) -> std::result::Result<postgres::Statement, Failure> {
        if let Some(st) = self.stmts.get(sql) {
            return Ok(st.clone());
        }
        let text = pg_placeholders(sql);
        let client = self.client().map_err(Failure::Store)?;
        let st = off_runtime(|| client.prepare(&text)).map_err(Failure::Pg)?;
        if self.stmts.len() >= MAX_CACHED_STATEMENTS {
            self.stmts.clear();
        }
        self.stmts.insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    /// After a failed call: a statement that failed may be stale (schema changed by another
    /// replica), and a connection that failed (closed, I/O, a FATAL from the server) is
    /// dropped so the next call connects again. Returns whether the connection failed.
    fn failed(&mut self, sql: Option<&str>, e: &postgres::Error) -> bool {
        if let Some(sql) = sql {
            self.stmts.remove(sql);
        }
        let broken = e.is_closed()
            || self.client.as_ref().is_some_and(|c| c.is_closed())
            || e.as_db_error().map_or_else(
                || io_cause(e),
                |db| matches!(db.severity(), "FATAL" | "PANIC"),
            );
        if broken {
            self.stmts.clear();
            if let Some(old) = self.client.take() {
                off_runtime(move || drop(old));
            }
        }
        broken
    }

    /// Runs `op` with the prepared statement for `sql`. Outside a transaction, a call that
    /// fails because the connection broke (a restarted server, an idle connection closed) is
    /// tried once more on a new connection: the server did not run it, or (the connection broke
    /// after it did) running it again is harmless, as every statement this crate runs outside
    /// a transaction is an upsert, a delete or a read.
    fn run<T: Send>(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        op: impl Fn(
            &mut postgres::Client,
            &postgres::Statement,
            &[&(dyn ToSql + Sync)],
        ) -> std::result::Result<T, postgres::Error>
        + Send
        + std::marker::Sync,
    ) -> Result<T> {
        let mut retried = false;
        loop {
            let attempt = self.statement(sql).and_then(|st| {
                let client = self.client().map_err(Failure::Store)?;
                off_runtime(|| op(client, &st, params)).map_err(Failure::Pg)
            });
            match attempt {
                Ok(v) => return Ok(v),
                Err(Failure::Store(e)) => return Err(e),
                Err(Failure::Pg(e)) => {
                    let broken = self.failed(Some(sql), &e);
                    if broken && !self.in_tx && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(e.into());
                }
            }
        }
    }

    pub fn batch_execute(&mut self, sql: &str) -> Result<()> {
        let mut retried = false;
        loop {
            let client = self.client()?;
            match off_runtime(|| client.batch_execute(sql)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let broken = self.failed(None, &e);
                    if broken && !self.in_tx && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(e.into());
                }
            }
        }
    }
}

/// Why a call failed: the store's own error, or one from the server or connection.
enum Failure {
    Store(StoreError),
    Pg(postgres::Error),
}

/// Whether an error without a server message comes from the socket.
fn io_cause(e: &postgres::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Closing runs the client's runtime, which must not happen on an async worker.
        if let Some(client) = self.client.take() {
            off_runtime(move || drop(client));
        }
    }
}

/// A database connection of either kind. The store keeps one behind its mutex.
pub(crate) enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Sqlite(_) => f.write_str("Db::Sqlite"),
            Db::Postgres(pg) => write!(f, "Db::Postgres({pg:?})"),
        }
    }
}

fn sqlite_row(row: &rusqlite::Row<'_>, n: usize) -> Result<Row> {
    use rusqlite::types::ValueRef;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(match row.get_ref(i)? {
            ValueRef::Null => V::Null,
            ValueRef::Integer(v) => V::Int(v),
            ValueRef::Text(t) => V::Text(
                std::str::from_utf8(t)
                    .map_err(|e| StoreError::Corrupt {
                        table: "query result",
                        detail: format!("column {i}: {e}"),
                    })?
                    .to_owned(),
            ),
            ValueRef::Blob(b) => V::Blob(b.to_vec()),
            ValueRef::Real(_) => {
                return Err(StoreError::Corrupt {
                    table: "query result",
                    detail: format!("column {i}: unexpected real number"),
                });
            }
        });
    }
    Ok(Row(out))
}

fn pg_row(row: &postgres::Row) -> Result<Row> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let ty = col.type_();
        let v = match *ty {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(V::Int),
            Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map(|v| V::Int(v.into())),
            Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map(|v| V::Int(v.into())),
            Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(|v| V::Int(v.into())),
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(V::Blob),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                row.try_get::<_, Option<String>>(i)?.map(V::Text)
            }
            _ => {
                return Err(StoreError::Corrupt {
                    table: "query result",
                    detail: format!("column {i}: unsupported type {ty}"),
                });
            }
        };
        out.push(v.unwrap_or(V::Null));
    }
    Ok(Row(out))
}

fn pg_params<'a>(args: &'a [P<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

impl Db {
    pub fn dialect(&self) -> Dialect {
        match self {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
        }
    }

    /// The SQLite connection, for what only SQLite has (`VACUUM INTO` backups, pragmas).
    pub fn as_sqlite(&mut self) -> Option<&mut rusqlite::Connection> {
        match self {
            Db::Sqlite(c) => Some(c),
            Db::Postgres(_) => None,
        }
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn execute(&mut self, sql: &str, args: &[P<'_>]) -> Result<usize> {
        match self {
            Db::Sqlite(c) => Ok(c
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(args.iter()))?),
            Db::Postgres(pg) => {
                let n = pg.run(sql, &pg_params(args), |c, st, p| c.execute(st, p))?;
                Ok(usize::try_from(n).unwrap_or(usize::MAX))
            }
        }
    }

    /// Every row of a query.
    pub fn query(&mut self, sql: &str, args: &[P<'_>]) -> Result<Vec<Row>> {
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(args.iter()))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    out.push(sqlite_row(row, n)?);
                }
                Ok(out)
            }
            Db::Postgres(pg) => pg
                .run(sql, &pg_params(args), |c, st, p| c.query(st, p))?
                .iter()
                .map(pg_row)
                .collect(),
        }
    }

    /// The first row of a query, if any.
    pub fn query_opt(&mut self, sql: &str, args: &[P<'_>]) -> Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row of a query that always returns one (aggregates).
    pub fn query_one(&mut self, sql: &str, args: &[P<'_>]) -> Result<Row> {
        self.query_opt(sql, args)?
            .ok_or_else(|| StoreError::Corrupt {
                table: "query result",
                detail: "no row".into(),
            })
    }

    /// Runs statements without parameters (DDL, transaction control).
    pub fn batch_execute(&mut self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(pg) => pg.batch_execute(sql),
        }
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, rolled back when it
    /// returns an error or panics. SQLite takes the write lock at the start (`BEGIN
    /// IMMEDIATE`), so processes sharing the file wait for each other (busy timeout) instead of
    /// failing to upgrade a read lock.
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        struct Open<'a> {
            db: &'a mut Db,
            done: bool,
        }
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                if !self.done {
                    let _ = self.db.batch_execute("ROLLBACK");
                }
                if let Db::Postgres(pg) = self.db {
                    pg.in_tx = false;
                }
            }
        }
        match self {
            Db::Sqlite(c) => c.execute_batch("BEGIN IMMEDIATE")?,
            Db::Postgres(pg) => {
                pg.batch_execute("BEGIN")?;
                pg.in_tx = true;
            }
        }
        let mut open = Open {
            db: self,
            done: false,
        };
        let out = f(open.db)?;
        open.db.batch_execute("COMMIT")?;
        open.done = true;
        Ok(out)
    }

    /// Inserts or updates whole rows: `values` holds the rows one after the other, each with
    /// one value per column of `spec`. SQLite runs one prepared statement per row, in order.
    /// PostgreSQL sends all rows in one statement (one array per column); a key given twice
    /// keeps its last row (one statement cannot update a row twice), and rows go in key order
    /// so concurrent writers lock rows in the same order.
    pub fn upsert(&mut self, spec: &Upsert, values: &[P<'_>]) -> Result<()> {
        let n = spec.columns.len();
        if values.is_empty() {
            return Ok(());
        }
        if n == 0 || !values.len().is_multiple_of(n) {
            return Err(StoreError::Corrupt {
                table: spec.table,
                detail: format!("{} values for {n} columns", values.len()),
            });
        }
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(&spec.sqlite_sql())?;
                for row in values.chunks_exact(n) {
                    st.execute(rusqlite::params_from_iter(row.iter()))?;
                }
                Ok(())
            }
            Db::Postgres(pg) => {
                let mut rows: BTreeMap<&[P<'_>], &[P<'_>]> = BTreeMap::new();
                for row in values.chunks_exact(n) {
                    rows.insert(&row[..spec.key], row);
                }
                let mut cols: Vec<Col<'_>> = spec
                    .columns
                    .iter()
                    .map(|(_, ty)| match ty {
                        Ty::Int => Col::Int(Vec::with_capacity(rows.len())),
                        Ty::Text => Col::Text(Vec::with_capacity(rows.len())),
                    })
                    .collect();
                for row in rows.values() {
                    for (i, (v, col)) in row.iter().zip(cols.iter_mut()).enumerate() {
                        let ok = match (col, *v) {
                            (Col::Int(c), P::Int(x)) => {
                                c.push(Some(x));
                                true
                            }
                            (Col::Int(c), P::Null) => {
                                c.push(None);
                                true
                            }
                            (Col::Text(c), P::Text(x)) => {
                                c.push(Some(x));
                                true
                            }
                            (Col::Text(c), P::Null) => {
                                c.push(None);
                                true
                            }
                            _ => false,
                        };
                        if !ok {
                            return Err(StoreError::Corrupt {
                                table: spec.table,
                                detail: format!("column {}: wrong value type", spec.columns[i].0),
                            });
                        }
                    }
                }
                let params: Vec<&(dyn ToSql + Sync)> =
                    cols.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                pg.run(&spec.pg_sql(), &params, |c, st, p| c.execute(st, p))?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_translate_outside_quotes() {
        assert_eq!(
            pg_placeholders("SELECT '?1', x FROM t WHERE a = ?1 AND b = ?12 OR c = ?"),
            "SELECT '?1', x FROM t WHERE a = $1 AND b = $12 OR c = ?"
        );
    }

    #[test]
    fn passwords_are_redacted_in_every_form() {
        let msg = "failed for s3cr%2Ft and s3cr/t and hunter2 and pa ss";
        assert_eq!(
            redact(msg, "postgres://u:s3cr%2Ft@h:5432/db"),
            "failed for *** and *** and hunter2 and pa ss"
        );
        assert_eq!(
            redact(msg, "host=h user=u password=hunter2 dbname=x"),
            "failed for s3cr%2Ft and s3cr/t and *** and pa ss"
        );
        assert_eq!(
            redact(msg, "host=h password='pa ss'"),
            "failed for s3cr%2Ft and s3cr/t and hunter2 and ***"
        );
        assert_eq!(
            redact(msg, "postgres://h/db?password=hunter2"),
            redact(msg, "password=hunter2")
        );
    }

    #[test]
    fn a_bad_url_or_an_unreachable_server_never_shows_the_password() {
        let e = pg_config("postgres://tf:Sup3rS3cret@127.0.0.1:notaport/db").unwrap_err();
        let s = e.to_string();
        assert!(
            !s.contains("Sup3rS3cret") && s.contains("invalid PostgreSQL URL"),
            "{s}"
        );
        for url in [
            "postgres://tf:Sup3rS3cret@127.0.0.1:1/db",
            "postgres://tf:Sup3rS3cret@127.0.0.1:1/db?sslmode=require",
        ] {
            let mut target = PgTarget::new(url, &PostgresOptions::default()).unwrap();
            target.config.connect_timeout(Duration::from_secs(2));
            let e = Pg::connect(&target).unwrap_err();
            let s = format!("{e} {e:?}");
            assert!(!s.contains("Sup3rS3cret"), "{s}");
            assert!(s.contains("postgres://tf@127.0.0.1:1/db"), "{s}");
            assert!(!format!("{target:?}").contains("Sup3rS3cret"));
        }
    }

    #[test]
    fn upserts_render_for_both_dialects() {
        const T: Upsert = Upsert {
            table: "t",
            columns: &[("id", Ty::Text), ("n", Ty::Int), ("b", Ty::Text)],
            key: 1,
            only_if: Some("excluded.n > t.n"),
        };
        assert_eq!(
            T.sqlite_sql(),
            "INSERT INTO t (id, n, b) VALUES (?1, ?2, ?3) ON CONFLICT (id) DO UPDATE SET \
             n = excluded.n, b = excluded.b WHERE excluded.n > t.n"
        );
        assert_eq!(
            T.pg_sql(),
            "INSERT INTO t (id, n, b) SELECT * FROM unnest($1::text[], $2::bigint[], \
             $3::text[]) ON CONFLICT (id) DO UPDATE SET n = excluded.n, b = excluded.b \
             WHERE excluded.n > t.n"
        );
    }
}
