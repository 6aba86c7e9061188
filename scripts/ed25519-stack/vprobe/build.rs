//! Links with this crate's `link.x`. Passed from here rather than from `.cargo/config.toml`
//! rustflags so that a `RUSTFLAGS` in the environment (which replaces config rustflags) cannot
//! drop it.
use std::{env, path::PathBuf};

fn main() {
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    println!("cargo:rustc-link-search={}", dir.display());
    println!("cargo:rustc-link-arg-bins=-Tlink.x");
    println!("cargo:rerun-if-changed=link.x");
    println!("cargo:rerun-if-changed=build.rs");
}
