//! How a long life starts the data plane ([`ServerProcess`]): the store flags and any extra
//! flags given with `--server-arg` passed through, no config file unless one is named, and
//! more time to start, an object store's volumes included.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::server::{self, ServerProcess};

/// Time the server has to print its `listening on` line (an object store's volumes included).
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start the server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub bin: PathBuf,
    pub data_dir: PathBuf,
    pub threads: usize,
    pub token_file: PathBuf,
    /// `--store s3 --s3-endpoint ...` (empty for the local store, the server's default).
    pub store_args: Vec<String>,
    /// `--server-arg` values, passed through as given, after everything else.
    pub extra_args: Vec<String>,
}

impl ServerSpec {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        // A config file in /etc must not change what is measured, unless the caller named one.
        if !self
            .extra_args
            .iter()
            .any(|x| x == "--config" || x.starts_with("--config=") || x == "--no-config")
        {
            a.push("--no-config".into());
        }
        a.extend(server::serve_args(
            &self.data_dir,
            self.threads,
            &self.token_file,
        ));
        a.extend(self.store_args.iter().map(OsString::from));
        a.extend(self.extra_args.iter().map(OsString::from));
        a
    }

    /// The command line, for the report.
    pub fn command_line(&self) -> Vec<String> {
        std::iter::once(self.bin.display().to_string())
            .chain(self.args().iter().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }

    /// Starts the server, its stderr into `log`; returns once it listens.
    pub fn start(&self, log: &Path) -> anyhow::Result<ServerProcess> {
        ServerProcess::start(&self.bin, &self.args(), log, SERVER_START_TIMEOUT)
    }
}
