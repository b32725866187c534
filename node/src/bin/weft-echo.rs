//! `weft-echo`: a small HTTP server answering every request with a fixed text, with the flags
//! of hashicorp/http-echo (`-text`, `-listen`, `-status-code`, `-version`), so the seed demo's
//! manifests run with only the image changed. Logs one line per request to stdout.
//!
//! On SIGTERM it keeps serving for `-shutdown-delay` (default `2s`) before it exits: a pod being
//! deleted is taken out of its Services at the same moment as it is told to stop, and the
//! proxies learn that a little later, so a server that stopped at once would refuse the
//! connections still sent its way. This lame-duck period is what lets a rolling update finish
//! without a failed request (hashicorp/http-echo exits at once).

use std::io::{BufRead, BufReader, Write};

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        let a = a.trim_start_matches('-');
        match a.split_once('=') {
            Some((k, v)) if k == name => Some(v.to_owned()),
            None if a == name => args.get(i + 1).cloned(),
            _ => None,
        }
    })
}

/// A Go-style duration (`2s`, `500ms`, `0`) in milliseconds.
fn millis(d: &str) -> Option<u64> {
    if let Some(ms) = d.strip_suffix("ms") {
        return ms.parse().ok();
    }
    let secs: f64 = d.strip_suffix('s').unwrap_or(d).parse().ok()?;
    Some((secs * 1000.0) as u64)
}

/// Exits `delay` after SIGTERM or SIGINT (a container's PID 1 has no default action for them).
fn exit_on_signals(delay: std::time::Duration) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if set.thread_block().is_ok() {
        std::thread::spawn(move || {
            let _ = set.wait();
            println!("[weft-echo] shutting down in {delay:?}");
            std::thread::sleep(delay);
            std::process::exit(0);
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let delay = flag(&args, "shutdown-delay")
        .map(|d| {
            millis(&d).unwrap_or_else(|| {
                eprintln!("-shutdown-delay: not a duration: {d}");
                std::process::exit(2);
            })
        })
        .unwrap_or(2000);
    exit_on_signals(std::time::Duration::from_millis(delay));
    if args.iter().any(|a| a.trim_start_matches('-') == "version") {
        println!("weft-echo {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let text = flag(&args, "text").unwrap_or_default();
    let listen = flag(&args, "listen").unwrap_or_else(|| ":5678".into());
    let listen = if listen.starts_with(':') {
        format!("0.0.0.0{listen}")
    } else {
        listen
    };
    let status: u16 = flag(&args, "status-code")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let listener = match std::net::TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("listening on {listen}: {e}");
            std::process::exit(1);
        }
    };
    println!("[weft-echo] server is listening on {listen}");
    let body = format!("{text}\n");
    for conn in listener.incoming().flatten() {
        let body = body.clone();
        std::thread::spawn(move || {
            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let mut reader = BufReader::new(&conn);
            let mut request = String::new();
            // A TCP probe connects and closes without a request: nothing to answer or log.
            if reader.read_line(&mut request).is_err() || request.trim().is_empty() {
                return;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            println!("{peer} \"{}\" {status}", request.trim());
            let reason = if status == 200 { "OK" } else { "Status" };
            let mut conn = &conn;
            let _ = write!(
                conn,
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nX-App-Name: http-echo\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_parse_like_go() {
        assert_eq!(super::millis("2s"), Some(2000));
        assert_eq!(super::millis("500ms"), Some(500));
        assert_eq!(super::millis("1.5s"), Some(1500));
        assert_eq!(super::millis("0"), Some(0));
        assert_eq!(super::millis("soon"), None);
    }
}
