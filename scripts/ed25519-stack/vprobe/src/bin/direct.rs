#![no_std]
#![no_main]
#[path = "../common.rs"]
mod common;
probe!(vlib::direct::verify);
