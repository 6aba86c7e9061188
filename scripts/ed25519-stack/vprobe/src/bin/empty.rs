#![no_std]
#![no_main]
#[path = "../common.rs"]
mod common;
fn nothing(pk: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool { core::hint::black_box((pk, msg, sig)); true }
probe!(nothing);
