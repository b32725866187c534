//! The `local` backend: every volume is a sparse image file under the state directory, carrying its
//! own filesystem (ext4, xfs or btrfs) or none (raw block), attached through a loop device on the node.
//! The image's size is the volume's size, so writing past it fails inside the volume and never fills
//! the node. Snapshots and clones are image copies (reflinks where the host filesystem allows).
//!
//! On disk, under `<state-dir>/local`:
//! * `volumes/<id>/meta.json` and `volumes/<id>/disk.img`
//! * `snapshots/<id>/meta.json` and `snapshots/<id>/disk.img`
//! * `tmp/`: work in progress. A volume or snapshot appears under its final name only by one atomic
//!   rename of a finished directory, and leaves by a rename into `tmp/`, so a crash at any point
//!   leaves either the whole object or something in `tmp/`, which is swept at start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fs::{self, FsType};
use crate::ids::{self, Kind};
use crate::loopdev;
use crate::mounts::{MountRequest, Mounter, parse_flags};
use crate::persist;

/// Sizes are rounded up to this.
pub const ALIGN: u64 = 1 << 20;
/// Size of a volume whose request gives no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// A copy of a snapshot.
    Snapshot(String),
    /// A clone of another volume.
    Volume(String),
}

/// A volume as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    /// Volume ID.
    pub id: String,
    /// The CreateVolume name.
    pub name: String,
    /// Size of the image.
    pub capacity_bytes: u64,
    /// Its filesystem; `None` for a raw block volume.
    pub fs: Option<FsType>,
    /// The device size the filesystem was last grown to (it grows at stage time or on
    /// NodeExpandVolume when it is smaller than the image).
    pub fs_bytes: u64,
    /// What it was created from.
    pub source: Option<Source>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// A snapshot as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// Snapshot ID.
    pub id: String,
    /// The CreateSnapshot name.
    pub name: String,
    /// The volume it was taken of.
    pub source_volume_id: String,
    /// Size of the source at snapshot time (the minimum size of a volume restored from it).
    pub size_bytes: u64,
    /// The source's filesystem.
    pub fs: Option<FsType>,
    /// The size the filesystem had.
    pub fs_bytes: u64,
    /// Creation time: seconds and nanoseconds since the epoch.
    pub created: (i64, i32),
}

/// A CreateVolume request, decoded.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Volume name.
    pub name: String,
    /// Smallest acceptable size (0: no minimum).
    pub required: u64,
    /// Largest acceptable size (0: no limit).
    pub limit: u64,
    /// Filesystem to make, or `None` for a block-only volume.
    pub fs: Option<FsType>,
    /// Content source.
    pub source: Option<Source>,
}

/// How a volume is staged or published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Raw block device.
    Block,
    /// Mounted filesystem.
    Mount {
        /// Filesystem the caller expects, if it named one.
        fs: Option<FsType>,
        /// Mount flags from the capability.
        flags: Vec<String>,
    },
}

/// Result of ControllerExpandVolume.
#[derive(Debug, Clone, Copy)]
pub struct Expanded {
    /// New size.
    pub capacity_bytes: u64,
    /// Whether the node still has to grow the device or the filesystem.
    pub node_expansion_required: bool,
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Filesystem usage, or `None` for a block volume.
    pub usage: Option<fs::Usage>,
    /// Size of the volume.
    pub capacity_bytes: u64,
    /// Something is wrong with the volume, and what.
    pub abnormal: Option<String>,
}

/// The local backend.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
    pool_bytes: u64,
    committed: Mutex<u64>,
    mounter: Arc<dyn Mounter>,
}

