//! Fuzz target: client flags and option requests as a server reads them (body in `nbd::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbd::fuzz::decode_option(data));
