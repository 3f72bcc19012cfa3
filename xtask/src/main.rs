//! `cargo run -p xtask -- dist-docs OUTDIR`: writes what the Debian package installs besides
//! the binaries and the files under `packaging/`, generated from the two command lines
//! (`deltavol::cli::Cli`, `deltavol_dataplane::cli::Cli`), so it never drifts from `--help`:
//!
//! ```text
//! OUTDIR/man/man1/deltavol.1, deltavol-add.1, ... (one page per subcommand, clap_mangen)
//! OUTDIR/man/man1/deltavol-dataplane.1, deltavol-dataplane-verify.1, deltavol-dataplane-gc.1
//! OUTDIR/completions/bash/deltavol, deltavol-dataplane        (clap_complete)
//! OUTDIR/completions/zsh/_deltavol, _deltavol-dataplane
//! OUTDIR/completions/fish/deltavol.fish, deltavol-dataplane.fish
//! ```
//!
//! The layout is the installed one (`/usr/share/man/man1`, `/usr/share/bash-completion/completions`,
//! `/usr/share/zsh/vendor-completions`, `/usr/share/fish/vendor_completions.d`). The pages are
//! plain roff; `scripts/build-deb` compresses them. These are build artifacts, never committed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::CommandFactory;
use clap_complete::Shell;

const USAGE: &str = "usage: cargo run -p xtask -- dist-docs OUTDIR";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, out] if cmd == "dist-docs" => {
            let written = dist_docs(Path::new(out))?;
            println!("xtask: wrote {} files under {out}", written.len());
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

/// The two commands, with the extra man-page text each gets.
fn commands() -> Vec<(clap::Command, &'static str)> {
    vec![
        (deltavol::cli::Cli::command(), DELTAVOL_EXTRA),
        (deltavol_dataplane::cli::Cli::command(), DATAPLANE_EXTRA),
    ]
}

/// Extra sections of the top-level `deltavol(1)` page (roff).
const DELTAVOL_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/deltavol/agent.toml\fR
The node agent's configuration (\fBdeltavol agent\fR), run by \fIdeltavol-agent.service\fR.
.TP
\fI/etc/deltavol/token\fR
The data plane's shared secret, by convention (\fB\-\-auth\-token\-file\fR).
.TP
\fI/run/deltavol/\fR
The volume daemons' control sockets.
.SH ENVIRONMENT
.TP
\fBDELTAVOL_LOG\fR
Log filter of the daemons (tracing's env-filter syntax, e.g. \fBdebug\fR).
.SH "SEE ALSO"
\fBdeltavol\-dataplane\fR(1), \fBsystemctl\fR(1); each subcommand has its page, e.g.
\fBdeltavol\-add\fR(1); /usr/share/doc/deltavol/ (README.md, README.Debian)
"#;

/// Extra sections of the top-level `deltavol-dataplane(1)` page (roff).
const DATAPLANE_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/deltavol/dataplane.toml\fR
The configuration: every option is a key (the flag's long name with _ for \-); flags override it.
.TP
\fI/var/lib/deltavol\-dataplane\fR
The data directory of the packaged service (\fIdeltavol\-dataplane.service\fR).
.SH "SEE ALSO"
\fBdeltavol\fR(1), \fBdeltavol\-dataplane\-verify\fR(1), \fBdeltavol\-dataplane\-gc\fR(1),
\fBsystemd.service\fR(5); /usr/share/doc/deltavol/ (README.dataplane.md, README.Debian)
"#;

/// Writes the man pages and completions under `out`; returns the files written.
pub fn dist_docs(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man_dir = out.join("man/man1");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    let mut written = Vec::new();
    for (cmd, extra) in commands() {
        written.extend(man_pages(cmd.clone(), &man_dir, extra)?);
        written.extend(completions(cmd, out)?);
    }
    Ok(written)
}

/// One page for `cmd` and one for each of its (non-hidden) subcommands, recursively, named
/// like `git`'s: `deltavol-add.1`, `deltavol-volume-info.1`. `extra` is appended to the
/// top-level page.
fn man_pages(cmd: clap::Command, dir: &Path, extra: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    page(&cmd, dir, extra, &mut written)?;
    Ok(written)
}

fn page(
    cmd: &clap::Command,
    dir: &Path,
    extra: &str,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub, dir, "", written)?;
    }
    let man = clap_mangen::Man::new(cmd.clone());
    let path = dir.join(man.get_filename());
    let mut roff = Vec::new();
    man.render(&mut roff)
        .with_context(|| format!("rendering {}", path.display()))?;
    roff.extend_from_slice(extra.as_bytes());
    std::fs::write(&path, roff).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    Ok(())
}

/// bash, zsh and fish completions of `cmd`, under the names those shells look up.
fn completions(mut cmd: clap::Command, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    let mut written = Vec::new();
    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join("completions").join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut buf);
        let path = dir.join(file);
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand of both commands gets a page; completions name every subcommand.
    #[test]
    fn dist_docs_writes_a_page_per_subcommand_and_the_completions() {
        let dir = tempfile::tempdir().expect("tempdir");
        dist_docs(dir.path()).expect("dist-docs");
        let man = dir.path().join("man/man1");
        for (cmd, _) in commands() {
            let name = cmd.get_name().to_string();
            let top = std::fs::read_to_string(man.join(format!("{name}.1"))).expect("top page");
            assert!(top.contains(".SH FILES"), "{name}.1 has its extra sections");
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let page = man.join(format!("{name}-{}.1", sub.get_name()));
                let text = std::fs::read_to_string(&page)
                    .unwrap_or_else(|e| panic!("{}: {e}", page.display()));
                assert!(text.starts_with(".ie \\n(.g"), "{}: roff", page.display());
                let bash = std::fs::read_to_string(dir.path().join("completions/bash").join(&name))
                    .expect("bash completion");
                assert!(
                    bash.contains(sub.get_name()),
                    "bash knows {}",
                    sub.get_name()
                );
            }
            assert!(dir
                .path()
                .join(format!("completions/zsh/_{name}"))
                .is_file());
            assert!(dir
                .path()
                .join(format!("completions/fish/{name}.fish"))
                .is_file());
        }
        assert!(man.join("deltavol-add.1").is_file());
        assert!(man.join("deltavol-dataplane-gc.1").is_file());
        let dp = std::fs::read_to_string(man.join("deltavol-dataplane.1")).expect("page");
        assert!(
            dp.contains("dataplane.toml"),
            "the config file is in the page"
        );
    }

    /// The commented example agent.toml names every flag of `deltavol agent`, and its values,
    /// all uncommented, are accepted by the agent.
    #[test]
    fn the_packaged_agent_example_names_every_key_and_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
        let text = std::fs::read_to_string(&path).expect("packaging/agent.toml");
        let settings: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                })
            })
            .collect();
        let cli = deltavol::cli::Cli::command();
        let agent = cli.find_subcommand("agent").expect("deltavol agent");
        for flag in agent
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !matches!(*l, "help" | "config"))
        {
            let key = flag.replace('-', "_");
            assert!(
                settings.iter().any(|l| l.starts_with(&format!("{key} = "))),
                "packaging/agent.toml does not mention {key}"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let all = dir.path().join("agent.toml");
        std::fs::write(&all, settings.join("\n")).expect("write");
        let args = deltavol::agent::config::AgentArgs {
            config: Some(all),
            ..Default::default()
        };
        args.resolve().expect("every example value is accepted");
    }
}
