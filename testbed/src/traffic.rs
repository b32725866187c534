//! TCP and UDP servers and clients that run inside a lab namespace.
//!
//! Servers echo what they receive and remember who connected (so a test can check the source
//! address a backend sees). Clients are bounded by a timeout; nothing here loops forever.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{Error, Host, Result};

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// An echo server running in a namespace (TCP or UDP). It stops when dropped.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

/// A TCP echo server ([`Host::tcp_echo_server`]).
pub type TcpServer = EchoServer;
/// A UDP echo server ([`Host::udp_echo_server`]).
pub type UdpServer = EchoServer;

impl EchoServer {
    /// The address it listens on (or is bound to).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Source addresses of the connections accepted (or datagrams received) so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers lock").clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const POLL: Duration = Duration::from_millis(5);

fn serve_tcp_conn(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

impl Host {
    /// Starts a TCP echo server bound to `bind` inside this namespace (port 0 picks one).
    pub fn tcp_echo_server(&self, bind: SocketAddr) -> Result<TcpServer> {
        let listener = self
            .run(|| TcpListener::bind(bind))?
            .map_err(io(format!("binding tcp {bind} in {}", self.name())))?;
        let addr = listener.local_addr().map_err(io("local_addr"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("set_nonblocking"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (s2, p2) = (stop.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        p2.lock().expect("peers lock").push(peer);
                        let _ = stream.set_nonblocking(false);
                        let s3 = s2.clone();
                        conns.push(std::thread::spawn(move || serve_tcp_conn(stream, &s3)));
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Ok(EchoServer {
            addr,
            stop,
            peers,
            thread: Some(thread),
        })
    }

    /// Starts a UDP echo server bound to `bind` inside this namespace (port 0 picks one).
    pub fn udp_echo_server(&self, bind: SocketAddr) -> Result<UdpServer> {
        let sock = self
            .run(|| UdpSocket::bind(bind))?
            .map_err(io(format!("binding udp {bind} in {}", self.name())))?;
        let addr = sock.local_addr().map_err(io("local_addr"))?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(io("set_read_timeout"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (s2, p2) = (stop.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    p2.lock().expect("peers lock").push(peer);
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        Ok(EchoServer {
            addr,
            stop,
            peers,
            thread: Some(thread),
        })
    }

    /// `GET /metrics` over HTTP from this namespace: the Prometheus text a server exposes.
    pub fn scrape(&self, addr: SocketAddr) -> Result<String> {
        let body = self.tcp_roundtrip(
            addr,
            b"GET /metrics HTTP/1.0\r\n\r\n",
            Duration::from_secs(2),
        )?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Connects from this namespace to `dst`, sends `payload`, half-closes, and returns everything
    /// the server sent back before closing. Bounded by `timeout` per I/O step.
    pub fn tcp_roundtrip(
        &self,
        dst: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let what = format!("tcp {} -> {dst}", self.name());
        self.run(|| -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&dst, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            // Write and read concurrently so large payloads cannot deadlock on full buffers.
            let mut reader = s.try_clone()?;
            let read = std::thread::spawn(move || {
                let mut got = Vec::new();
                reader.read_to_end(&mut got).map(|_| got)
            });
            s.write_all(payload)?;
            s.shutdown(Shutdown::Write)?;
            read.join()
                .map_err(|_| std::io::Error::other("reader panicked"))?
        })?
        .map_err(io(what))
    }

    /// Sends one datagram from this namespace to `dst` and waits for one reply.
    pub fn udp_roundtrip(
        &self,
        dst: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let what = format!("udp {} -> {dst}", self.name());
        self.run(|| -> std::io::Result<Vec<u8>> {
            let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .expect("valid");
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(timeout))?;
            s.send_to(payload, dst)?;
            let mut buf = vec![0u8; 65536];
            let (n, _) = s.recv_from(&mut buf)?;
            buf.truncate(n);
            Ok(buf)
        })?
        .map_err(io(what))
    }
}

/// The value of one series (`name{labels} ` with its trailing space) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
}
