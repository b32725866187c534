//! The conformance suite every [`Backend`] passes: revisions, optimistic concurrency, the log
//! of changes, compaction and (for durable engines) reopening. Each backend's tests call
//! [`run`], and [`run_durable`] when it keeps data across a restart; the checks panic with what
//! differed.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{Backend, Change, Error, Revision};

fn put(b: &dyn Backend, key: &str, expected: Revision, value: &str) -> Revision {
    b.write(key, expected, Some(value.as_bytes()))
        .unwrap_or_else(|e| panic!("{}: put {key}@{expected}: {e}", b.name()))
}

fn conflict(b: &dyn Backend, key: &str, expected: Revision, value: Option<&str>, actual: Revision) {
    match b.write(key, expected, value.map(str::as_bytes)) {
        Err(Error::Conflict {
            actual: a,
            expected: e,
            ..
        }) => {
            assert_eq!(
                (a, e),
                (actual, expected),
                "{}: conflict on {key}",
                b.name()
            );
        }
        other => panic!(
            "{}: write of {key}@{expected} should conflict, got {other:?}",
            b.name()
        ),
    }
}

fn change(rev: Revision, key: &str, value: Option<&str>, previous: Option<&str>) -> Change {
    Change {
        rev,
        key: key.to_owned(),
        value: value.map(|v| v.as_bytes().to_vec()),
        previous: previous.map(|v| v.as_bytes().to_vec()),
    }
}

/// Runs every check on fresh stores made by `fresh`.
pub fn run(fresh: &dyn Fn() -> Box<dyn Backend>) {
    empty(&*fresh());
    writes_need_the_expected_revision(&*fresh());
    the_log_replays_changes(&*fresh());
    compaction_forgets_only_what_no_one_needs(&*fresh());
    concurrent_writers_lose_nothing(Arc::from(fresh()));
}

fn empty(b: &dyn Backend) {
    let s = b.snapshot().expect("snapshot");
    assert!(
        s.records.is_empty(),
        "{}: a new store has records",
        b.name()
    );
    assert!(b.changes(s.rev).expect("changes").is_empty());
}

/// The revision a store starts at (`0` for a new engine; etcd's current revision for a new
/// prefix of a shared etcd): the checks count from it.
fn base(b: &dyn Backend) -> Revision {
    b.snapshot().expect("snapshot").rev
}

fn writes_need_the_expected_revision(b: &dyn Backend) {
    let r = base(b);
    assert_eq!(put(b, "/a", 0, "1"), r + 1);
    conflict(b, "/a", 0, Some("x"), r + 1);
    assert_eq!(put(b, "/a", r + 1, "2"), r + 2);
    conflict(b, "/a", r + 1, Some("x"), r + 2);
    conflict(b, "/a", r + 1, None, r + 2);
    assert_eq!(b.write("/a", r + 2, None).expect("delete"), r + 3);
    conflict(b, "/a", r + 3, None, 0);
    conflict(b, "/missing", 0, None, 0);
    assert_eq!(
        put(b, "/a", 0, "3"),
        r + 4,
        "{}: a deleted key can be created",
        b.name()
    );
    assert_eq!(put(b, "/b", 0, "b"), r + 5);
    let s = b.snapshot().expect("snapshot");
    assert_eq!(s.rev, r + 5);
    let live: Vec<(&str, Revision, &[u8])> = s
        .records
        .iter()
        .map(|r| (r.key.as_str(), r.rev, r.value.as_slice()))
        .collect();
    assert_eq!(live, [("/a", r + 4, &b"3"[..]), ("/b", r + 5, &b"b"[..])]);
}

fn the_log_replays_changes(b: &dyn Backend) {
    let r = base(b);
    put(b, "/x", 0, "x1");
    put(b, "/y", 0, "y1");
    put(b, "/x", r + 1, "x2");
    b.write("/y", r + 2, None).expect("delete");
    let all = b.changes(r).expect("changes");
    assert_eq!(
        all,
        [
            change(r + 1, "/x", Some("x1"), None),
            change(r + 2, "/y", Some("y1"), None),
            change(r + 3, "/x", Some("x2"), Some("x1")),
            change(r + 4, "/y", None, Some("y1")),
        ],
        "{}",
        b.name()
    );
    assert_eq!(b.changes(r + 2).expect("changes"), all[2..]);
    assert!(b.changes(r + 4).expect("changes").is_empty());
}

