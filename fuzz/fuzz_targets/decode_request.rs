//! Fuzz target: transmission-phase requests as a server reads them (body in `nbd::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbd::fuzz::decode_request(data));
