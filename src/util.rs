//! Small shared helpers: atomic writes, memory readings, human-readable sizes.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash never leaves a half-written file where a good one was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot flush {} to disk", tmp.display()))
    })
}

/// Removes the temporary files [`write_atomic`] leaves in `dir` when its process is killed
/// mid-write (`.NAME.tmpPID`); gives what it removed. Only files of that pattern are touched.
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let stale = n.starts_with('.')
            && n.rsplit_once(".tmp")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if stale && e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}

/// Flushes a directory's entries to disk (a rename inside it survives a power loss only then).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush directory {} to disk", dir.display()))?;
    Ok(())
}

/// Swaps two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`), so that a
/// directory replaced by another is never absent; elsewhere, two renames.
pub fn exchange_paths(a: &Path, b: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        extern "C" {
            fn renameat2(olddirfd: i32, oldpath: *const i8, newdirfd: i32, newpath: *const i8, flags: u32) -> i32;
        }
        const AT_FDCWD: i32 = -100;
        const RENAME_EXCHANGE: u32 = 2;
        let ca = CString::new(a.as_os_str().as_bytes())?;
        let cb = CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
        let r = unsafe { renameat2(AT_FDCWD, ca.as_ptr(), AT_FDCWD, cb.as_ptr(), RENAME_EXCHANGE) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // Filesystems without the flag (EINVAL) fall back to two renames.
        if e.raw_os_error() != Some(22) {
            return Err(e).with_context(|| format!("cannot swap {} and {}", a.display(), b.display()));
        }
    }
    let side = a.with_extension("swap");
    std::fs::rename(b, &side)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&side, a)?;
    Ok(())
}

/// [`write_atomic`] for a writer that streams into a file of its own: `write(tmp)` fills a
/// temporary file beside `path`, which then replaces `path` in one rename.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    if let Err(e) = write(&tmp) {
        std::fs::remove_file(&tmp).ok();
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), 0 where unavailable.
pub fn peak_rss() -> u64 {
    status_kb("VmHWM:") * 1024
}

/// Current resident set size of this process in bytes (Linux `VmRSS`), 0 where unavailable.
pub fn current_rss() -> u64 {
    status_kb("VmRSS:") * 1024
}

/// Memory the machine can still give without swapping, bytes (Linux `MemAvailable`), 0 where
/// unavailable.
pub fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `1.23 GB` style sizes (decimal units).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

/// Checks a device name (`cpu`, `cuda`, `cuda:N`) without opening the device: the ordinal
/// for CUDA, `None` for the CPU.
pub fn device_ordinal(name: &str) -> Result<Option<usize>> {
    match name.trim() {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Some(i)),
            _ => anyhow::bail!("unknown device `{n}`; choose cpu, cuda or cuda:N (N the GPU's ordinal)"),
        },
    }
}

/// Opens the device `name` names (see [`device_ordinal`]). A CUDA device in a build without
/// the `cuda` feature is an error that says how to build one.
pub fn device(name: &str) -> Result<candle_core::Device> {
    match device_ordinal(name)? {
        None => Ok(candle_core::Device::Cpu),
        Some(_) if !candle_core::utils::cuda_is_available() => anyhow::bail!(
            "device `{name}`: this strata was built without the `cuda` feature; build it with \
             `../shared/gpu/build-cuda.sh cargo build --release --features cuda` (see shared/gpu/README.md), \
             or use the cpu"
        ),
        Some(i) => candle_core::Device::new_cuda(i).with_context(|| format!("cannot open CUDA device {i}")),
    }
}

/// Device memory now: (bytes allocated from the device's pool, bytes the device has free), on
/// CUDA; `None` on the CPU (see [`current_rss`] and [`mem_available`]).
pub fn device_memory(dev: &candle_core::Device) -> Option<(u64, u64)> {
    device_pool::now(dev)
}

