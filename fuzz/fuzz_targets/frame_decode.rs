//! Fuzz target: the data plane's frame decoder over every message type. Whatever the bytes, it
//! must not panic; every accepted frame lies inside the input and inside the caps, and every
//! field of its verified flatbuffer header reads without panicking. The input is read as a
//! stream of frames, the way a connection carries them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    deltavol_schemas::fuzz_decode_one(data);
});
