//! A FUSE filesystem serving one file, that can be told to stop answering (a real hung
//! mount, for testing that the agent's reads of other processes' files have deadlines) or
//! can take a fixed time for every write (a slow disk, once a loop device sits on the
//! file). Speaks the kernel's FUSE protocol on `/dev/fuse` directly (root mounts it with
//! mount(2)), so the tests need no FUSE library or helper binary.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const ROOT: u64 = 1;
const FILE: u64 = 2;
/// Size of `struct fuse_in_header`.
const IN_HEADER: usize = 40;

/// A mounted one-file filesystem; unmounted on drop.
pub struct FrozenFs {
    mount_point: PathBuf,
    /// The connection's number under `/sys/fs/fuse/connections`.
    connection: Option<u32>,
    frozen: Arc<AtomicBool>,
    withheld: Arc<AtomicUsize>,
    _device: File,
}

impl FrozenFs {
    /// Mounts at `mount_point` a filesystem whose only file `name` has `contents`
    /// (executable).
    pub fn mount(mount_point: &Path, name: &str, contents: Vec<u8>) -> anyhow::Result<Self> {
        Self::mount_with(mount_point, name, contents, Duration::ZERO)
    }

    /// Mounts at `mount_point` a filesystem whose only file `name` is `size` bytes of
    /// zeros, writable, and answers every write only after `write_delay`: each write to
    /// the file (from a loop device on it, say) takes at least that long.
    pub fn mount_slow_writes(
        mount_point: &Path,
        name: &str,
        size: usize,
        write_delay: Duration,
    ) -> anyhow::Result<Self> {
        Self::mount_with(mount_point, name, vec![0; size], write_delay)
    }

    fn mount_with(
        mount_point: &Path,
        name: &str,
        contents: Vec<u8>,
        write_delay: Duration,
    ) -> anyhow::Result<Self> {
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .context("opening /dev/fuse")?;
        let options = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            device.as_raw_fd()
        ))?;
        let target = CString::new(mount_point.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated strings; the options name our open /dev/fuse.
        let mounted = unsafe {
            libc::mount(
                c"stallscope-test".as_ptr(),
                target.as_ptr(),
                c"fuse.stallscope".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        };
        if mounted != 0 {
            bail!(
                "mounting FUSE at {}: {}",
                mount_point.display(),
                std::io::Error::last_os_error()
            );
        }
        // From the mount table: a stat of the mount point would wait for the server.
        let connection = connection_of(mount_point);
        let frozen = Arc::new(AtomicBool::new(false));
        let withheld = Arc::new(AtomicUsize::new(0));
        let server = Server {
            device: device.try_clone()?,
            name: name.as_bytes().to_vec(),
            contents,
            write_delay,
            frozen: Arc::clone(&frozen),
            withheld: Arc::clone(&withheld),
        };
        thread::Builder::new()
            .name("test-fuse".into())
            .spawn(move || server.serve())?;
        Ok(Self {
            mount_point: mount_point.to_owned(),
            connection,
            frozen,
            withheld,
            _device: device,
        })
    }

    /// From now on, opens and reads of the file are never answered.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Requests left unanswered since [`Self::freeze`]: readers blocked right now.
    pub fn withheld(&self) -> usize {
        self.withheld.load(Ordering::SeqCst)
    }
}

/// Aborts a [`FrozenFs`]'s connection when dropped; see [`FrozenFs::abort_on_drop`].
pub struct AbortOnDrop<'a>(&'a FrozenFs);

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl FrozenFs {
    /// A guard that aborts the connection when dropped. Declared after the handle of a
    /// process that may be stuck on this filesystem, it runs first when a failed assertion
    /// unwinds, so that handle's drop (kill, then wait) does not wait forever.
    pub fn abort_on_drop(&self) -> AbortOnDrop<'_> {
        AbortOnDrop(self)
    }

    /// Fails every unanswered request and every later one, so nothing stays stuck (a
    /// request a reader already handed to the server waits even through SIGKILL).
    /// Idempotent.
    pub fn abort(&self) {
        if let Some(connection) = self.connection {
            let connections = Path::new("/sys/fs/fuse/connections");
            let abort = connections.join(connection.to_string()).join("abort");
            if !abort.exists() {
                // SAFETY: valid NUL-terminated strings; mounts the FUSE control filesystem.
                unsafe {
                    libc::mount(
                        c"fusectl".as_ptr(),
                        c"/sys/fs/fuse/connections".as_ptr(),
                        c"fusectl".as_ptr(),
                        0,
                        std::ptr::null(),
                    );
                }
            }
            let _ = std::fs::write(abort, "1");
        }
    }
}

