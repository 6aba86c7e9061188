//! Test databases of both kinds: SQLite in a temporary directory, always; PostgreSQL when
//! `TF_POSTGRES_URL` names a server (`eval "$(scripts/ensure-postgres.sh)"` starts one), each
//! test in a database of its own (`t_<random>`, dropped afterwards) so tests run in parallel.
//! Without the variable the PostgreSQL half is skipped with a message, unless
//! `TF_REQUIRE_POSTGRES=1` (`scripts/test.sh`), which makes it a failure.

use std::path::Path;

use rand::RngCore;

use crate::{Result, Store};

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
        let Ok(admin_url) = std::env::var("TF_POSTGRES_URL") else {
            assert!(
                std::env::var("TF_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "TF_REQUIRE_POSTGRES=1 but TF_POSTGRES_URL is not set: \
                 run eval \"$(scripts/ensure-postgres.sh)\""
            );
            eprintln!(
                "SKIPPED (PostgreSQL half): TF_POSTGRES_URL is not set; \
                 eval \"$(scripts/ensure-postgres.sh)\" starts a test server"
            );
            return None;
        };
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
