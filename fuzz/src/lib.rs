//! Harnesses shared by the fuzz targets and by the test that checks the committed seeds
//! (`dataplane-server/tests/fuzz_seeds.rs` includes [`store`] by path).

pub mod store;
