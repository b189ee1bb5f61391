//! A journal record's fields: written through a fixed buffer at increasing offsets of the
//! file ([`RecordWriter`]), read back with a length check on every field ([`Reader`]).

use std::{
    fs::File,
    io::{self, Write as _},
};

use agent_common::MAX_STACK_DEPTH;
use aya::Pod;

use crate::probes::DrainedStack;

/// A record's header: the record marker, the body's length and its CRC-32.
pub(super) const RECORD_HEADER: usize = 9;

/// Writes a record's body at increasing offsets of the journal through a fixed buffer,
/// summing its length and checksum on the way.
pub(super) struct RecordWriter<'a> {
    file: &'a File,
    offset: u64,
    buffer: Vec<u8>,
    length: u64,
    checksum: crc32fast::Hasher,
}

impl<'a> RecordWriter<'a> {
    pub(super) const BUFFER: usize = 256 * 1024;

    pub(super) fn new(file: &'a File, offset: u64) -> Self {
        Self {
            file,
            offset,
            buffer: Vec::with_capacity(Self::BUFFER),
            length: 0,
            checksum: crc32fast::Hasher::new(),
        }
    }

    pub(super) fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.buffer.len() + bytes.len() > Self::BUFFER {
            self.flush()?;
        }
        self.checksum.update(bytes);
        self.length += bytes.len() as u64;
        if bytes.len() >= Self::BUFFER {
            write_at(self.file, bytes, self.offset)?;
            self.offset += bytes.len() as u64;
        } else {
            self.buffer.extend_from_slice(bytes);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        write_at(self.file, &self.buffer, self.offset)?;
        self.offset += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// The body's length and checksum, once all of it is written.
    pub(super) fn finish(mut self) -> io::Result<(u32, u32)> {
        self.flush()?;
        let length = u32::try_from(self.length).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a drained generation over 4 GiB does not fit a journal record",
            )
        })?;
        Ok((length, self.checksum.finalize()))
    }
}

pub(super) fn write_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    file.write_all_at(bytes, offset)?;
    // Not a flush to disk: the page cache outlives the process (see the module).
    (&*file).flush()
}

/// Where the journal's fields are written: the file's header (a buffer) or a record.
pub(super) trait Put {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()>;
}

impl Put for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

impl Put for RecordWriter<'_> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        RecordWriter::put(self, bytes)
    }
}

pub(super) fn put_u64s(out: &mut impl Put, values: &[u64]) -> io::Result<()> {
    out.put(&(values.len() as u32).to_le_bytes())?;
    for value in values {
        out.put(&value.to_le_bytes())?;
    }
    Ok(())
}

pub(super) fn put_stacks(out: &mut impl Put, stacks: &[DrainedStack]) -> io::Result<()> {
    out.put(&(stacks.len() as u32).to_le_bytes())?;
    for stack in stacks {
        out.put(&stack.hash.to_le_bytes())?;
        out.put(&stack.flags.to_le_bytes())?;
        out.put(&(stack.ips.len() as u32).to_le_bytes())?;
        for ip in &stack.ips {
            out.put(&ip.to_le_bytes())?;
        }
    }
    Ok(())
}

pub(super) fn put_pairs<K: Pod, V: Pod>(out: &mut impl Put, pairs: &[(K, V)]) -> io::Result<()> {
    out.put(&(pairs.len() as u32).to_le_bytes())?;
    for (key, value) in pairs {
        out.put(pod_bytes(key))?;
        out.put(pod_bytes(value))?;
    }
    Ok(())
}

fn pod_bytes<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are `repr(C)` plain data without pointers; the probes' entry
    // types spell out their padding, so every byte is initialized.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
}

/// A cursor over a record's bytes; every read checks the length.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    pub(super) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(super) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    pub(super) fn pod<T: Pod>(&mut self) -> Option<T> {
        let bytes = self.take(size_of::<T>())?;
        // SAFETY: exactly `size_of::<T>()` bytes, written from a `T` of the same layout
        // (the header's layout hash matched); `Pod` types are valid for any bytes.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    pub(super) fn pairs<K: Pod, V: Pod>(&mut self) -> Option<Vec<(K, V)>> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(self.bytes.len()));
        for _ in 0..n {
            out.push((self.pod()?, self.pod()?));
        }
        Some(out)
    }

    pub(super) fn stacks(&mut self) -> Option<Vec<DrainedStack>> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(self.bytes.len() / 16));
        for _ in 0..n {
            let hash = self.u64()?;
            let flags = self.u32()?;
            let len = self.u32()? as usize;
            if len > MAX_STACK_DEPTH {
                return None;
            }
            let ips = (0..len).map(|_| self.u64()).collect::<Option<_>>()?;
            out.push(DrainedStack { hash, flags, ips });
        }
        Some(out)
    }

    pub(super) fn u64s(&mut self) -> Option<Vec<u64>> {
        let n = self.u32()? as usize;
        (0..n).map(|_| self.u64()).collect()
    }
}
