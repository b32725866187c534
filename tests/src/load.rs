//! The load generator the network benchmarks share: a 1-byte echo server in a pod, and a client
//! run as a subprocess (the benchmark binary re-executed with `client conn|rr ADDR SECS`) inside a
//! pod's namespace and cgroup, measuring new connections per second, request/response per second,
//! or bulk throughput on one connection.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weft_testbed::Host;

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a valid linger that outlives
    // the call, on a socket fd the stream owns.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// `<bench> client conn|rr|stream ADDR SECS`: prints `{"rate":…,"errors":…}` (stream: bytes
/// per second on one connection).
pub fn client_main(args: &[String]) {
    let (mode, addr, secs) = (
        &args[2],
        args[3].parse::<SocketAddr>().unwrap(),
        args[4].parse::<f64>().unwrap(),
    );
    let dur = Duration::from_secs_f64(secs);
    let (mut n, mut errors) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut b = [1u8; 1];
    if mode == "conn" {
        while t0.elapsed() < dur {
            let ok = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                s.set_nodelay(true)?;
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
                // Close with RST: no TIME_WAIT, so the rate is not limited by ports.
                set_linger_zero(&s);
                Ok(())
            })();
            if ok.is_ok() { n += 1 } else { errors += 1 }
        }
    } else if mode == "stream" {
        // Bulk transfer on one connection: a 0 byte tells the server to sink what follows.
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
        s.write_all(&[0u8]).unwrap();
        let chunk = vec![7u8; 128 * 1024];
        while t0.elapsed() < dur {
            s.write_all(&chunk).unwrap();
            n += chunk.len() as u64;
        }
    } else {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap();
        s.set_nodelay(true).unwrap();
        while t0.elapsed() < dur {
            s.write_all(&b).unwrap();
            s.read_exact(&mut b).unwrap();
            n += 1;
        }
    }
    println!(
        "{}",
        json!({"rate": n as f64 / t0.elapsed().as_secs_f64(), "errors": errors})
    );
}

/// Serves `port` in `host`: four threads accept and answer every byte with a byte, inline (no
/// thread per connection, which would cap the connection rate); clients use one connection at a
/// time.
pub fn serve(host: &Host, port: u16) {
    let l = host
        .run(move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    for _ in 0..4 {
        let l = l.try_clone().unwrap();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_nodelay(true);
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_err() {
                    continue;
                }
                if b[0] == 0 {
                    // A stream client: take everything, answer nothing.
                    let mut sink = vec![0u8; 256 * 1024];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                    continue;
                }
                while s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok() {}
            }
        });
    }
}

/// Runs the client (this executable, `client KIND DST SECS`) in `client`'s namespace and
/// `cgroup`: (rate per second, errors).
pub fn measure(client: &Host, cgroup: &Path, kind: &str, dst: SocketAddr, secs: f64) -> (f64, u64) {
    let exe = std::env::current_exe().unwrap();
    let out = client
        .command_in_cgroup(&exe, cgroup)
        .unwrap()
        .args(["client", kind, &dst.to_string(), &secs.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["rate"].as_f64().unwrap(), v["errors"].as_u64().unwrap())
}

/// The median of `v` (NaN if empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
