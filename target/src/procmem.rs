//! This process's resident memory, from `/proc/self/status` (`VmRSS`, `VmHWM`): what
//! `deltavol status` reports beside the read cache, and what the engine bench measures.

/// Resident and peak resident memory of this process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

/// Reads this process's [`Resident`] memory.
pub fn resident() -> std::io::Result<Resident> {
    let text = std::fs::read_to_string("/proc/self/status")?;
    parse_status(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no VmRSS / VmHWM in /proc/self/status",
        )
    })
}

/// `VmRSS` and `VmHWM` of a `/proc/PID/status` text.
pub fn parse_status(text: &str) -> Option<Resident> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    Some(Resident {
        rss_bytes: field("VmRSS:")?,
        hwm_bytes: field("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format_and_refuses_others() {
        let text = "Name:\tdeltavol\nVmHWM:\t  123456 kB\nVmRSS:\t   98304 kB\nThreads:\t7\n";
        assert_eq!(
            parse_status(text),
            Some(Resident {
                rss_bytes: 98_304 * 1024,
                hwm_bytes: 123_456 * 1024
            })
        );
        assert_eq!(parse_status("VmRSS:\t1 kB\n"), None, "no VmHWM");
        assert_eq!(parse_status("VmRSS:\tx kB\nVmHWM:\t1 kB\n"), None);
        assert_eq!(parse_status("VmRSS:\t1 MB\nVmHWM:\t1 kB\n"), None);
        let own = resident().expect("this process's status");
        assert!(own.rss_bytes > 0 && own.hwm_bytes >= own.rss_bytes);
    }
}
