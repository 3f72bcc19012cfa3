//! Fuzz target: the frame decoder must never panic and, when it accepts a frame, every field
//! of the verified header must be readable without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    deltavol_schemas::fuzz_decode_one(data);
});