fn now() -> (i64, i32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// Picks the size for a capacity range: the required size (or the default), raised to the
/// filesystem's minimum and rounded up to [`ALIGN`], never above the limit.
pub fn choose_size(required: u64, limit: u64, min: u64) -> Result<u64> {
    if limit != 0 && required > limit {
        return Err(Error::InvalidArgument(format!(
            "capacity_range: required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let floor = required.max(min);
    let wanted = match (required, limit) {
        (0, 0) => DEFAULT_SIZE,
        (0, l) => l.min(DEFAULT_SIZE),
        (r, _) => r,
    };
    let mut size = round_up(wanted.max(min));
    if limit != 0 && size > limit {
        size = limit / ALIGN * ALIGN;
    }
    if size < floor {
        return Err(Error::OutOfRange(format!(
            "capacity_range: no size in MiB steps between {floor} bytes and limit_bytes \
             {limit} (the smallest volume of this kind is {min} bytes)"
        )));
    }
    Ok(size)
}

fn fits(size: u64, required: u64, limit: u64) -> bool {
    size >= required && (limit == 0 || size <= limit)
}

impl LocalBackend {
    /// Opens (creating if needed) the backend under `state_dir/local`, sweeping work left by a
    /// crash. `pool_bytes` is the total the backend may hand out.
    pub fn open(state_dir: &Path, pool_bytes: u64, mounter: Arc<dyn Mounter>) -> Result<Self> {
        let root = state_dir.join("local");
        for d in ["volumes", "snapshots", "tmp"] {
            std::fs::create_dir_all(root.join(d))
                .map_err(Error::io(format!("create {}", root.join(d).display())))?;
        }
        let tmp = root.join("tmp");
        for entry in std::fs::read_dir(&tmp)
            .map_err(Error::io(format!("read {}", tmp.display())))?
            .flatten()
        {
            tracing::info!(path = %entry.path().display(), "removing leftover of an interrupted operation");
            remove_tree(&entry.path())?;
        }
        let backend = LocalBackend {
            root,
            pool_bytes,
            committed: Mutex::new(0),
            mounter,
        };
        let used: u64 = backend
            .list_volumes()?
            .iter()
            .map(|v| v.capacity_bytes)
            .sum::<u64>()
            + backend
                .list_snapshots()?
                .iter()
                .map(|s| s.size_bytes)
                .sum::<u64>();
        *backend.lock_committed() = used;
        Ok(backend)
    }

    fn lock_committed(&self) -> std::sync::MutexGuard<'_, u64> {
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reserve(&self, bytes: u64) -> Result<()> {
        let mut c = self.lock_committed();
        let free = self.pool_bytes.saturating_sub(*c);
        if bytes > free {
            return Err(Error::ResourceExhausted(format!(
                "local pool: {bytes} bytes requested, {free} of {} available",
                self.pool_bytes
            )));
        }
        *c += bytes;
        Ok(())
    }

    fn release(&self, bytes: u64) {
        let mut c = self.lock_committed();
        *c = c.saturating_sub(bytes);
    }

    /// Bytes still available for new volumes: the pool minus what is handed out, and never more
    /// than the host filesystem has free.
    pub fn available(&self) -> u64 {
        let logical = self.pool_bytes.saturating_sub(*self.lock_committed());
        match fs::usage(&self.root) {
            Ok(u) => logical.min(u.available),
            Err(_) => logical,
        }
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(id)
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    /// The image file of a volume.
    pub fn image(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join("disk.img")
    }

    fn work_dir(&self, id: &str) -> Result<PathBuf> {
        let (s, n) = now();
        let dir = self.root.join("tmp").join(format!("{id}.{s}.{n}"));
        std::fs::create_dir(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
        Ok(dir)
    }

    /// A volume by ID; `None` if there is none (including IDs this backend could not have made).
    pub fn volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        if ids::parse(id) != Some(Kind::LocalVolume) {
            return Ok(None);
        }
        persist::read_json(&self.volume_dir(id).join("meta.json"))
    }

    /// A snapshot by ID.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        if ids::parse(id) != Some(Kind::Snapshot) {
            return Ok(None);
        }
        persist::read_json(&self.snapshot_dir(id).join("meta.json"))
    }

    fn list<T: serde::de::DeserializeOwned>(&self, dir: &str) -> Result<Vec<T>> {
        let dir = self.root.join(dir);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(Error::io(format!("read {}", dir.display())))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| ids::parse(n).is_some())
            .collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(r) = persist::read_json(&dir.join(n).join("meta.json"))? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Every volume, ordered by ID.
    pub fn list_volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.list("volumes")
    }

    /// Every snapshot, ordered by ID.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.list("snapshots")
    }

    /// CreateVolume. Returns the existing volume when the same request is repeated.
    pub fn create_volume(&self, req: &CreateRequest) -> Result<VolumeRecord> {
        let id = ids::for_name(Kind::LocalVolume, &req.name);
        // What the content source brings: its size is the floor, its filesystem is the volume's.
        let (src_bytes, src_fs, src_fs_bytes) = match &req.source {
            None => (0, req.fs, 0),
            Some(Source::Snapshot(s)) => {
                let snap = self.snapshot(s)?.ok_or_else(|| {
                    Error::NotFound(format!("volume_content_source: snapshot {s} not found"))
                })?;
                (snap.size_bytes, snap.fs, snap.fs_bytes)
            }
            Some(Source::Volume(v)) => {
                let vol = self.volume(v)?.ok_or_else(|| {
                    Error::NotFound(format!("volume_content_source: volume {v} not found"))
                })?;
                (vol.capacity_bytes, vol.fs, vol.fs_bytes)
            }
        };
        if req.source.is_some() && req.fs.is_some() && src_fs.is_some() && req.fs != src_fs {
            return Err(Error::InvalidArgument(format!(
                "volume_capabilities: the content source carries {}, not {}",
                src_fs.map_or("no filesystem", FsType::name),
                req.fs.map_or("none", FsType::name)
            )));
        }
        if let Some(existing) = self.volume(&id)? {
            if existing.name == req.name
                && existing.source == req.source
                && fits(existing.capacity_bytes, req.required, req.limit)
                && (req.fs.is_none() || existing.fs == req.fs)
            {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists(format!(
                "volume {} exists with {} bytes{}; the request is incompatible",
                req.name,
                existing.capacity_bytes,
                existing
                    .fs
                    .map_or(String::new(), |f| format!(" of {}", f.name()))
            )));
        }
        if req.limit != 0 && src_bytes > req.limit {
            return Err(Error::OutOfRange(format!(
                "capacity_range: the content source holds {src_bytes} bytes, more than \
                 limit_bytes {}",
                req.limit
            )));
        }
        let fs = src_fs.or(req.fs);
        let min = fs.map_or(ALIGN, FsType::min_bytes).max(src_bytes);
        let size = choose_size(req.required.max(src_bytes), req.limit, min)?;
        self.reserve(size)?;
        let made = self.build_volume(&id, req, size, fs, src_fs_bytes);
        if made.is_err() {
            self.release(size);
        }
        made
    }

    fn build_volume(
        &self,
        id: &str,
        req: &CreateRequest,
        size: u64,
        fs: Option<FsType>,
        src_fs_bytes: u64,
    ) -> Result<VolumeRecord> {
        let work = self.work_dir(id)?;
        let result = (|| {
            let image = work.join("disk.img");
            let mut fs_bytes = size;
            match &req.source {
                None => {
                    let f = std::fs::File::create(&image)
                        .map_err(Error::io(format!("create {}", image.display())))?;
                    f.set_len(size)
                        .map_err(Error::io(format!("size {}", image.display())))?;
                    drop(f);
                    match fs {
                        Some(fs) => fs::mkfs(fs, &image)?,
                        None => fs_bytes = 0,
                    }
                }
                Some(Source::Snapshot(s)) => {
                    fs::copy_image(&self.snapshot_dir(s).join("disk.img"), &image)?;
                    fs_bytes = self.grow_copied(&image, size, fs, src_fs_bytes)?;
                }
                Some(Source::Volume(v)) => {
                    self.copy_consistent(v, &image)?;
                    fs_bytes = self.grow_copied(&image, size, fs, src_fs_bytes)?;
                }
            }
            let rec = VolumeRecord {
                id: id.to_string(),
                name: req.name.clone(),
                capacity_bytes: size,
                fs,
                fs_bytes,
                source: req.source.clone(),
                created: now().0 as u64,
            };
            persist::write_json(&work.join("meta.json"), &rec)?;
            let dest = self.volume_dir(id);
            std::fs::rename(&work, &dest)
                .map_err(Error::io(format!("rename into {}", dest.display())))?;
            persist::sync_parent(&dest)?;
            Ok(rec)
        })();
        if result.is_err() {
            let _ = remove_tree(&work);
        }
        result
    }

    /// Enlarges a copied image to `size`; grows its filesystem now if that can be done offline.
    /// Returns the filesystem's size afterwards.
    fn grow_copied(
        &self,
        image: &Path,
        size: u64,
        fs: Option<FsType>,
        fs_bytes: u64,
    ) -> Result<u64> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(image)
            .map_err(Error::io(format!("open {}", image.display())))?;
        if f.metadata().map(|m| m.len()).unwrap_or(0) < size {
            f.set_len(size)
                .map_err(Error::io(format!("size {}", image.display())))?;
        }
        drop(f);
        match fs {
            None => Ok(0),
            Some(fs) if fs_bytes < size && fs::grow_offline(fs, image)? => Ok(size),
            Some(_) => Ok(fs_bytes),
        }
    }

    /// Copies a volume's image; if the volume is mounted on this node, its filesystem is frozen
    /// for the copy so the copy is consistent.
    fn copy_consistent(&self, id: &str, to: &Path) -> Result<()> {
        let image = self.image(id);
        let mut _frozen = None;
        for dev in loopdev::find(&image)? {
            let number = loopdev::device_number(&dev)?;
            if let Some(m) = self
                .mounter
                .list()?
                .into_iter()
                .find(|m| mounts_device(m, &[(dev.clone(), number)]))
            {
                _frozen = Some(fs::freeze(&m.target)?);
                break;
            }
        }
        fs::copy_image(&image, to)
    }

    /// DeleteVolume. Deleting a volume that does not exist succeeds.
    pub fn delete_volume(&self, id: &str) -> Result<()> {
        let Some(rec) = self.volume(id)? else {
            return Ok(());
        };
        let attached = loopdev::find(&self.image(id))?;
        if let Some(dev) = attached.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is in use on this node ({}); unstage it first",
                dev.display()
            )));
        }
        let (s, n) = now();
        let trash = self.root.join("tmp").join(format!("{id}.deleted.{s}.{n}"));
        let dir = self.volume_dir(id);
        std::fs::rename(&dir, &trash)
            .map_err(Error::io(format!("move {} aside", dir.display())))?;
        self.release(rec.capacity_bytes);
        remove_tree(&trash)
    }

    /// ControllerExpandVolume.
    pub fn expand_volume(&self, id: &str, required: u64, limit: u64) -> Result<Expanded> {
        let mut rec = self
            .volume(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id} not found")))?;
        let attached = !loopdev::find(&self.image(id))?.is_empty();
        if required <= rec.capacity_bytes {
            return Ok(Expanded {
                capacity_bytes: rec.capacity_bytes,
                node_expansion_required: attached && rec.fs_bytes < rec.capacity_bytes,
            });
        }
        let size = choose_size(required, limit, ALIGN)?;
        self.reserve(size - rec.capacity_bytes)?;
        let image = self.image(id);
        let grown = (|| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .map_err(Error::io(format!("open {}", image.display())))?;
            f.set_len(size)
                .map_err(Error::io(format!("grow {}", image.display())))?;
            let old = rec.capacity_bytes;
            rec.capacity_bytes = size;
            if let Some(fs) = rec.fs
                && !attached
                && fs::grow_offline(fs, &image)?
            {
                rec.fs_bytes = size;
            }
            if rec.fs.is_none() {
                rec.fs_bytes = 0;
            }
            persist::write_json(&self.volume_dir(id).join("meta.json"), &rec).inspect_err(|_| {
                let _ = f.set_len(old);
            })
        })();
        if let Err(e) = grown {
            self.release(size - rec.capacity_bytes.min(size));
            return Err(e);
        }
        Ok(Expanded {
            capacity_bytes: size,
            node_expansion_required: attached || (rec.fs.is_some() && rec.fs_bytes < size),
        })
    }

    /// CreateSnapshot. Returns the existing snapshot when the same request is repeated.
    pub fn create_snapshot(&self, name: &str, source: &str) -> Result<SnapshotRecord> {
        let id = ids::for_name(Kind::Snapshot, name);
        if let Some(existing) = self.snapshot(&id)? {
            if existing.name == name && existing.source_volume_id == source {
                return Ok(existing);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {name} exists for volume {}, not {source}",
                existing.source_volume_id
            )));
        }
        let vol = self.volume(source)?.ok_or_else(|| {
            Error::NotFound(format!("source_volume_id: volume {source} not found"))
        })?;
        self.reserve(vol.capacity_bytes)?;
        let work = match self.work_dir(&id) {
            Ok(w) => w,
            Err(e) => {
                self.release(vol.capacity_bytes);
                return Err(e);
            }
        };
        let made = (|| {
            self.copy_consistent(source, &work.join("disk.img"))?;
            let rec = SnapshotRecord {
                id: id.clone(),
                name: name.to_string(),
                source_volume_id: source.to_string(),
                size_bytes: vol.capacity_bytes,
                fs: vol.fs,
                fs_bytes: vol.fs_bytes,
                created: now(),
            };
            persist::write_json(&work.join("meta.json"), &rec)?;
            let dest = self.snapshot_dir(&id);
            std::fs::rename(&work, &dest)
                .map_err(Error::io(format!("rename into {}", dest.display())))?;
            persist::sync_parent(&dest)?;
            Ok(rec)
        })();
        if made.is_err() {
            let _ = remove_tree(&work);
            self.release(vol.capacity_bytes);
        }
        made
    }

    /// DeleteSnapshot. Deleting a snapshot that does not exist succeeds.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        let Some(rec) = self.snapshot(id)? else {
            return Ok(());
        };
        let (s, n) = now();
        let trash = self.root.join("tmp").join(format!("{id}.deleted.{s}.{n}"));
        let dir = self.snapshot_dir(id);
        std::fs::rename(&dir, &trash)
            .map_err(Error::io(format!("move {} aside", dir.display())))?;
        self.release(rec.size_bytes);
        remove_tree(&trash)
    }

    fn require(&self, id: &str) -> Result<VolumeRecord> {
        self.volume(id)?
            .ok_or_else(|| Error::NotFound(format!("volume {id} not found")))
    }

    fn save(&self, rec: &VolumeRecord) -> Result<()> {
        persist::write_json(&self.volume_dir(&rec.id).join("meta.json"), rec)
    }

    /// The loop devices of a volume, each with its device number.
    fn devices(&self, id: &str) -> Result<Vec<(PathBuf, (u32, u32))>> {
        loopdev::find(&self.image(id))?
            .into_iter()
            .map(|d| loopdev::device_number(&d).map(|n| (d, n)))
            .collect()
    }

    /// NodeStageVolume: attaches the image; for filesystem access, mounts it on `staging` and grows
    /// the filesystem if the volume was expanded since.
    pub fn stage(&self, id: &str, staging: &Path, access: &Access) -> Result<()> {
        let mut rec = self.require(id)?;
        let image = self.image(id);
        let Access::Mount { fs: want, flags } = access else {
            if loopdev::find(&image)?.is_empty() {
                // No autoclear: nothing holds a block volume's device but the driver.
                let dev = loopdev::attach(&image, false, false)?;
                tracing::info!(volume = id, device = %dev.path.display(), "staged block volume");
            }
            return Ok(());
        };
        let Some(fs) = rec.fs else {
            return Err(Error::InvalidArgument(format!(
                "volume_capability: volume {id} was created for block access and has no filesystem"
            )));
        };
        if want.is_some_and(|w| w != fs) {
            return Err(Error::InvalidArgument(format!(
                "volume_capability.mount.fs_type: volume {id} carries {}",
                fs.name()
            )));
        }
        let devices = self.devices(id)?;
        if let Some(m) = self.mounter.mounted_at(staging)? {
            if mounts_device(&m, &devices) {
                return self.grow_if_needed(&mut rec, staging);
            }
            return Err(Error::AlreadyExists(format!(
                "staging_target_path {} already has another filesystem mounted ({})",
                staging.display(),
                m.source
            )));
        }
        if !staging.is_dir() {
            std::fs::create_dir_all(staging)
                .map_err(Error::io(format!("create {}", staging.display())))?;
        }
        let dev = loopdev::attach(&image, true, false)?;
        let (bits, mut data) = parse_flags(flags);
        if fs == FsType::Xfs {
            // Clones and restored snapshots share their source's UUID.
            data = if data.is_empty() {
                "nouuid".into()
            } else {
                format!("{data},nouuid")
            };
        }
        let req = MountRequest {
            fstype: fs.name().into(),
            flags: bits,
            data,
        };
        self.mounter
            .mount(&dev.path.to_string_lossy(), staging, &req)?;
        tracing::info!(volume = id, device = %dev.path.display(), path = %staging.display(), "staged");
        drop(dev); // autoclear: the mount now holds the device
        self.grow_if_needed(&mut rec, staging)
    }

    fn grow_if_needed(&self, rec: &mut VolumeRecord, mountpoint: &Path) -> Result<()> {
        let Some(fs) = rec.fs else { return Ok(()) };
        if rec.fs_bytes >= rec.capacity_bytes {
            return Ok(());
        }
        for (dev, _) in self.devices(&rec.id)? {
            loopdev::refresh_size(&dev)?;
            fs::grow_online(fs, &dev, mountpoint)?;
        }
        rec.fs_bytes = rec.capacity_bytes;
        self.save(rec)
    }

    /// NodeUnstageVolume: unmounts `staging` and detaches the volume's devices that nothing holds.
    pub fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        unmount_all(&*self.mounter, staging)?;
        if self.volume(id)?.is_none() {
            return Ok(());
        }
        let mounts = self.mounter.list()?;
        for (dev, number) in self.devices(id)? {
            if !mounts
                .iter()
                .any(|m| mounts_device(m, &[(dev.clone(), number)]))
            {
                loopdev::detach(&dev)?;
            }
        }
        Ok(())
    }

    /// NodePublishVolume: binds the staged filesystem (or the block device) onto `target`.
    pub fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        read_only: bool,
        access: &Access,
    ) -> Result<()> {
        let rec = self.require(id)?;
        let devices = self.devices(id)?;
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "volume {id} is not staged at {}",
                staging.display()
            ))
        };
        if let Access::Mount { .. } = access {
            if rec.fs.is_none() {
                return Err(Error::InvalidArgument(format!(
                    "volume_capability: volume {id} was created for block access"
                )));
            }
            let staged = self.mounter.mounted_at(staging)?.ok_or_else(not_staged)?;
            if !mounts_device(&staged, &devices) {
                return Err(not_staged());
            }
            let number = staged.device;
            return bind_dir(&*self.mounter, staging, target, read_only, &|m| {
                m.device == number
            });
        }
        let (dev, _) = devices.first().ok_or_else(not_staged)?;
        // A bind of a device node shows up as that node's path inside devtmpfs.
        let root = Path::new("/").join(dev.file_name().unwrap_or_default());
        if let Some(m) = self.mounter.mounted_at(target)? {
            if m.root == root && m.read_only == read_only {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "target_path {} is already published with different settings",
                target.display()
            )));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(Error::io(format!("create {}", parent.display())))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map_err(Error::io(format!("create {}", target.display())))?;
        self.mounter.bind(dev, target, read_only)
    }

    /// NodeUnpublishVolume: unmounts and removes `target`. Nothing there is success, whatever the
    /// volume (the node cannot always know volumes it did not stage, such as NFS ones).
    pub fn unpublish(&self, target: &Path) -> Result<()> {
        unpublish(&*self.mounter, target)
    }

    /// NodeGetVolumeStats.
    pub fn stats(&self, id: &str, path: &Path) -> Result<Stats> {
        let rec = self.require(id)?;
        let meta = std::fs::metadata(path).map_err(|_| {
            Error::NotFound(format!("volume_path {} does not exist", path.display()))
        })?;
        let devices = self.devices(id)?;
        let mut abnormal = None;
        match std::fs::metadata(self.image(id)) {
            Ok(m) if m.len() < rec.capacity_bytes => {
                abnormal = Some(format!(
                    "image is {} bytes, smaller than the volume's {}",
                    m.len(),
                    rec.capacity_bytes
                ))
            }
            Ok(_) => {}
            Err(e) => abnormal = Some(format!("image unreadable: {e}")),
        }
        if devices.is_empty() && abnormal.is_none() {
            abnormal = Some("volume is not attached on this node".into());
        }
        if !meta.is_dir() {
            return Ok(Stats {
                usage: None,
                capacity_bytes: rec.capacity_bytes,
                abnormal,
            });
        }
        match self.mounter.mounted_at(path)? {
            Some(m) if mounts_device(&m, &devices) => {}
            _ if abnormal.is_none() => {
                abnormal = Some(format!("{} is not a mount of this volume", path.display()))
            }
            _ => {}
        }
        Ok(Stats {
            usage: Some(fs::usage(path)?),
            capacity_bytes: rec.capacity_bytes,
            abnormal,
        })
    }

    /// NodeExpandVolume: makes the device pick up the image's new size and grows the filesystem
    /// mounted at `path`. Returns the volume's size.
    pub fn node_expand(&self, id: &str, path: &Path) -> Result<u64> {
        let mut rec = self.require(id)?;
        if !path.exists() {
            return Err(Error::NotFound(format!(
                "volume_path {} does not exist",
                path.display()
            )));
        }
        let devices = self.devices(id)?;
        if devices.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is not staged on this node"
            )));
        }
        for (dev, _) in &devices {
            loopdev::refresh_size(dev)?;
        }
        if rec.fs.is_some() && rec.fs_bytes < rec.capacity_bytes {
            self.grow_if_needed(&mut rec, path)?;
        }
        Ok(rec.capacity_bytes)
    }
}

