//! The `nfs` backend: a volume is a directory on an existing NFS export.
//!
//! The controller creates and removes that directory over the NFS protocol itself (the `nfs-rs`
//! userspace client), so it needs no kernel NFS client and no mount. The node mounts
//! `server:/share/dir` (NFSv4.1 with `soft` and bounded `timeo`/`retrans`, and a deadline on the
//! mount call itself) through the [`Mounter`] trait; on a node whose export is a local directory and
//! whose kernel has no NFS client, [`LocalExportMounter`] stands in for that one mount with a bind of
//! the export's directory.
//!
//! Records of created volumes live in `<state-dir>/nfs/<id>.json`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{self, Kind};
use crate::mounts::{MountEntry, MountRequest, Mounter, parse_flags};
use crate::persist;

/// What happens to a volume's directory when the volume is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Remove the directory and everything in it.
    Delete,
    /// Leave it as it is.
    Retain,
    /// Rename it to `archived-<dir>` in the share.
    Archive,
}

/// A volume as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NfsVolume {
    /// Volume ID.
    pub id: String,
    /// The CreateVolume name.
    pub name: String,
    /// NFS server (host name or address).
    pub server: String,
    /// Exported path on the server.
    pub share: String,
    /// Server port, if not 2049.
    pub port: Option<u16>,
    /// The volume's directory, relative to the share.
    pub sub_dir: String,
    /// What DeleteVolume does.
    pub on_delete: OnDelete,
    /// Requested size (NFS directories carry no quota; recorded, not enforced).
    pub capacity_bytes: u64,
}

impl NfsVolume {
    /// The `volume_context` handed to the node, and accepted from static PVs.
    pub fn context(&self) -> HashMap<String, String> {
        let mut c = HashMap::from([
            ("backend".to_string(), "nfs".to_string()),
            ("server".to_string(), self.server.clone()),
            ("share".to_string(), self.share.clone()),
            ("subDir".to_string(), self.sub_dir.clone()),
        ]);
        if let Some(p) = self.port {
            c.insert("port".into(), p.to_string());
        }
        c
    }
}

/// Where a volume's directory is, as the node needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// NFS server.
    pub server: String,
    /// Export path.
    pub share: String,
    /// Port, if not 2049.
    pub port: Option<u16>,
    /// Directory under the share.
    pub sub_dir: String,
}

impl Location {
    /// Reads a location from a `volume_context`.
    pub fn from_context(ctx: &HashMap<String, String>) -> Result<Location> {
        let get = |k: &str| {
            ctx.get(k)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| Error::InvalidArgument(format!("volume_context.{k} is required")))
        };
        let server = get("server")?;
        let share = check_share(&get("share")?)?;
        let sub_dir = match ctx.get("subDir") {
            Some(s) if !s.is_empty() => check_sub_dir(s)?,
            _ => String::new(),
        };
        let port = parse_port(ctx.get("port"))?;
        Ok(Location {
            server,
            share,
            port,
            sub_dir,
        })
    }

    /// `server:/share/dir`.
    pub fn source(&self) -> String {
        let mut s = format!("{}:{}", self.server, self.share);
        if !self.sub_dir.is_empty() {
            s = format!("{}/{}", s.trim_end_matches('/'), self.sub_dir);
        }
        s
    }
}

fn parse_port(v: Option<&String>) -> Result<Option<u16>> {
    match v {
        None => Ok(None),
        Some(p) if p.is_empty() => Ok(None),
        Some(p) => p
            .parse()
            .map(Some)
            .map_err(|_| Error::InvalidArgument(format!("port: {p:?} is not a port number"))),
    }
}

fn check_share(share: &str) -> Result<String> {
    if !share.starts_with('/') || share.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "share: {share:?} must be an absolute export path"
        )));
    }
    Ok(share.to_string())
}

/// A sub-directory must stay inside the share: relative, no `..`, no `.`, no empty parts.
pub fn check_sub_dir(dir: &str) -> Result<String> {
    let p = Path::new(dir);
    let ok = !dir.is_empty()
        && !dir.contains('\0')
        && !dir.contains("//")
        && !dir.ends_with('/')
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "subDir: {dir:?} must be a relative path inside the share (no '..', '.', or empty parts)"
        )));
    }
    Ok(dir.to_string())
}

