//! PostgreSQL over TLS (`sslmode=require`, `[store] postgres_ca_file`) against the test server,
//! which serves TLS with a certificate for 127.0.0.1 and localhost signed by a private CA
//! (`scripts/ensure-postgres.sh`, `TF_POSTGRES_CA`); and the settings' errors, which need no
//! server.

use std::path::PathBuf;

use crate::db::PgTarget;
use crate::testing::{TestDb, postgres_ca, with_host, with_setting};
use crate::{PostgresOptions, StoreError};

/// A CA certificate (self-signed, valid until 2126) that signed nothing.
const OTHER_CA: &str = include_str!("../testdata/other-ca.pem");

fn with_ca(ca: PathBuf) -> PostgresOptions {
    PostgresOptions { ca_file: Some(ca) }
}

/// The test database and the CA, or `None` (skipped) without a server with TLS.
fn tls_db() -> Option<(TestDb, PathBuf)> {
    let t = TestDb::postgres()?;
    let ca = postgres_ca()?;
    Some((t, ca))
}

fn message(e: StoreError) -> String {
    match e {
        StoreError::Postgres(m) => m,
        other => panic!("expected a PostgreSQL error, got {other:?}"),
    }
}

#[test]
fn sslmode_require_with_the_ca_file_encrypts_every_connection() {
    let Some((t, ca)) = tls_db() else { return };
    let url = with_setting(t.url().unwrap(), "sslmode=require");
    let store = t
        .try_open_postgres_with(&url, &with_ca(ca.clone()))
        .unwrap();
    assert_eq!(store.postgres_ssl().unwrap(), Some(true));
    // The store works over it, and its sections' connections use TLS too.
    store
        .registry()
        .provision("d1", Default::default())
        .unwrap();
    let guard = store.exclusive("ingest").unwrap();
    let mut raw = t.raw_postgres().unwrap();
    let row = raw
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()",
            &[],
        )
        .unwrap();
    let (count, all_tls): (i64, Option<bool>) = (row.get(0), row.get(1));
    assert!(
        count >= 2,
        "the store's and the section's connections: {count}"
    );
    assert_eq!(all_tls, Some(true));
    drop(guard);
    // A connection the server ended is opened again the same way.
    raw.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    )
    .unwrap();
    assert_eq!(store.postgres_ssl().unwrap(), Some(true));
    drop(store);

    // The certificate names localhost too (DNS), not only 127.0.0.1 (IP).
    if let Some(url) = with_host(&url, "localhost") {
        let store = t.try_open_postgres_with(&url, &with_ca(ca)).unwrap();
        assert_eq!(store.postgres_ssl().unwrap(), Some(true));
        assert!(store.registry().get("d1").is_some());
    }
}

#[test]
fn an_unknown_ca_or_another_host_name_is_refused_with_the_fix_named() {
    let Some((t, ca)) = tls_db() else { return };
    let url = with_setting(t.url().unwrap(), "sslmode=require");
    // Without the CA file, the Mozilla roots do not know the test CA.
    let e = message(
        t.try_open_postgres_with(&url, &PostgresOptions::default())
            .unwrap_err(),
    );
    assert!(e.contains("over TLS"), "{e}");
    assert!(e.contains("certificate") && e.contains("CA"), "{e}");
    assert!(e.contains("postgres_ca_file"), "{e}");
    // Another CA than the one that signed the server's certificate: the same, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, OTHER_CA).unwrap();
    let e = message(t.try_open_postgres_with(&url, &with_ca(other)).unwrap_err());
    assert!(e.contains("not signed by a trusted CA"), "{e}");
    assert!(
        e.contains("other-ca.pem") && e.contains("postgres_ca_file"),
        "{e}"
    );

    // The right CA, but the server reached under a name its certificate does not list.
    if let Some(other) = with_host(&url, "db.tinyfleet.invalid") {
        let other = with_setting(&other, "hostaddr=127.0.0.1");
        let e = message(t.try_open_postgres_with(&other, &with_ca(ca)).unwrap_err());
        assert!(e.contains("does not name the host"), "{e}");
        assert!(e.contains("subjectAltName"), "{e}");
    }
}

#[test]
fn the_default_url_stays_plain_text() {
    // The server offers TLS, but without sslmode=require the store connects as before.
    let Some(t) = TestDb::postgres() else { return };
    let store = t.open();
    assert_eq!(store.postgres_ssl().unwrap(), Some(false));
    let url = with_setting(t.url().unwrap(), "sslmode=disable");
    let store = t
        .try_open_postgres_with(&url, &PostgresOptions::default())
        .unwrap();
    assert_eq!(store.postgres_ssl().unwrap(), Some(false));
}

#[test]
fn tls_settings_are_checked_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let url = "postgres://tf:Sup3rS3cret@127.0.0.1:1/db";
    let tls_url = format!("{url}?sslmode=require");
    let err = |url: &str, ca: Option<PathBuf>| {
        let e = PgTarget::new(url, &PostgresOptions { ca_file: ca }).unwrap_err();
        let s = e.to_string();
        assert!(!s.contains("Sup3rS3cret"), "{s}");
        s
    };

    // A CA file without sslmode=require would be ignored: refused.
    let pem = dir.path().join("ca.pem");
    let e = err(url, Some(pem.clone()));
    assert!(
        e.contains("postgres_ca_file") && e.contains("sslmode=require"),
        "{e}"
    );
    // Missing, not PEM, no certificate in it.
    let e = err(&tls_url, Some(pem.clone()));
    assert!(
        e.contains("postgres_ca_file") && e.contains("cannot read"),
        "{e}"
    );
    std::fs::write(&pem, "not a certificate\n").unwrap();
    let e = err(&tls_url, Some(pem.clone()));
    assert!(e.contains("no certificate"), "{e}");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = err(&tls_url, Some(pem.clone()));
    assert!(e.contains("not valid PEM"), "{e}");
    std::fs::write(
        &pem,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = err(&tls_url, Some(pem));
    assert!(e.contains("cannot be a CA"), "{e}");
    // libpq's verify-full is what require does here: the message says so.
    let e = err(&format!("{url}?sslmode=verify-full"), None);
    assert!(e.contains("use sslmode=require"), "{e}");

    // Plain and TLS settings without a CA file are fine.
    for url in [url, &tls_url, &format!("{url}?sslmode=disable")] {
        let target = PgTarget::new(url, &PostgresOptions::default()).unwrap();
        assert_eq!(target.tls(), url.ends_with("require"));
    }
    // A CA certificate is accepted, also after another one (a bundle).
    let pem = dir.path().join("bundle.pem");
    std::fs::write(&pem, format!("{OTHER_CA}{OTHER_CA}")).unwrap();
    assert!(PgTarget::new(&tls_url, &with_ca(pem)).unwrap().tls());
}
