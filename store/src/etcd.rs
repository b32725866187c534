//! The etcd v3 backend, for clusters that outgrow one machine: the log is etcd's own MVCC
//! history under one key prefix. A revision is etcd's revision, a write is a transaction
//! conditional on the key's `mod_revision` (`0` for a key that must not exist), the log is read
//! with a watch from the revision asked for (with the previous values), and compaction is etcd's
//! compaction, whose point a watch from revision 1 reports. etcd keeps the compaction revision
//! itself readable; the backend treats it as compacted, so that the first change it replays
//! after that point still has the value it replaced (the trait's contract).
//!
//! etcd's client is async; the [`Backend`] trait is not (the API server's store serialises its
//! writes under one lock, as it does for SQLite). Each call runs on this backend's own runtime
//! and the caller waits for the answer.

use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};

use crate::{Backend, Change, Error, Record, Result, Revision, Snapshot};

/// How long connecting waits for a member to answer.
const CONNECT_WAIT: Duration = Duration::from_secs(20);

/// How many keys one range request reads while loading a snapshot.
const PAGE: i64 = 500;

/// How long a watch replaying history may stay silent before it has sent everything: etcd 3.4
/// sends a catching-up watcher its events every 100 ms and answers progress requests at once,
/// caught up or not, so silence is the only sign.
const QUIET: Duration = Duration::from_millis(500);

/// How long a call goes on trying other members while the one it reached is unreachable.
const FAILOVER: Duration = Duration::from_secs(15);

/// Whether a call may be sent again after a transport failure.
#[derive(Clone, Copy)]
enum Resend {
    /// A read: sending it twice changes nothing.
    Always,
    /// A write: only when it never left this process (the connection was refused), since a
    /// conditional write that did apply would fail its condition the second time.
    Unsent,
}

/// Whether `e` says the member could not be reached, so that another may answer.
fn unreachable(e: &etcd_client::Error, resend: Resend) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    match resend {
        Resend::Always => true,
        Resend::Unsent => status.message().contains("error trying to connect"),
    }
}

/// Runs one gRPC call on a handle of `client`, sending it again (the client's balancer picks the
/// next member) while the member it reached is down, for up to [`FAILOVER`].
async fn call<T, F, Fut>(what: &str, resend: Resend, client: &Client, mut f: F) -> Result<T>
where
    F: FnMut(Client) -> Fut,
    Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + FAILOVER;
    loop {
        match f(client.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) if unreachable(&e, resend) && tokio::time::Instant::now() < deadline => {
                tracing::debug!(what, error = %e, "etcd member unreachable; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(engine(what, e)),
        }
    }
}

