//! `cargo fuzz run headers`: see fuzz/invariants.rs for what is checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::check_headers(data));
