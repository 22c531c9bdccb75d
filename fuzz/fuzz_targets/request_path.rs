//! `cargo fuzz run request_path`: see fuzz/request_path.rs for what is checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../request_path.rs"]
mod request_path;

fuzz_target!(|data: &[u8]| request_path::check_request_path(data));
