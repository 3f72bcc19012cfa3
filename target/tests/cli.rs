//! The CLI's error paths on a host without a ublk driver: every bad input gets a clear message
//! and a non-zero exit, and nothing is created.

mod common;
use common::deltavol;

#[test]
fn add_rejects_bad_arguments_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let backing = dir.path().join("b.img");
    let (c, p) = (cache.to_str().unwrap(), backing.to_str().unwrap());
    let cases: &[(&[&str], &str)] = &[
        (&["--size", "12XB"], "unknown unit"),
        (&["--size", "1.5G"], "invalid value"),
        (&["--size", "4097"], "multiple of 4KiB"),
        (
            &["--size", "1G", "--queues", "0"],
            "--queues 0 is out of range",
        ),
        (
            &["--size", "1G", "--depth", "5000"],
            "--depth 5000 is out of range",
        ),
        (&["--size", "1G", "--flush-interval-ms", "0"], "at least 1"),
        (
            &["--size", "1G", "--hydrate-readahead", "100KiB"],
            "--hydrate-readahead 102400 is not a multiple of 256KiB",
        ),
        (
            &["--size", "1G", "--hydrate-readahead", "128MiB"],
            "up to 64MiB",
        ),
        (&["--size", "1G", "--cache-limit", "lots"], "invalid value"),
        (
            &["--size", "1G", "--metrics-listen", "localhost"],
            "invalid value 'localhost' for '--metrics-listen <ADDR>'",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["add", "--name", "v1", "--cache-dir", c, "--backing", p];
        args.extend_from_slice(extra);
        let (code, _, err) = deltavol(&args);
        assert_ne!(code, 0, "{extra:?} must fail");
        assert!(err.contains(want), "{extra:?}: expected {want:?} in: {err}");
    }
    let (code, _, err) = deltavol(&[
        "add",
        "--name",
        "../x",
        "--size",
        "1G",
        "--cache-dir",
        c,
        "--backing",
        p,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid volume name"), "{err}");
    assert!(
        !cache.exists() && !backing.exists(),
        "bad arguments must not create files"
    );
}

#[test]
fn add_without_ublk_driver_says_how_to_get_it() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("skipped: this host has /dev/ublk-control (the VM drills cover it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("cache");
    let b = dir.path().join("b.img");
    let (code, out, err) = deltavol(&[
        "add",
        "--name",
        "v1",
        "--size",
        "64MiB",
        "--cache-dir",
        c.to_str().unwrap(),
        "--backing",
        b.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "no device printed: {out}");
    assert!(err.contains("modprobe ublk_drv"), "{err}");
}

#[test]
fn commands_on_unknown_volumes_fail_clearly() {
    for cmd in ["status", "del", "flush"] {
        let (code, _, err) = deltavol(&[cmd, "nosuchvol"]);
        assert_ne!(code, 0);
        assert!(err.contains("is not attached"), "{cmd}: {err}");
    }
    let (code, out, _) = deltavol(&["list", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "[]");
}

/// `recover --at` with a time that is no time: refused before anything else (no driver check,
/// no data plane contacted, nothing fenced), saying which forms are accepted.
#[test]
fn recover_at_a_bad_time_is_refused_first() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, "t").unwrap();
    let (c, b) = (dir.path().join("cache"), dir.path().join("b.img"));
    for bad in ["yesterday-ish", "2025-13-40 25:61", "-15parsecs"] {
        let (code, out, err) = deltavol(&[
            "recover",
            "v1",
            "--at",
            bad,
            "--cache-dir",
            c.to_str().unwrap(),
            "--backing",
            b.to_str().unwrap(),
            "--dataplane",
            "127.0.0.1:1",
            "--auth-token-file",
            tok.to_str().unwrap(),
        ]);
        assert_ne!(code, 0, "{bad}");
        assert!(out.is_empty(), "{bad}: {out}");
        assert!(
            err.contains(&format!("--at {bad:?}")) && err.contains("RFC 3339"),
            "{bad}: {err}"
        );
    }
    // A relative age starts with '-': taken as the value, parsed, and the driver check is next.
    let (code, _, err) = deltavol(&[
        "recover",
        "v1",
        "--at",
        "-15m",
        "--cache-dir",
        c.to_str().unwrap(),
        "--backing",
        b.to_str().unwrap(),
        "--dataplane",
        "127.0.0.1:1",
        "--auth-token-file",
        tok.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("modprobe ublk_drv"), "{err}");
    assert!(!c.exists() && !b.exists(), "nothing created");
}