fn compaction_forgets_only_what_no_one_needs(b: &dyn Backend) {
    let r = base(b);
    put(b, "/keep", 0, "k1"); // r+1
    put(b, "/gone", 0, "g1"); // r+2
    put(b, "/keep", r + 1, "k2"); // r+3
    b.write("/gone", r + 2, None).expect("delete"); // r+4
    put(b, "/keep", r + 3, "k3"); // r+5
    b.compact(r + 4).expect("compact");
    match b.changes(r + 3) {
        Err(Error::Compacted { asked, compacted }) => {
            assert_eq!((asked, compacted), (r + 3, r + 4));
        }
        other => panic!(
            "{}: changes before the compaction point: {other:?}",
            b.name()
        ),
    }
    // The write after the compaction point still knows the value it replaced.
    assert_eq!(
        b.changes(r + 4).expect("changes"),
        [change(r + 5, "/keep", Some("k3"), Some("k2"))]
    );
    let s = b.snapshot().expect("snapshot");
    assert_eq!((s.rev, s.compacted, s.records.len()), (r + 5, r + 4, 1));
    // Compaction stops short of the newest write, so the counter never goes back, also when
    // the newest write is a deletion.
    b.write("/keep", r + 5, None).expect("delete"); // r+6
    b.compact(r + 6).expect("compact");
    let s = b.snapshot().expect("snapshot");
    assert_eq!((s.rev, s.compacted), (r + 6, r + 5), "{}", b.name());
    assert_eq!(
        b.changes(r + 5).expect("changes"),
        [change(r + 6, "/keep", None, Some("k3"))]
    );
    assert_eq!(put(b, "/keep", 0, "k4"), r + 7);
    b.compact(r + 3)
        .expect("compacting an older point is a no-op");
    assert_eq!(b.snapshot().expect("snapshot").compacted, r + 5);
}

fn concurrent_writers_lose_nothing(b: Arc<dyn Backend>) {
    const THREADS: usize = 4;
    const EACH: usize = 25;
    let r = base(&*b);
    put(&*b, "/counter", 0, "0");
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let b = b.clone();
            std::thread::spawn(move || {
                for _ in 0..EACH {
                    loop {
                        let s = b.snapshot().expect("snapshot");
                        let r = s
                            .records
                            .iter()
                            .find(|r| r.key == "/counter")
                            .expect("counter");
                        let n: usize = String::from_utf8_lossy(&r.value).parse().expect("number");
                        match b.write("/counter", r.rev, Some((n + 1).to_string().as_bytes())) {
                            Ok(_) => break,
                            Err(Error::Conflict { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let s = b.snapshot().expect("snapshot");
    assert_eq!(s.records[0].value, (THREADS * EACH).to_string().as_bytes());
    assert_eq!(s.rev, r + (THREADS * EACH + 1) as Revision, "{}", b.name());
}

/// Checks that what `open` returns keeps everything across being dropped and opened again:
/// every call of `open` must open the same (initially empty) store.
pub fn run_durable(open: &dyn Fn() -> Box<dyn Backend>) {
    let r = {
        let b = open();
        let r = base(&*b);
        put(&*b, "/a", 0, "a1"); // r+1
        put(&*b, "/b", 0, "b1"); // r+2
        put(&*b, "/a", r + 1, "a2"); // r+3
        b.write("/b", r + 2, None).expect("delete"); // r+4
        b.compact(r + 3).expect("compact");
        r
    };
    let b = open();
    let s = b.snapshot().expect("snapshot");
    assert_eq!(
        (s.rev, s.compacted),
        (r + 4, r + 3),
        "{} after reopening",
        b.name()
    );
    assert_eq!(s.records.len(), 1);
    assert_eq!(
        (s.records[0].rev, &s.records[0].value[..]),
        (r + 3, &b"a2"[..])
    );
    assert_eq!(
        b.changes(r + 3).expect("changes"),
        [change(r + 4, "/b", None, Some("b1"))]
    );
    assert!(matches!(b.changes(r + 2), Err(Error::Compacted { .. })));
    conflict(&*b, "/a", r + 1, Some("x"), r + 3);
    assert_eq!(put(&*b, "/b", 0, "b2"), r + 5);
}

/// A free TCP port on loopback (the listener is closed before the port is used).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An etcd cluster of real `etcd` members on loopback, each with its own data directory under
/// the temporary directory; stopped and removed when dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: PathBuf,
    clients: Vec<String>,
    members: Vec<Option<Child>>,
}

impl EtcdCluster {
    /// Starts `members` members and waits until the cluster has a leader.
    pub fn start(label: &str, members: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("weft-etcd-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut cluster = Self {
            dir: dir.clone(),
            clients: ports
                .iter()
                .map(|(c, _)| format!("http://127.0.0.1:{c}"))
                .collect(),
            members: Vec::new(),
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("m{i}.log"))).expect("log");
            let child = Command::new("etcd")
                .arg(format!("--name=m{i}"))
                .arg(format!(
                    "--data-dir={}",
                    dir.join(format!("m{i}")).display()
                ))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg(format!("--initial-cluster-token=weft-{label}"))
                .arg("--initial-cluster-state=new")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd (Debian etcd-server; scripts/setup.sh installs it)");
            cluster.members.push(Some(child));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for c in &cluster.clients {
            let health = format!("{c}/health");
            while !healthy(&health) {
                assert!(
                    Instant::now() < deadline,
                    "etcd at {c} never became healthy"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    /// Where the members keep their data.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.clone()
    }

    /// The client URLs of the members.
    pub fn endpoints(&self) -> Vec<String> {
        self.clients.clone()
    }

    /// Stops member `i` (SIGKILL).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether etcd's `/health` endpoint at `url` says healthy (plain HTTP/1.0 over loopback).
fn healthy(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let Some((host, path)) = rest.split_once('/') else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