/// The etcd backend.
pub struct Etcd {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
    /// etcd's compaction revision as this backend last saw it (probed on connect, raised by its
    /// own compactions and by `Compacted` answers).
    compacted: AtomicU64,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn engine(context: &str, e: etcd_client::Error) -> Error {
    Error::engine(context, e)
}

fn rev_of(v: i64) -> Revision {
    Revision::try_from(v).unwrap_or(0)
}

fn signed(v: Revision) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The changes a watch response carries, with full keys (a key that is not UTF-8 is not one this
/// backend wrote, and is left out).
fn raw_changes(r: &etcd_client::WatchResponse) -> Vec<Change> {
    r.events()
        .iter()
        .filter_map(|e| {
            let kv = e.kv()?;
            Some(Change {
                rev: rev_of(kv.mod_revision()),
                key: std::str::from_utf8(kv.key()).ok()?.to_owned(),
                value: matches!(e.event_type(), EventType::Put).then(|| kv.value().to_vec()),
                previous: e.prev_kv().map(|p| p.value().to_vec()),
            })
        })
        .collect()
}

/// The first key after every key that starts with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`) and keeps the store
    /// under `prefix` (for example `/weft/`).
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-store-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::engine("starting the etcd client", e))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(30))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let eps = endpoints.to_vec();
        let what = format!("connecting to etcd at {}", endpoints.join(","));
        let client = rt.block_on(async {
            let mut client = Client::connect(eps, Some(options))
                .await
                .map_err(|e| engine(&what, e))?;
            // Wait for a member to answer (etcd may be starting beside this server), and fail
            // now rather than at the first write when none does.
            let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
            loop {
                let e = match tokio::time::timeout(Duration::from_secs(2), client.status()).await {
                    Ok(Ok(_)) => return Ok(client),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer within 2 s".to_owned(),
                };
                if tokio::time::Instant::now() > deadline {
                    return Err(Error::engine(&what, e));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })?;
        let compacted = rt.block_on(Self::compaction_point(client.clone(), prefix.to_owned()))?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
            endpoints: endpoints.to_vec(),
            compacted: AtomicU64::new(compacted),
            rt,
        })
    }

    /// The members this backend talks to.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Runs `f` on the backend's runtime and waits for it (from any thread, also from inside
    /// another runtime, where `block_on` is not allowed).
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            // The caller waits on `rx` until this sends.
            let _ = tx.send(f.await);
        });
        rx.recv()
            .map_err(|_| Error::engine("etcd", "the client's runtime stopped"))?
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A change read with full keys, with the key this backend's callers use (`None` for a key
    /// outside the prefix).
    fn unprefixed(&self, change: Change) -> Option<Change> {
        let key = change.key.strip_prefix(self.prefix.as_str())?.to_owned();
        Some(Change { key, ..change })
    }

    fn short<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.prefix.as_str())
    }

    /// etcd's compaction revision (0: never compacted). A watch from revision 1 of a compacted
    /// store is cancelled with it within etcd's sync interval (100 ms); the watch is on a key
    /// nothing writes, so a store never compacted sends nothing and the probe gives up after
    /// [`QUIET`].
    async fn compaction_point(client: Client, prefix: String) -> Result<Revision> {
        let what = "probing etcd's compaction";
        let fail = |e| engine(what, e);
        let key = format!("{prefix}\u{0}compaction-probe");
        let (mut watcher, mut stream) = call(what, Resend::Always, &client, |mut c| {
            let key = key.clone();
            async move {
                c.watch(key, Some(WatchOptions::new().with_start_revision(1)))
                    .await
            }
        })
        .await?;
        let mut point = 0;
        while let Ok(next) = tokio::time::timeout(QUIET, stream.message()).await {
            match next.map_err(fail)? {
                Some(r) if r.compact_revision() > 0 => {
                    point = rev_of(r.compact_revision());
                    break;
                }
                Some(r) if r.created() => {}
                _ => break,
            }
        }
        let _ = watcher.cancel().await;
        Ok(point)
    }

    /// The store's newest revision.
    fn current(&self) -> Result<Revision> {
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        self.run(async move {
            Ok(
                call("reading the revision", Resend::Always, &client, |mut c| {
                    let prefix = prefix.clone();
                    async move {
                        c.get(
                            prefix,
                            Some(GetOptions::new().with_prefix().with_count_only()),
                        )
                        .await
                    }
                })
                .await?
                .header()
                .map_or(0, |h| rev_of(h.revision())),
            )
        })
    }
}