/// Whether a mount is of one of `devices`. btrfs shows an anonymous device number in mountinfo,
/// not its block device's, so the mount source (`/dev/loopN`) counts too.
fn mounts_device(m: &crate::mounts::MountEntry, devices: &[(PathBuf, (u32, u32))]) -> bool {
    devices
        .iter()
        .any(|(path, number)| m.device == *number || Path::new(&m.source) == path)
}

/// Unmounts everything stacked on `path`.
pub fn unmount_all(mounter: &dyn Mounter, path: &Path) -> Result<()> {
    while mounter.mounted_at(path)?.is_some() {
        mounter.unmount(path)?;
    }
    Ok(())
}

/// Unmounts and removes a publish target; a target that is not there is fine.
pub fn unpublish(mounter: &dyn Mounter, target: &Path) -> Result<()> {
    unmount_all(mounter, target)?;
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(Error::io(format!("remove {}", target.display())))
}

/// Binds `source` onto `target` (a directory) unless the same is already there; a different
/// mount, or the same one with the other read-only setting, is `ALREADY_EXISTS`.
pub fn bind_dir(
    mounter: &dyn Mounter,
    source: &Path,
    target: &Path,
    read_only: bool,
    is_same: &dyn Fn(&crate::mounts::MountEntry) -> bool,
) -> Result<()> {
    if let Some(m) = mounter.mounted_at(target)? {
        if is_same(&m) && m.read_only == read_only {
            return Ok(());
        }
        return Err(Error::AlreadyExists(format!(
            "target_path {} is already published with different settings",
            target.display()
        )));
    }
    std::fs::create_dir_all(target).map_err(Error::io(format!("create {}", target.display())))?;
    mounter.bind(source, target, read_only)
}

fn remove_tree(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_capacity_range() {
        assert_eq!(choose_size(0, 0, ALIGN).unwrap(), DEFAULT_SIZE);
        assert_eq!(choose_size(1, 0, ALIGN).unwrap(), ALIGN);
        assert_eq!(choose_size(0, 10 << 20, ALIGN).unwrap(), 10 << 20);
        assert_eq!(choose_size(5 << 20, 0, 300 << 20).unwrap(), 300 << 20);
        // A limit that is not a multiple of the alignment rounds down if that still fits.
        assert_eq!(
            choose_size(0, (300 << 20) + 5, 300 << 20).unwrap(),
            300 << 20
        );
        assert_eq!(
            choose_size((2 << 20) + 1, (3 << 20) + 5, ALIGN).unwrap(),
            3 << 20
        );
        assert!(matches!(
            choose_size((3 << 20) + 1, (3 << 20) + 5, ALIGN),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            choose_size(1 << 20, 2 << 20, 300 << 20),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            choose_size(3 << 20, 2 << 20, ALIGN),
            Err(Error::InvalidArgument(_))
        ));
    }
}