/// Expands `${pvc.metadata.name}`, `${pvc.metadata.namespace}` and `${pv.metadata.name}` from the
/// keys the external-provisioner adds with `--extra-create-metadata`.
fn expand_pattern(pattern: &str, params: &HashMap<String, String>) -> Result<String> {
    let mut out = pattern.to_string();
    for (var, key) in [
        ("${pvc.metadata.name}", "csi.storage.k8s.io/pvc/name"),
        (
            "${pvc.metadata.namespace}",
            "csi.storage.k8s.io/pvc/namespace",
        ),
        ("${pv.metadata.name}", "csi.storage.k8s.io/pv/name"),
    ] {
        if out.contains(var) {
            let v = params.get(key).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "parameters.subDir uses {var}, but {key} is not set (run the \
                     external-provisioner with --extra-create-metadata)"
                ))
            })?;
            out = out.replace(var, v);
        }
    }
    if out.contains("${") {
        return Err(Error::InvalidArgument(format!(
            "parameters.subDir: unknown variable in {pattern:?}"
        )));
    }
    Ok(out)
}

/// Decodes StorageClass parameters into a volume record (not yet created).
pub fn plan(name: &str, params: &HashMap<String, String>, capacity: u64) -> Result<NfsVolume> {
    let mut server = None;
    let mut share = None;
    let mut port = None;
    let mut sub_dir = None;
    let mut on_delete = OnDelete::Delete;
    for (k, v) in params {
        match k.as_str() {
            "backend" => {}
            "server" => server = Some(v.clone()),
            "share" => share = Some(check_share(v)?),
            "port" => port = parse_port(Some(v))?,
            "subDir" => sub_dir = Some(v.clone()),
            "onDelete" => {
                on_delete = match v.as_str() {
                    "delete" => OnDelete::Delete,
                    "retain" => OnDelete::Retain,
                    "archive" => OnDelete::Archive,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "parameters.onDelete: {other:?} is not one of delete, retain, archive"
                        )));
                    }
                }
            }
            k if k.starts_with("csi.storage.k8s.io/") => {}
            k => {
                return Err(Error::InvalidArgument(format!(
                    "parameters: unknown parameter {k:?} for the nfs backend (known: server, \
                     share, port, subDir, onDelete)"
                )));
            }
        }
    }
    let server = server
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::InvalidArgument("parameters.server is required".into()))?;
    let share =
        share.ok_or_else(|| Error::InvalidArgument("parameters.share is required".into()))?;
    let sub_dir = match sub_dir {
        Some(p) => expand_pattern(&p, params)?,
        None => params
            .get("csi.storage.k8s.io/pv/name")
            .cloned()
            .unwrap_or_else(|| name.to_string()),
    };
    Ok(NfsVolume {
        id: ids::for_name(Kind::NfsVolume, name),
        name: name.to_string(),
        server,
        share,
        port,
        sub_dir: check_sub_dir(&sub_dir)?,
        on_delete,
        capacity_bytes: capacity,
    })
}

/// The controller side of the nfs backend.
#[derive(Debug)]
pub struct NfsBackend {
    root: PathBuf,
    timeout: Duration,
}

fn nfs_err(what: String) -> impl FnOnce(nfs_rs::NfsError) -> Error {
    move |e| Error::Io {
        context: what,
        source: std::io::Error::other(e.to_string()),
    }
}

impl NfsBackend {
    /// Opens the record directory under `state_dir/nfs`. `timeout` bounds every exchange with a
    /// server.
    pub fn open(state_dir: &Path, timeout: Duration) -> Result<Self> {
        let root = state_dir.join("nfs");
        std::fs::create_dir_all(&root).map_err(Error::io(format!("create {}", root.display())))?;
        Ok(NfsBackend { root, timeout })
    }

    fn record(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.json"))
    }

    /// A volume by ID.
    pub fn volume(&self, id: &str) -> Result<Option<NfsVolume>> {
        if ids::parse(id) != Some(Kind::NfsVolume) {
            return Ok(None);
        }
        persist::read_json(&self.record(id))
    }