impl Backend for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        let (rev, kvs) = self.run(async move {
            let end = range_end(&prefix);
            let mut from = prefix.as_bytes().to_vec();
            let mut rev = 0;
            let mut kvs = Vec::new();
            loop {
                let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
                if rev > 0 {
                    // Every page at the revision of the first: one consistent view.
                    options = options.with_revision(rev);
                }
                let page = call("reading the store", Resend::Always, &client, |mut c| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { c.get(from, Some(options)).await }
                })
                .await?;
                if rev == 0 {
                    rev = page.header().map_or(0, |h| h.revision());
                }
                for kv in page.kvs() {
                    kvs.push((kv.key().to_vec(), kv.mod_revision(), kv.value().to_vec()));
                }
                match page.kvs().last() {
                    Some(last) if page.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => break,
                }
            }
            Ok((rev, kvs))
        })?;
        let compacted = self.compacted.load(Ordering::Relaxed);
        let records = kvs
            .into_iter()
            .filter_map(|(key, mod_rev, value)| {
                Some(Record {
                    key: self.short(&key)?.to_owned(),
                    rev: rev_of(mod_rev),
                    value,
                })
            })
            .collect();
        Ok(Snapshot {
            rev: rev_of(rev),
            compacted,
            records,
        })
    }

    fn write(&self, key: &str, expected: Revision, value: Option<&[u8]>) -> Result<Revision> {
        let client = self.client.clone();
        let full = self.full(key);
        let value = value.map(<[u8]>::to_vec);
        let (ok, rev, actual) = self.run(async move {
            let op = match value.clone() {
                Some(v) => TxnOp::put(full.clone(), v, None),
                None => TxnOp::delete(full.clone(), None),
            };
            let mut when = vec![Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                signed(expected),
            )];
            if value.is_none() {
                // A deletion needs the key (mod_revision 0 would match a missing one).
                when.push(Compare::create_revision(
                    full.clone(),
                    CompareOp::Greater,
                    0,
                ));
            }
            let txn = Txn::new()
                .when(when)
                .and_then(vec![op])
                .or_else(vec![TxnOp::get(full.clone(), None)]);
            let resp = call(
                &format!("writing {full}"),
                Resend::Unsent,
                &client,
                |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                },
            )
            .await?;
            let rev = resp.header().map_or(0, |h| h.revision());
            let actual = resp
                .op_responses()
                .into_iter()
                .find_map(|r| match r {
                    TxnOpResponse::Get(g) => {
                        Some(g.kvs().first().map_or(0, |kv| kv.mod_revision()))
                    }
                    _ => None,
                })
                .unwrap_or(0);
            Ok((resp.succeeded(), rev, actual))
        })?;
        if !ok {
            return Err(Error::Conflict {
                key: key.to_owned(),
                expected,
                actual: rev_of(actual),
            });
        }
        Ok(rev_of(rev))
    }

    fn changes(&self, after: Revision) -> Result<Vec<Change>> {
        let now = self.current()?;
        if now <= after {
            return Ok(Vec::new());
        }
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        let compacted = self.compacted.load(Ordering::Relaxed);
        if after < compacted {
            return Err(Error::Compacted {
                asked: after,
                compacted,
            });
        }
        let raw = self.run(async move {
            let options = WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                // From `after` itself, so that etcd refuses it when it is the compaction
                // revision (see the module doc); it is skipped below.
                .with_start_revision(signed(after.max(1)));
            let (mut watcher, mut stream) =
                call("reading the log", Resend::Always, &client, |mut c| {
                    let (prefix, options) = (prefix.clone(), options.clone());
                    async move { c.watch(prefix, Some(options)).await }
                })
                .await?;
            let mut out = Vec::new();
            // Until the newest revision has been seen, or the watch has been quiet for a while
            // (the newest revisions may belong to keys outside the prefix).
            while out.last().map_or(after, |c: &Change| c.rev) < now {
                let Ok(next) = tokio::time::timeout(QUIET, stream.message()).await else {
                    break;
                };
                let Some(r) = next.map_err(|e| engine("reading the log", e))? else {
                    return Err(Error::engine("reading the log", "the watch ended"));
                };
                if r.compact_revision() > 0 {
                    let _ = watcher.cancel().await;
                    return Err(Error::Compacted {
                        asked: after,
                        compacted: rev_of(r.compact_revision()),
                    });
                }
                if r.canceled() {
                    return Err(Error::engine(
                        "reading the log",
                        format!("etcd cancelled the watch: {}", r.cancel_reason()),
                    ));
                }
                out.extend(raw_changes(&r));
            }
            let _ = watcher.cancel().await;
            Ok(out)
        })?;
        Ok(raw
            .into_iter()
            .filter(|c| c.rev > after)
            .filter_map(|c| self.unprefixed(c))
            .collect())
    }

    fn shared(&self) -> bool {
        true
    }

    fn follow(&self, after: Revision, sink: &mut dyn FnMut(Change) -> bool) -> Result<()> {
        let compacted = self.compacted.load(Ordering::Relaxed);
        if after < compacted {
            return Err(Error::Compacted {
                asked: after,
                compacted,
            });
        }
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        // The watch runs on the backend's runtime; its changes come here, where `sink` runs.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Change>>(1024);
        self.rt.spawn(async move {
            let what = "following the log";
            let options = WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_start_revision(signed(after + 1));
            let opened = call(what, Resend::Always, &client, |mut c| {
                let (prefix, options) = (prefix.clone(), options.clone());
                async move { c.watch(prefix, Some(options)).await }
            })
            .await;
            let (mut watcher, mut stream) = match opened {
                Ok(w) => w,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            loop {
                let failed = match stream.message().await {
                    Ok(Some(r)) if r.compact_revision() > 0 => Error::Compacted {
                        asked: after,
                        compacted: rev_of(r.compact_revision()),
                    },
                    Ok(Some(r)) if r.canceled() => Error::engine(
                        what,
                        format!("etcd cancelled the watch: {}", r.cancel_reason()),
                    ),
                    Ok(Some(r)) => {
                        // A closed receiver: the follower stopped.
                        if raw_changes(&r).into_iter().any(|c| tx.send(Ok(c)).is_err()) {
                            break;
                        }
                        continue;
                    }
                    Ok(None) => Error::engine(what, "the watch ended"),
                    Err(e) => engine(what, e),
                };
                let _ = tx.send(Err(failed));
                break;
            }
            let _ = watcher.cancel().await;
        });
        for change in rx {
            let Some(change) = self.unprefixed(change?) else {
                continue;
            };
            if !sink(change) {
                return Ok(());
            }
        }
        Err(Error::engine(
            "following the log",
            "the client's runtime stopped",
        ))
    }

    fn compact(&self, upto: Revision) -> Result<()> {
        let upto = upto.min(self.current()?.saturating_sub(1));
        if upto <= self.compacted.load(Ordering::Relaxed) {
            return Ok(());
        }
        let client = self.client.clone();
        let done = self.run(async move {
            call(
                &format!("compacting to {upto}"),
                Resend::Unsent,
                &client,
                |mut c| async move { c.compact(signed(upto), None).await },
            )
            .await
            .map(drop)
        });
        match done {
            Ok(()) => {
                self.compacted.fetch_max(upto, Ordering::Relaxed);
                Ok(())
            }
            // Another server compacted further already.
            Err(e) if e.to_string().contains("compacted") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::conformance::EtcdCluster;

    #[test]
    fn the_range_of_a_prefix_ends_after_its_last_key() {
        assert_eq!(range_end("/weft/"), b"/weft0");
        assert_eq!(range_end("a"), b"b");
    }

    #[test]
    fn conforms_on_one_member_and_keeps_everything_across_a_reconnect() {
        let etcd = EtcdCluster::start("one", 1);
        let n = AtomicUsize::new(0);
        crate::conformance::run(&|| {
            let prefix = format!("/conformance-{}/", n.fetch_add(1, Ordering::Relaxed));
            Box::new(Etcd::connect(&etcd.endpoints(), &prefix).expect("connect"))
        });
        crate::conformance::run_durable(&|| {
            Box::new(Etcd::connect(&etcd.endpoints(), "/durable/").expect("connect"))
        });
    }

    #[test]
    fn a_second_client_follows_the_first_ones_writes_as_they_are_made() {
        let etcd = EtcdCluster::start("follow", 1);
        let a = Etcd::connect(&etcd.endpoints(), "/follow/").expect("connect");
        let b = Etcd::connect(&etcd.endpoints(), "/follow/").expect("connect");
        assert!(b.shared());
        let before = a.write("/old", 0, Some(b"0")).expect("write");
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let follower = std::thread::spawn(move || {
            let mut n = 0;
            b.follow(before, &mut |c| {
                n += 1;
                seen_tx.send(c).is_ok() && n < 3
            })
            .expect("follow");
            b
        });
        let r1 = a.write("/k", 0, Some(b"1")).expect("create");
        // Outside the prefix: not followed.
        let other = Etcd::connect(&etcd.endpoints(), "/elsewhere/").expect("connect");
        other.write("/k", 0, Some(b"x")).expect("write elsewhere");
        let r2 = a.write("/k", r1, Some(b"2")).expect("update");
        let r3 = a.write("/k", r2, None).expect("delete");
        let seen: Vec<Change> = (0..3)
            .map(|_| {
                seen_rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("a change")
            })
            .collect();
        let b = follower.join().expect("follower");
        let k = |rev, value: Option<&[u8]>, previous: Option<&[u8]>| Change {
            rev,
            key: "/k".into(),
            value: value.map(<[u8]>::to_vec),
            previous: previous.map(<[u8]>::to_vec),
        };
        assert_eq!(
            seen,
            [
                k(r1, Some(b"1"), None),
                k(r2, Some(b"2"), Some(b"1")),
                k(r3, None, Some(b"2")),
            ]
        );
        // Following from a compacted revision is refused as a replay would be.
        a.compact(r2).expect("compact");
        let b2 = Etcd::connect(&etcd.endpoints(), "/follow/").expect("connect");
        assert!(matches!(
            b2.follow(before, &mut |_| true),
            Err(Error::Compacted { .. })
        ));
        drop(b);
    }

    #[test]
    fn a_three_member_cluster_conforms_and_keeps_serving_without_one_member() {
        let mut etcd = EtcdCluster::start("three", 3);
        let backend = Etcd::connect(&etcd.endpoints(), "/ha/").expect("connect");
        let first = backend.write("/k", 0, Some(b"1")).expect("write");
        etcd.stop(0);
        // Two of three members are a quorum: once they have a leader (a new election if the
        // stopped member led), writes and reads go on.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let second = loop {
            match backend.write("/k", first, Some(b"2")) {
                Ok(rev) => break rev,
                Err(Error::Engine { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("write with a member down: {e}"),
            }
        };
        let s = backend.snapshot().expect("snapshot");
        assert_eq!((s.rev, s.records[0].value.as_slice()), (second, &b"2"[..]));
        let n = AtomicUsize::new(0);
        crate::conformance::run(&|| {
            let prefix = format!("/ha-{}/", n.fetch_add(1, Ordering::Relaxed));
            Box::new(Etcd::connect(&etcd.endpoints()[1..], &prefix).expect("connect"))
        });
    }
}
