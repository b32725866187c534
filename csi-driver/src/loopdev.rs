//! Loop devices over the kernel's ioctl interface (`linux/loop.h`): attach a file, find the device
//! backing a file, refresh its size, detach.
//!
//! Filesystem volumes are attached with `LO_FLAGS_AUTOCLEAR`, so the device disappears by itself when
//! its last mount goes away (including when a mount namespace is torn down); block volumes have no
//! mount holding them and are detached explicitly.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` from `linux/loop.h`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `linux/loop.h`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(size_of::<LoopConfig>() == 304);

nix::ioctl_none_bad!(loop_ctl_get_free, LOOP_CTL_GET_FREE);
nix::ioctl_write_ptr_bad!(loop_configure, LOOP_CONFIGURE, LoopConfig);
nix::ioctl_none_bad!(loop_clr_fd, LOOP_CLR_FD);
nix::ioctl_none_bad!(loop_set_capacity, LOOP_SET_CAPACITY);

/// An attached loop device. Dropping it closes the driver's handle; with autoclear the device then
/// lives exactly as long as something else (a mount) holds it.
#[derive(Debug)]
pub struct Attached {
    /// `/dev/loopN`.
    pub path: PathBuf,
    _handle: File,
}

/// Attaches `file` to a free loop device.
pub fn attach(file: &Path, autoclear: bool, read_only: bool) -> Result<Attached> {
    let backing = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(file)
        .map_err(Error::io(format!("open {}", file.display())))?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(Error::io("open /dev/loop-control"))?;
    // Another attach can take the free device between GET_FREE and CONFIGURE; then try the next.
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument; the fd is a valid open loop-control device.
        let n = unsafe { loop_ctl_get_free(control.as_raw_fd()) }?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match OpenOptions::new().read(true).write(!read_only).open(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("open {}", path.display()))(e)),
        };
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: if autoclear { LO_FLAGS_AUTOCLEAR } else { 0 },
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        if read_only {
            info.lo_flags |= 1; // LO_FLAGS_READ_ONLY
        }
        let name = file.as_os_str().as_encoded_bytes();
        let len = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..len].copy_from_slice(&name[..len]);
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // SAFETY: `config` is a fully initialised loop_config that outlives the call, and both fds
        // are open.
        match unsafe { loop_configure(dev.as_raw_fd(), &config) } {
            Ok(_) => {
                return Ok(Attached { path, _handle: dev });
            }
            Err(nix::errno::Errno::EBUSY) => continue,
            Err(e) => {
                return Err(Error::io(format!(
                    "attach {} to {}",
                    file.display(),
                    path.display()
                ))(e.into()));
            }
        }
    }
    Err(Error::ResourceExhausted(
        "no free loop device after 64 attempts".into(),
    ))
}

/// The loop devices currently backed by `file` (normally zero or one).
pub fn find(file: &Path) -> Result<Vec<PathBuf>> {
    let want = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let mut found = Vec::new();
    let entries = match std::fs::read_dir("/sys/block") {
        Ok(e) => e,
        Err(e) => return Err(Error::io("read /sys/block")(e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(backing.trim_end()) == want {
            found.push(PathBuf::from("/dev").join(name));
        }
    }
    found.sort();
    Ok(found)
}

/// Detaches `dev`. Detaching a device that is already free is not an error.
pub fn detach(dev: &Path) -> Result<()> {
    let f = match File::open(dev) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("open {}", dev.display()))(e)),
    };
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is an open loop device.
    match unsafe { loop_clr_fd(f.as_raw_fd()) } {
        Ok(_) | Err(nix::errno::Errno::ENXIO) => Ok(()),
        Err(e) => Err(Error::io(format!("detach {}", dev.display()))(e.into())),
    }
}

/// Makes `dev` pick up the current size of its backing file.
pub fn refresh_size(dev: &Path) -> Result<()> {
    let f = File::open(dev).map_err(Error::io(format!("open {}", dev.display())))?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument; the fd is an open loop device.
    unsafe { loop_set_capacity(f.as_raw_fd()) }
        .map_err(|e| Error::io(format!("resize {}", dev.display()))(e.into()))?;
    Ok(())
}

/// The device number (`major:minor`) of a block device node.
pub fn device_number(dev: &Path) -> Result<(u32, u32)> {
    let st = nix::sys::stat::stat(dev)
        .map_err(|e| Error::io(format!("stat {}", dev.display()))(e.into()))?;
    Ok((
        nix::sys::stat::major(st.st_rdev) as u32,
        nix::sys::stat::minor(st.st_rdev) as u32,
    ))
}
