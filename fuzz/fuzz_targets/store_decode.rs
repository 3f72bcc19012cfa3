//! Fuzz target: the data plane's on-disk decoders (manifest, segment footer, header and
//! trailer). See `deltavol_fuzz::store` for the input layout and the checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    deltavol_fuzz::store::run(data);
});
