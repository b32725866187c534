//! The conformance suite every [`Backend`] passes: revisions, optimistic concurrency, the log
//! of changes, compaction and (for durable engines) reopening. Each backend's tests call
//! [`run`], and [`run_durable`] when it keeps data across a restart; the checks panic with what
//! differed.

use std::sync::Arc;

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
    assert_eq!(
        (s.rev, s.records.len()),
        (0, 0),
        "{}: a new store",
        b.name()
    );
    assert!(b.changes(0).expect("changes").is_empty());
}

fn writes_need_the_expected_revision(b: &dyn Backend) {
    assert_eq!(put(b, "/a", 0, "1"), 1);
    conflict(b, "/a", 0, Some("x"), 1);
    assert_eq!(put(b, "/a", 1, "2"), 2);
    conflict(b, "/a", 1, Some("x"), 2);
    conflict(b, "/a", 1, None, 2);
    assert_eq!(b.write("/a", 2, None).expect("delete"), 3);
    conflict(b, "/a", 3, None, 0);
    conflict(b, "/missing", 0, None, 0);
    assert_eq!(
        put(b, "/a", 0, "3"),
        4,
        "{}: a deleted key can be created",
        b.name()
    );
    assert_eq!(put(b, "/b", 0, "b"), 5);
    let s = b.snapshot().expect("snapshot");
    assert_eq!(s.rev, 5);
    let live: Vec<(&str, Revision, &[u8])> = s
        .records
        .iter()
        .map(|r| (r.key.as_str(), r.rev, r.value.as_slice()))
        .collect();
    assert_eq!(live, [("/a", 4, &b"3"[..]), ("/b", 5, &b"b"[..])]);
}

fn the_log_replays_changes(b: &dyn Backend) {
    put(b, "/x", 0, "x1");
    put(b, "/y", 0, "y1");
    put(b, "/x", 1, "x2");
    b.write("/y", 2, None).expect("delete");
    let all = b.changes(0).expect("changes");
    assert_eq!(
        all,
        [
            change(1, "/x", Some("x1"), None),
            change(2, "/y", Some("y1"), None),
            change(3, "/x", Some("x2"), Some("x1")),
            change(4, "/y", None, Some("y1")),
        ],
        "{}",
        b.name()
    );
    assert_eq!(b.changes(2).expect("changes"), all[2..]);
    assert!(b.changes(4).expect("changes").is_empty());
    assert!(b.changes(9).expect("changes").is_empty());
}

fn compaction_forgets_only_what_no_one_needs(b: &dyn Backend) {
    put(b, "/keep", 0, "k1"); // 1
    put(b, "/gone", 0, "g1"); // 2
    put(b, "/keep", 1, "k2"); // 3
    b.write("/gone", 2, None).expect("delete"); // 4
    put(b, "/keep", 3, "k3"); // 5
    b.compact(4).expect("compact");
    match b.changes(3) {
        Err(Error::Compacted { asked, compacted }) => assert_eq!((asked, compacted), (3, 4)),
        other => panic!(
            "{}: changes before the compaction point: {other:?}",
            b.name()
        ),
    }
    // The write after the compaction point still knows the value it replaced.
    assert_eq!(
        b.changes(4).expect("changes"),
        [change(5, "/keep", Some("k3"), Some("k2"))]
    );
    let s = b.snapshot().expect("snapshot");
    assert_eq!((s.rev, s.compacted, s.records.len()), (5, 4, 1));
    // A key whose last write was compacted keeps its mod revision; the counter never goes back,
    // also when the newest write was a deletion that compaction removed.
    b.write("/keep", 5, None).expect("delete"); // 6
    b.compact(6).expect("compact");
    assert_eq!(b.snapshot().expect("snapshot").rev, 6);
    assert_eq!(put(b, "/keep", 0, "k4"), 7);
    b.compact(3).expect("compacting an older point is a no-op");
    assert_eq!(b.snapshot().expect("snapshot").compacted, 6);
}

fn concurrent_writers_lose_nothing(b: Arc<dyn Backend>) {
    const THREADS: usize = 4;
    const EACH: usize = 25;
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
    assert_eq!(s.rev, (THREADS * EACH + 1) as Revision, "{}", b.name());
}

/// Checks that what `open` returns keeps everything across being dropped and opened again:
/// every call of `open` must open the same (initially empty) store.
pub fn run_durable(open: &dyn Fn() -> Box<dyn Backend>) {
    {
        let b = open();
        put(&*b, "/a", 0, "a1"); // 1
        put(&*b, "/b", 0, "b1"); // 2
        put(&*b, "/a", 1, "a2"); // 3
        b.write("/b", 2, None).expect("delete"); // 4
        b.compact(3).expect("compact");
    }
    let b = open();
    let s = b.snapshot().expect("snapshot");
    assert_eq!((s.rev, s.compacted), (4, 3), "{} after reopening", b.name());
    assert_eq!(s.records.len(), 1);
    assert_eq!((s.records[0].rev, &s.records[0].value[..]), (3, &b"a2"[..]));
    assert_eq!(
        b.changes(3).expect("changes"),
        [change(4, "/b", None, Some("b1"))]
    );
    assert!(matches!(b.changes(2), Err(Error::Compacted { .. })));
    conflict(&*b, "/a", 1, Some("x"), 3);
    assert_eq!(put(&*b, "/b", 0, "b2"), 5);
}
