//! `weft-echo`: a small HTTP server answering every request with a fixed text, with the flags
//! of hashicorp/http-echo (`-text`, `-listen`, `-status-code`, `-version`), so the seed demo's
//! manifests run with only the image changed. Logs one line per request to stdout.

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

/// Exits on SIGTERM or SIGINT (a container's PID 1 has no default action for them).
fn exit_on_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if set.thread_block().is_ok() {
        std::thread::spawn(move || {
            let _ = set.wait();
            println!("[weft-echo] shutting down");
            std::process::exit(0);
        });
    }
}

fn main() {
    exit_on_signals();
    let args: Vec<String> = std::env::args().skip(1).collect();
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
            if reader.read_line(&mut request).is_err() {
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
