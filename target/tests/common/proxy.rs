//! A fault proxy on 127.0.0.1 between the compute side and a real data plane: it passes
//! bytes through, and on command refuses connections, cuts live ones (the data plane vanishes
//! mid-stream), stalls the data plane's answers, or flips bytes in them. The client then sees
//! real network faults. Every fault is counted.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// New connections are accepted and closed at once (the data plane is "down").
    Refuse,
    /// Each chunk of the data plane's answers waits this long first.
    Stall(Duration),
    /// In the first `conns` connections accepted from now on, the byte at offset `at` of the
    /// data plane's answer stream is flipped.
    Corrupt {
        at: u64,
        conns: u64,
    },
}

/// Faults the proxy injected.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProxyCounts {
    pub connections: u64,
    pub refused: u64,
    pub cut: u64,
    pub stalled_chunks: u64,
    pub corrupted_bytes: u64,
}

struct Ctl {
    upstream: String,
    mode: Mutex<Mode>,
    /// Connections accepted since the last `Corrupt` mode was set.
    corrupt_seen: AtomicU64,
    /// Client-to-server bytes left before the proxy vanishes (negative: not armed).
    vanish_budget: AtomicI64,
    live: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    connections: AtomicU64,
    refused: AtomicU64,
    cut: AtomicU64,
    stalled: AtomicU64,
    corrupted: AtomicU64,
}

pub struct Proxy {
    pub addr: String,
    ctl: Arc<Ctl>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let ctl = Arc::new(Ctl {
            upstream: upstream.to_string(),
            mode: Mutex::new(Mode::Pass),
            corrupt_seen: AtomicU64::new(0),
            vanish_budget: AtomicI64::new(-1),
            live: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            corrupted: AtomicU64::new(0),
        });
        let c2 = ctl.clone();
        l.set_nonblocking(true).unwrap();
        std::thread::spawn(move || accept_loop(l, c2));
        Proxy { addr, ctl }
    }

    pub fn set_mode(&self, m: Mode) {
        if matches!(m, Mode::Corrupt { .. }) {
            self.ctl.corrupt_seen.store(0, SeqCst);
        }
        *self.ctl.mode.lock().unwrap() = m;
    }

    /// Cuts every live connection now and refuses new ones (until `set_mode(Pass)`).
    pub fn vanish(&self) {
        vanish(&self.ctl);
    }

    /// Vanishes once `bytes` more bytes went from the client to the data plane.
    pub fn vanish_after(&self, bytes: i64) {
        self.ctl.vanish_budget.store(bytes, SeqCst);
    }

    pub fn counts(&self) -> ProxyCounts {
        let c = &self.ctl;
        ProxyCounts {
            connections: c.connections.load(SeqCst),
            refused: c.refused.load(SeqCst),
            cut: c.cut.load(SeqCst),
            stalled_chunks: c.stalled.load(SeqCst),
            corrupted_bytes: c.corrupted.load(SeqCst),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.ctl.stop.store(true, SeqCst);
        for s in self.ctl.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn vanish(c: &Ctl) {
    *c.mode.lock().unwrap() = Mode::Refuse;
    c.vanish_budget.store(-1, SeqCst);
    for s in c.live.lock().unwrap().drain(..) {
        if s.shutdown(Shutdown::Both).is_ok() {
            c.cut.fetch_add(1, SeqCst);
        }
    }
}

fn accept_loop(l: TcpListener, c: Arc<Ctl>) {
    while !c.stop.load(SeqCst) {
        let (down, _) = match l.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        let _ = down.set_nonblocking(false);
        c.connections.fetch_add(1, SeqCst);
        let mode = *c.mode.lock().unwrap();
        if mode == Mode::Refuse {
            c.refused.fetch_add(1, SeqCst);
            let _ = down.shutdown(Shutdown::Both);
            continue;
        }
        let corrupt_at = match mode {
            Mode::Corrupt { at, conns } if c.corrupt_seen.fetch_add(1, SeqCst) < conns => Some(at),
            _ => None,
        };
        let Ok(up) = TcpStream::connect(&c.upstream) else {
            c.refused.fetch_add(1, SeqCst);
            let _ = down.shutdown(Shutdown::Both);
            continue;
        };
        let _ = up.set_nodelay(true);
        let _ = down.set_nodelay(true);
        {
            let mut live = c.live.lock().unwrap();
            live.push(down.try_clone().unwrap());
            live.push(up.try_clone().unwrap());
        }
        let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        let c1 = c.clone();
        std::thread::spawn(move || pump(down, up, c1, true, None));
        let c2 = c.clone();
        std::thread::spawn(move || pump(u2, d2, c2, false, corrupt_at));
    }
}

/// Copies `from` to `to`; `upload`: client to data plane, else the answers.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    c: Arc<Ctl>,
    upload: bool,
    corrupt_at: Option<u64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if upload {
            let b = c.vanish_budget.load(SeqCst);
            if b >= 0 {
                let left = c.vanish_budget.fetch_sub(n as i64, SeqCst) - n as i64;
                if left <= 0 {
                    vanish(&c);
                    break;
                }
            }
        } else {
            let mode = *c.mode.lock().unwrap();
            if let Mode::Stall(d) = mode {
                c.stalled.fetch_add(1, SeqCst);
                std::thread::sleep(d);
            }
            if let Some(at) = corrupt_at {
                if at >= pos && at < pos + n as u64 {
                    buf[(at - pos) as usize] ^= 0x5A;
                    c.corrupted.fetch_add(1, SeqCst);
                }
            }
        }
        pos += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