    /// Every volume, ordered by ID.
    pub fn list(&self) -> Result<Vec<NfsVolume>> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map_err(Error::io(format!("read {}", self.root.display())))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
            .filter(|n| ids::parse(n) == Some(Kind::NfsVolume))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            if let Some(v) = persist::read_json(&self.record(&n))? {
                out.push(v);
            }
        }
        Ok(out)
    }

    async fn connect(&self, v: &NfsVolume) -> Result<Box<dyn nfs_rs::Mount>> {
        let mut url = format!("nfs://{}{}?version=4.1", v.server, v.share);
        if let Some(p) = v.port {
            url.push_str(&format!("&nfsport={p}"));
        }
        let what = format!("connect to nfs://{}{}", v.server, v.share);
        tokio::time::timeout(self.timeout, nfs_rs::parse_url_and_mount(&url))
            .await
            .map_err(|_| {
                Error::Unavailable(format!("{what}: no answer within {:?}", self.timeout))
            })?
            .map_err(nfs_err(what))
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout(self.timeout, f).await.map_err(|_| {
            Error::Unavailable(format!("{what}: no answer within {:?}", self.timeout))
        })?
    }

    /// CreateVolume: makes the directory (and its parents) on the server, then records the volume.
    pub async fn create(&self, planned: NfsVolume) -> Result<NfsVolume> {
        if let Some(existing) = self.volume(&planned.id)? {
            if existing == planned {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists(format!(
                "volume {} exists with different parameters or size",
                planned.name
            )));
        }
        let m = self.connect(&planned).await?;
        let made = self
            .bounded("mkdir", async {
                let mut path = String::new();
                for part in planned.sub_dir.split('/') {
                    if !path.is_empty() {
                        path.push('/');
                    }
                    path.push_str(part);
                    match m.mkdir_path(&path, 0o777).await {
                        Ok(_) => {}
                        Err(e) if e.is_exist() => {}
                        Err(e) => return Err(nfs_err(format!("mkdir {path} on the server"))(e)),
                    }
                }
                Ok(())
            })
            .await;
        let _ = m.umount().await;
        made?;
        persist::write_json(&self.record(&planned.id), &planned)?;
        Ok(planned)
    }

    /// DeleteVolume: deletes, archives or keeps the directory as the volume says, then forgets it.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let Some(v) = self.volume(id)? else {
            return Ok(());
        };
        if v.on_delete != OnDelete::Retain {
            let m = self.connect(&v).await?;
            let done = self
                .bounded("delete", async {
                    match v.on_delete {
                        OnDelete::Delete => remove_tree(&*m, &v.sub_dir).await,
                        OnDelete::Archive => {
                            let to = format!("archived-{}", v.sub_dir.replace('/', "-"));
                            match m.rename_path(&v.sub_dir, &to).await {
                                Ok(()) => Ok(()),
                                Err(e) if e.is_not_found() => Ok(()),
                                Err(e) => Err(nfs_err(format!("archive {}", v.sub_dir))(e)),
                            }
                        }
                        OnDelete::Retain => Ok(()),
                    }
                })
                .await;
            let _ = m.umount().await;
            done?;
        }
        let rec = self.record(id);
        std::fs::remove_file(&rec).map_err(Error::io(format!("remove {}", rec.display())))?;
        persist::sync_parent(&rec)
    }

    /// ControllerExpandVolume: NFS directories have no size to change; the record follows.
    pub fn expand(&self, id: &str, bytes: u64) -> Result<u64> {
        let mut v = self
            .volume(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id} not found")))?;
        if bytes > v.capacity_bytes {
            v.capacity_bytes = bytes;
            persist::write_json(&self.record(id), &v)?;
        }
        Ok(v.capacity_bytes)
    }
}

/// Removes a directory tree over NFS. A tree that is already gone is fine.
async fn remove_tree(m: &dyn nfs_rs::Mount, dir: &str) -> Result<()> {
    const TYPE_DIR: u32 = 2;
    // Depth-first without recursion: collect the tree, then remove children before parents.
    let mut dirs = vec![dir.to_string()];
    let mut order = Vec::new();
    while let Some(d) = dirs.pop() {
        let mut entries = match m.readdirplus_path(&d).await {
            Ok(s) => s,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(nfs_err(format!("list {d}"))(e)),
        };
        while let Some(entry) = entries.next().await {
            let entry = entry.map_err(nfs_err(format!("list {d}")))?;
            if entry.file_name == "." || entry.file_name == ".." {
                continue;
            }
            let path = format!("{d}/{}", entry.file_name);
            if entry.attr.as_ref().is_some_and(|a| a.type_ == TYPE_DIR) {
                dirs.push(path);
            } else {
                match m.remove_path(&path).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(nfs_err(format!("remove {path}"))(e)),
                }
            }
        }
        order.push(d);
    }
    for d in order.into_iter().rev() {
        match m.rmdir_path(&d).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(nfs_err(format!("rmdir {d}"))(e)),
        }
    }
    Ok(())
}