impl Drop for FrozenFs {
    fn drop(&mut self) {
        self.abort();
        if let Ok(target) = CString::new(self.mount_point.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The device minor of the FUSE mount at `mount_point` (its connection's number), from
/// `/proc/self/mountinfo`.
fn connection_of(mount_point: &Path) -> Option<u32> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let target = mount_point.to_str()?;
    mounts.lines().rev().find_map(|line| {
        let mut fields = line.split_whitespace();
        let device = fields.nth(2)?;
        let point = fields.nth(1)?;
        (point == target)
            .then(|| device.split_once(':')?.1.parse().ok())
            .flatten()
    })
}

struct Server {
    device: File,
    name: Vec<u8>,
    contents: Vec<u8>,
    /// How long each write waits before it is answered.
    write_delay: Duration,
    frozen: Arc<AtomicBool>,
    withheld: Arc<AtomicUsize>,
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4)
        .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    buf.get(at..at + 8).map_or(0, |b| {
        u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    })
}

impl Server {
    fn serve(mut self) {
        let mut buffer = vec![0u8; (1 << 20) + 4096];
        loop {
            let read = match self.device.read(&mut buffer) {
                Ok(read) => read,
                // ENODEV once unmounted or aborted; EINTR and friends are retried.
                Err(err) if err.raw_os_error() == Some(libc::ENODEV) => return,
                Err(_) => continue,
            };
            if read < IN_HEADER {
                continue;
            }
            let request = &buffer[..read];
            let opcode = u32_at(request, 4);
            let unique = u64_at(request, 8);
            let node = u64_at(request, 16);
            let body = &request[IN_HEADER..];
            let reply = match opcode {
                FUSE_INIT => Some(Ok(init_reply())),
                FUSE_LOOKUP => {
                    let name = body.split(|&b| b == 0).next().unwrap_or_default();
                    Some(if node == ROOT && name == self.name {
                        Ok(self.entry_reply())
                    } else {
                        Err(libc::ENOENT)
                    })
                }
                FUSE_GETATTR => Some(Ok(self.attr_reply(node))),
                FUSE_OPEN | FUSE_READ if self.frozen.load(Ordering::SeqCst) => {
                    self.withheld.fetch_add(1, Ordering::SeqCst);
                    None
                }
                FUSE_OPEN => Some(Ok(vec![0u8; 16])),
                FUSE_READ => {
                    let offset = usize::try_from(u64_at(body, 8)).unwrap_or(usize::MAX);
                    let size = u32_at(body, 16) as usize;
                    let start = offset.min(self.contents.len());
                    let end = start.saturating_add(size).min(self.contents.len());
                    Some(Ok(self.contents[start..end].to_vec()))
                }
                FUSE_WRITE => {
                    // struct fuse_write_in: fh, offset, size, write_flags, lock_owner,
                    // flags, padding (40 bytes), then the data.
                    let offset = usize::try_from(u64_at(body, 8)).unwrap_or(usize::MAX);
                    let data = body.get(40..).unwrap_or_default();
                    let start = offset.min(self.contents.len());
                    let end = start.saturating_add(data.len()).min(self.contents.len());
                    self.contents[start..end].copy_from_slice(&data[..end - start]);
                    thread::sleep(self.write_delay);
                    // struct fuse_write_out: size written, padding.
                    let mut reply = (data.len() as u32).to_ne_bytes().to_vec();
                    reply.extend_from_slice(&[0u8; 4]);
                    Some(Ok(reply))
                }
                FUSE_RELEASE | FUSE_FLUSH => Some(Ok(Vec::new())),
                FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => None,
                FUSE_DESTROY => return,
                _ => Some(Err(libc::ENOSYS)),
            };
            if let Some(reply) = reply {
                let (error, payload) = match reply {
                    Ok(payload) => (0, payload),
                    Err(errno) => (-errno, Vec::new()),
                };
                let mut message = Vec::with_capacity(16 + payload.len());
                message.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
                message.extend_from_slice(&error.to_ne_bytes());
                message.extend_from_slice(&unique.to_ne_bytes());
                message.extend_from_slice(&payload);
                let _ = self.device.write_all(&message);
            }
        }
    }

    /// `struct fuse_attr` of a node.
    fn attr(&self, node: u64) -> Vec<u8> {
        let (mode, size, nlink) = if node == FILE {
            (libc::S_IFREG | 0o755, self.contents.len() as u64, 1u32)
        } else {
            (libc::S_IFDIR | 0o755, 0, 2)
        };
        let mut attr = Vec::with_capacity(88);
        attr.extend_from_slice(&node.to_ne_bytes()); // ino
        attr.extend_from_slice(&size.to_ne_bytes());
        attr.extend_from_slice(&size.div_ceil(512).to_ne_bytes()); // blocks
        attr.extend_from_slice(&[0u8; 24]); // atime, mtime, ctime
        attr.extend_from_slice(&[0u8; 12]); // their nanoseconds
        attr.extend_from_slice(&mode.to_ne_bytes());
        attr.extend_from_slice(&nlink.to_ne_bytes());
        attr.extend_from_slice(&[0u8; 12]); // uid, gid, rdev
        attr.extend_from_slice(&4096u32.to_ne_bytes()); // blksize
        attr.extend_from_slice(&0u32.to_ne_bytes()); // flags
        attr
    }

    /// `struct fuse_entry_out` for the file.
    fn entry_reply(&self) -> Vec<u8> {
        let mut reply = Vec::with_capacity(128);
        reply.extend_from_slice(&FILE.to_ne_bytes()); // nodeid
        reply.extend_from_slice(&0u64.to_ne_bytes()); // generation
        reply.extend_from_slice(&3600u64.to_ne_bytes()); // entry_valid
        reply.extend_from_slice(&3600u64.to_ne_bytes()); // attr_valid
        reply.extend_from_slice(&[0u8; 8]); // their nanoseconds
        reply.extend_from_slice(&self.attr(FILE));
        reply
    }

    /// `struct fuse_attr_out`.
    fn attr_reply(&self, node: u64) -> Vec<u8> {
        let mut reply = Vec::with_capacity(104);
        reply.extend_from_slice(&3600u64.to_ne_bytes()); // attr_valid
        reply.extend_from_slice(&[0u8; 8]); // nanoseconds, padding
        reply.extend_from_slice(&self.attr(node));
        reply
    }
}

/// `struct fuse_init_out` for protocol 7.31, no optional features.
fn init_reply() -> Vec<u8> {
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(&7u32.to_ne_bytes()); // major
    reply.extend_from_slice(&31u32.to_ne_bytes()); // minor
    reply.extend_from_slice(&(128u32 * 1024).to_ne_bytes()); // max_readahead
    reply.extend_from_slice(&0u32.to_ne_bytes()); // flags
    reply.extend_from_slice(&16u16.to_ne_bytes()); // max_background
    reply.extend_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
    reply.extend_from_slice(&(128u32 * 1024).to_ne_bytes()); // max_write
    reply.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
    reply.extend_from_slice(&32u16.to_ne_bytes()); // max_pages
    reply.extend_from_slice(&0u16.to_ne_bytes()); // map_alignment
    reply.extend_from_slice(&[0u8; 32]); // flags2, unused
    reply
}