/// Device memory allocated at its peak since the last [`reset_device_peak`]: on CUDA, the
/// high-water mark of the stream-ordered pool candle allocates from (what PyTorch calls max
/// memory allocated; cuBLAS workspaces aside). `None` on the CPU (see [`peak_rss`]) or when
/// the driver does not say.
pub fn device_peak(dev: &candle_core::Device) -> Option<u64> {
    device_pool::used_high(dev, false)
}

/// Restarts [`device_peak`] from the memory in use now.
pub fn reset_device_peak(dev: &candle_core::Device) {
    device_pool::used_high(dev, true);
}

#[cfg(feature = "cuda")]
mod device_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;

    /// Reads an attribute of `dev`'s default memory pool, or with `set` writes 0 to it (the
    /// driver's way to restart a high-water mark), with the device's context bound to this thread.
    fn pool_attribute(dev: &candle_core::Device, attr: sys::CUmemPool_attribute, set: bool) -> Option<u64> {
        let candle_core::Device::Cuda(c) = dev else {
            return None;
        };
        let stream = c.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let ok = |r: sys::CUresult| r == sys::CUresult::CUDA_SUCCESS;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut value: u64 = 0;
        // SAFETY: plain driver queries on the context bound above; `pool` and `value` are valid
        // out-pointers of the types the driver writes (a pool handle, a cuuint64_t).
        unsafe {
            if !ok(sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())) {
                return None;
            }
            let v = &mut value as *mut u64 as *mut std::ffi::c_void;
            let r = match set {
                true => sys::cuMemPoolSetAttribute(pool, attr, v),
                false => sys::cuMemPoolGetAttribute(pool, attr, v),
            };
            ok(r).then_some(value)
        }
    }

    /// Reads (or, with `reset`, zeroes) the default pool's `USED_MEM_HIGH`.
    pub fn used_high(dev: &candle_core::Device, reset: bool) -> Option<u64> {
        pool_attribute(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, reset)
    }

    /// The default pool's `USED_MEM_CURRENT` and the device's free memory.
    pub fn now(dev: &candle_core::Device) -> Option<(u64, u64)> {
        let used = pool_attribute(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT, false)?;
        let (free, _total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
        Some((used, free as u64))
    }
}

#[cfg(not(feature = "cuda"))]
mod device_pool {
    /// No device pools without the `cuda` feature.
    pub fn used_high(_: &candle_core::Device, _: bool) -> Option<u64> {
        None
    }

    /// No device pools without the `cuda` feature.
    pub fn now(_: &candle_core::Device) -> Option<(u64, u64)> {
        None
    }
}

/// Implements `FromStr` and `serde::Deserialize` for types written as strings (recipe values
/// such as `"cosine"` or `"nf4-dq"`) through their own `parse(&str) -> anyhow::Result<Self>`,
/// so a recipe is typed as it is read and a bad value fails with the type's own message.
#[macro_export]
macro_rules! parsed_from_str {
    ($($t:ty),+) => {$(
        impl std::str::FromStr for $t {
            type Err = anyhow::Error;
            fn from_str(s: &str) -> anyhow::Result<Self> {
                Self::parse(s)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
            }
        }
    )+};
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device names are checked before anything opens; without the `cuda` feature, asking
    /// for CUDA says how to build it.
    #[test]
    fn device_names_are_checked() {
        assert_eq!(device_ordinal("cpu").unwrap(), None);
        assert_eq!(device_ordinal("cuda").unwrap(), Some(0));
        assert_eq!(device_ordinal("cuda:3").unwrap(), Some(3));
        for bad in ["gpu", "cuda:", "cuda:x", "metal"] {
            let e = device_ordinal(bad).unwrap_err().to_string();
            assert!(e.contains("choose cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert!(device("cpu").unwrap().is_cpu());
        #[cfg(not(feature = "cuda"))]
        {
            let e = device("cuda:1").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
            assert!(device_memory(&candle_core::Device::Cpu).is_none());
        }
    }
}
