//! Test databases of both kinds: SQLite in a temporary directory, always; PostgreSQL when
//! `TF_POSTGRES_URL` names a server (`eval "$(scripts/ensure-postgres.sh)"` starts one), each
//! test in a database of its own (`t_<random>`, dropped afterwards) so tests run in parallel.
//! Without the variable the PostgreSQL half is skipped with a message, unless
//! `TF_REQUIRE_POSTGRES=1` (`scripts/test.sh`), which makes it a failure. The TLS tests also
//! need `TF_POSTGRES_CA`, the CA of the test server's certificate (the same script prints it).

use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::{PostgresOptions, Result, Store};

fn require_postgres() -> bool {
    std::env::var("TF_REQUIRE_POSTGRES").as_deref() == Ok("1")
}

/// The test server's setting `var`, or `None` with a message naming what is `skipped` (a
/// failure with `TF_REQUIRE_POSTGRES=1`).
fn server_setting(var: &str, skipped: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) => Some(value),
        Err(_) => {
            assert!(
                !require_postgres(),
                "TF_REQUIRE_POSTGRES=1 but {var} is not set: \
                 run eval \"$(scripts/ensure-postgres.sh)\""
            );
            eprintln!(
                "SKIPPED ({skipped}): {var} is not set; \
                 eval \"$(scripts/ensure-postgres.sh)\" starts a test server with TLS"
            );
            None
        }
    }
}

/// The CA file of the test server's TLS certificate (`TF_POSTGRES_CA`).
pub(crate) fn postgres_ca() -> Option<PathBuf> {
    server_setting("TF_POSTGRES_CA", "PostgreSQL TLS").map(PathBuf::from)
}

/// `url` with one more setting (`key=value`), in URL or `key=value` form.
pub(crate) fn with_setting(url: &str, setting: &str) -> String {
    if url.contains("://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{setting}")
    } else {
        format!("{url} {setting}")
    }
}

/// `postgres://user@host:port/...` with another host (URL form only).
pub(crate) fn with_host(url: &str, host: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, hp)) => (Some(u), hp),
        None => (None, authority),
    };
    let port = hostport.rsplit_once(':').map(|(_, p)| p);
    let mut out = format!("{scheme}://");
    if let Some(u) = user {
        out.push_str(u);
        out.push('@');
    }
    out.push_str(host);
    if let Some(p) = port {
        out.push(':');
        out.push_str(p);
    }
    out.push_str(tail);
    Some(out)
}

/// One database to run a test against, with its data directory.
pub(crate) struct TestDb {
    dir: tempfile::TempDir,
    pg: Option<PgDatabase>,
}

struct PgDatabase {
    admin_url: String,
    name: String,
    url: String,
}

/// `url` with its database name replaced (URL form or `key=value` settings).
fn with_dbname(url: &str, db: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (before_query, query) = match rest.split_once('?') {
                Some((a, q)) => (a, Some(q)),
                None => (rest, None),
            };
            let authority = before_query.split('/').next().unwrap_or("");
            let mut out = format!("{scheme}://{authority}/{db}");
            if let Some(q) = query {
                out.push('?');
                out.push_str(q);
            }
            out
        }
        None => format!("{url} dbname={db}"),
    }
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        TestDb {
            dir: tempfile::tempdir().unwrap(),
            pg: None,
        }
    }

    /// A fresh PostgreSQL database, or `None` (with a message) when no server is configured.
    pub fn postgres() -> Option<TestDb> {
        let admin_url = server_setting("TF_POSTGRES_URL", "PostgreSQL half")?;
        let mut suffix = [0u8; 8];
        rand::rng().fill_bytes(&mut suffix);
        let name = format!("t_{}", hex::encode(suffix));
        let mut admin = postgres::Client::connect(&admin_url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to TF_POSTGRES_URL: {e}"));
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let url = with_dbname(&admin_url, &name);
        Some(TestDb {
            dir: tempfile::tempdir().unwrap(),
            pg: Some(PgDatabase {
                admin_url,
                name,
                url,
            }),
        })
    }

    /// SQLite, and PostgreSQL when configured.
    pub fn all() -> Vec<TestDb> {
        let mut out = vec![TestDb::sqlite()];
        out.extend(TestDb::postgres());
        out
    }

    pub fn name(&self) -> &'static str {
        if self.pg.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test database's URL (PostgreSQL).
    pub fn url(&self) -> Option<&str> {
        self.pg.as_ref().map(|p| p.url.as_str())
    }

    /// A direct connection to the test database, for checks under the store.
    pub fn raw_postgres(&self) -> Option<postgres::Client> {
        self.url()
            .map(|u| postgres::Client::connect(u, postgres::NoTls).unwrap())
    }

    pub fn try_open(&self) -> Result<Store> {
        match &self.pg {
            None => Store::open(self.dir.path()),
            Some(pg) => Store::open_postgres(self.dir.path(), &pg.url),
        }
    }

    /// Opens a store on this PostgreSQL database through `url` (this database's URL with other
    /// settings) and `options`.
    pub fn try_open_postgres_with(&self, url: &str, options: &PostgresOptions) -> Result<Store> {
        Store::open_postgres_with(self.dir.path(), url, options)
    }

    /// Opens a store on this database (another call: another replica of the same data).
    pub fn open(&self) -> Store {
        self.try_open()
            .unwrap_or_else(|e| panic!("open {}: {e}", self.name()))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(pg) = &self.pg
            && let Ok(mut admin) = postgres::Client::connect(&pg.admin_url, postgres::NoTls)
        {
            let _ =
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", pg.name));
        }
    }
}

#[test]
fn database_names_replace_the_url_path() {
    assert_eq!(
        with_dbname("postgres://u:p@h:5/postgres", "t_1"),
        "postgres://u:p@h:5/t_1"
    );
    assert_eq!(
        with_dbname("postgresql://h?sslmode=disable", "t_1"),
        "postgresql://h/t_1?sslmode=disable"
    );
    assert_eq!(
        with_dbname("host=h user=u", "t_1"),
        "host=h user=u dbname=t_1"
    );
}

#[test]
fn settings_and_hosts_are_replaced_in_urls() {
    assert_eq!(
        with_setting("postgres://u@h:5/db", "sslmode=require"),
        "postgres://u@h:5/db?sslmode=require"
    );
    assert_eq!(
        with_setting("postgres://u@h:5/db?a=b", "sslmode=require"),
        "postgres://u@h:5/db?a=b&sslmode=require"
    );
    assert_eq!(
        with_setting("host=h user=u", "sslmode=require"),
        "host=h user=u sslmode=require"
    );
    assert_eq!(
        with_host("postgres://u@127.0.0.1:5/db?x=y", "localhost").as_deref(),
        Some("postgres://u@localhost:5/db?x=y")
    );
    assert_eq!(
        with_host("postgres://h/db", "k").as_deref(),
        Some("postgres://k/db")
    );
    assert_eq!(with_host("host=h", "k"), None);
}