/// Mount options for the node: NFSv4.1 over TCP, soft with bounded retries, so a dead server
/// returns errors instead of hanging every process that touches the mount.
pub fn mount_request(loc: &Location, flags: &[String], read_only: bool) -> Result<MountRequest> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(loc.server.as_str(), 0))
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Error::Unavailable(format!("cannot resolve NFS server {}", loc.server)))?;
    let (mut bits, extra) = parse_flags(flags);
    if read_only {
        bits |= nix::mount::MsFlags::MS_RDONLY.bits();
    }
    let mut data = format!(
        "vers=4.1,proto=tcp,soft,timeo=100,retrans=2,addr={}",
        addr.ip()
    );
    if let Some(p) = loc.port {
        data.push_str(&format!(",port={p}"));
    }
    if !extra.is_empty() {
        data.push(',');
        data.push_str(&extra);
    }
    Ok(MountRequest {
        fstype: "nfs4".into(),
        flags: bits,
        data,
    })
}

/// Mounts with a deadline: an NFS mount of a dead server can block in the kernel, and the node
/// plugin must answer. A mount that completes after the deadline is found (and accepted) by the
/// next, idempotent, call.
pub fn mount_with_deadline(
    mounter: Arc<dyn Mounter>,
    source: String,
    target: PathBuf,
    req: MountRequest,
    deadline: Duration,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let what = format!("mount {source} on {}", target.display());
    std::thread::spawn(move || {
        let _ = tx.send(mounter.mount(&source, &target, &req));
    });
    rx.recv_timeout(deadline)
        .map_err(|_| Error::Unavailable(format!("{what}: no answer within {deadline:?}")))?
}

/// Stands in for the kernel's NFS client where the node has none but the export's directory is
/// local: a mount of `server:/share/dir` becomes a bind of `<local>/dir`. Everything else goes to
/// the wrapped mounter.
#[derive(Debug)]
pub struct LocalExportMounter {
    inner: Arc<dyn Mounter>,
    exports: Vec<(String, PathBuf)>,
}

impl LocalExportMounter {
    /// `exports` maps `server:/share` to the local directory the server exports.
    pub fn new(inner: Arc<dyn Mounter>, exports: Vec<(String, PathBuf)>) -> Self {
        LocalExportMounter { inner, exports }
    }
}

impl Mounter for LocalExportMounter {
    fn mount(&self, source: &str, target: &Path, req: &MountRequest) -> Result<()> {
        if !req.fstype.starts_with("nfs") {
            return self.inner.mount(source, target, req);
        }
        for (export, dir) in &self.exports {
            if let Some(rest) = source.strip_prefix(export.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                let local = dir.join(rest.trim_start_matches('/'));
                let ro = req.flags & nix::mount::MsFlags::MS_RDONLY.bits() != 0;
                return self.inner.bind(&local, target, ro);
            }
        }
        Err(Error::Unavailable(format!(
            "{source}: this node has no NFS client and no local directory for that export"
        )))
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        self.inner.bind(source, target, read_only)
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        self.inner.unmount(target)
    }

    fn list(&self) -> Result<Vec<MountEntry>> {
        self.inner.list()
    }
}

/// NodeStageVolume for an NFS volume: mounts the directory on `staging` (once).
pub fn stage(
    mounter: &Arc<dyn Mounter>,
    loc: &Location,
    staging: &Path,
    flags: &[String],
    deadline: Duration,
) -> Result<()> {
    if mounter.mounted_at(staging)?.is_some() {
        return Ok(());
    }
    std::fs::create_dir_all(staging).map_err(Error::io(format!("create {}", staging.display())))?;
    let req = mount_request(loc, flags, false)?;
    mount_with_deadline(
        mounter.clone(),
        loc.source(),
        staging.to_path_buf(),
        req,
        deadline,
    )
}

