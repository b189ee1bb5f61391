//! Remote peers and per-socket state of the network signals.

/// A remote peer as the network signals aggregate it: address, the port that names the
/// service, and which end this host is. A client connection's own (ephemeral) port and a
/// server connection's client port are left out, so a peer is a service, not a
/// connection, and the number of peers stays bounded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Peer {
    /// The 16 address bytes in network order (IPv4 as `::ffff:a.b.c.d`), read as two
    /// little-endian words.
    pub addr: [u64; 2],
    /// The remote port of a client connection; zero for a server connection.
    pub remote_port: u16,
    /// The local (service) port of a server connection; zero for a client connection.
    pub local_port: u16,
    /// 4 or 6: the socket's family (an IPv4-mapped address on an IPv6 socket says 6).
    pub family: u8,
    /// A [`crate::Direction`].
    pub direction: u8,
    /// `PEER_*` bits.
    pub flags: u8,
    pub pad: u8,
}

/// [`Peer::flags`]: the direction was inferred from the ports (the socket was opened
/// before the probes saw it).
pub const PEER_DIRECTION_INFERRED: u8 = 1 << 0;

impl Peer {
    /// The ports, family and direction as one word (the third word of the peer's key).
    #[inline]
    pub const fn tail(&self) -> u64 {
        self.remote_port as u64
            | (self.local_port as u64) << 16
            | (self.family as u64) << 32
            | (self.direction as u64) << 40
    }

    /// A 32-bit identifier of the peer, stored in the `aux` field of the network signals'
    /// keys; the `PEERS` table maps it back. Never zero. Two peers share an identifier
    /// with probability about n^2 / 2^33 for n peers.
    #[inline]
    pub const fn id(&self) -> u32 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        hash = (hash ^ self.addr[0]).wrapping_mul(0x0000_0100_0000_01b3);
        hash ^= hash >> 29;
        hash = (hash ^ self.addr[1]).wrapping_mul(0x0000_0100_0000_01b3);
        hash ^= hash >> 29;
        hash = (hash ^ self.tail()).wrapping_mul(0x0000_0100_0000_01b3);
        hash ^= hash >> 32;
        let id = hash as u32;
        if id == 0 { 1 } else { id }
    }

    /// The address bytes in network order.
    pub fn address_bytes(&self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.addr[0].to_le_bytes());
        bytes[8..].copy_from_slice(&self.addr[1].to_le_bytes());
        bytes
    }

    /// The `addr` words of an IPv4 address as the kernel stores it (`skc_daddr`, read
    /// as a little-endian `u32`): `::ffff:a.b.c.d`.
    #[inline]
    pub const fn ipv4_mapped(daddr: u32) -> [u64; 2] {
        [0, 0xffff_0000 | (daddr as u64) << 32]
    }
}

/// What the probes know about a TCP socket (keyed by the socket's address): who opened
/// it, in which direction, its peer, a connect in progress and when its RTT was last
/// sampled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketInfo {
    /// When the SYN was sent (a connect in progress); zero otherwise.
    pub connect_start_ns: u64,
    /// When the smoothed RTT was last sampled.
    pub last_rtt_ns: u64,
    /// Stacks of the connecting thread, taken in its own context at connect time.
    pub kstack: u64,
    pub ustack: u64,
    /// The process (and thread) that connected or last waited on the socket; zero if
    /// not known yet.
    pub tgid: u32,
    pub tid: u32,
    /// [`Peer::id`] of the socket's peer.
    pub peer_id: u32,
    /// A [`crate::Direction`].
    pub direction: u8,
    pub pad: [u8; 3],
}