/// NodeGetVolumeStats for an NFS volume: the export's usage as the mount reports it.
pub fn stats(mounter: &dyn Mounter, path: &Path) -> Result<crate::local::Stats> {
    if !path.exists() {
        return Err(Error::NotFound(format!(
            "volume_path {} does not exist",
            path.display()
        )));
    }
    let usage = crate::fs::usage(path)?;
    let abnormal = mounter
        .mounted_at(path)?
        .is_none()
        .then(|| format!("{} is not mounted", path.display()));
    Ok(crate::local::Stats {
        usage: Some(usage),
        capacity_bytes: usage.total,
        abnormal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A mounter whose NFS mount hangs, as mount(2) does against a dead server.
    #[derive(Debug)]
    struct Hanging;

    impl Mounter for Hanging {
        fn mount(&self, _: &str, _: &Path, _: &MountRequest) -> Result<()> {
            std::thread::sleep(Duration::from_secs(5));
            Ok(())
        }
        fn bind(&self, _: &Path, _: &Path, _: bool) -> Result<()> {
            Ok(())
        }
        fn unmount(&self, _: &Path) -> Result<()> {
            Ok(())
        }
        fn list(&self) -> Result<Vec<MountEntry>> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn a_hanging_mount_answers_unavailable_at_the_deadline() {
        let started = std::time::Instant::now();
        let e = mount_with_deadline(
            Arc::new(Hanging),
            "10.0.0.5:/export/x".into(),
            PathBuf::from("/nonexistent"),
            MountRequest::default(),
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let loc = Location::from_context(&params(&[
            ("server", "127.0.0.1"),
            ("share", "/e"),
            ("port", "20049"),
        ]))
        .unwrap();
        let req = mount_request(&loc, &["noatime".into(), "nconnect=2".into()], true).unwrap();
        assert_eq!(req.fstype, "nfs4");
        assert!(
            req.data.contains("soft")
                && req.data.contains("timeo=")
                && req.data.contains("retrans=")
        );
        assert!(req.data.contains("addr=127.0.0.1") && req.data.contains("port=20049"));
        assert!(req.data.ends_with("nconnect=2"), "{}", req.data);
        assert_ne!(req.flags & nix::mount::MsFlags::MS_RDONLY.bits(), 0);
    }

    #[test]
    fn parameters_plan_a_volume() {
        let v = plan(
            "pvc-1",
            &params(&[
                ("backend", "nfs"),
                ("server", "10.0.0.5"),
                ("share", "/export"),
                ("subDir", "${pvc.metadata.namespace}/${pvc.metadata.name}"),
                ("onDelete", "archive"),
                ("csi.storage.k8s.io/pvc/name", "data"),
                ("csi.storage.k8s.io/pvc/namespace", "team-a"),
            ]),
            1 << 30,
        )
        .unwrap();
        assert_eq!(v.sub_dir, "team-a/data");
        assert_eq!(v.on_delete, OnDelete::Archive);
        let loc = Location::from_context(&v.context()).unwrap();
        assert_eq!(loc.source(), "10.0.0.5:/export/team-a/data");
    }

    #[test]
    fn parameters_that_escape_or_are_missing_are_refused() {
        for (kv, needle) in [
            (vec![("share", "/export")], "server"),
            (vec![("server", "s")], "share"),
            (vec![("server", "s"), ("share", "export")], "share"),
            (
                vec![("server", "s"), ("share", "/e"), ("subDir", "../etc")],
                "subDir",
            ),
            (
                vec![("server", "s"), ("share", "/e"), ("subDir", "a/../../b")],
                "subDir",
            ),
            (
                vec![("server", "s"), ("share", "/e"), ("subDir", "/abs")],
                "subDir",
            ),
            (
                vec![
                    ("server", "s"),
                    ("share", "/e"),
                    ("subDir", "${pvc.metadata.name}"),
                ],
                "extra-create-metadata",
            ),
            (
                vec![("server", "s"), ("share", "/e"), ("onDelete", "shred")],
                "onDelete",
            ),
            (
                vec![("server", "s"), ("share", "/e"), ("color", "red")],
                "color",
            ),
            (
                vec![("server", "s"), ("share", "/e"), ("port", "99999")],
                "port",
            ),
        ] {
            let e = plan("n", &params(&kv), 0).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)));
            assert!(e.to_string().contains(needle), "{e} should name {needle}");
        }
        assert!(
            Location::from_context(&params(&[
                ("server", "s"),
                ("share", "/e"),
                ("subDir", "..")
            ]))
            .is_err()
        );
    }
}
