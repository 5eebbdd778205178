//! A member's identity in the gossip cluster, and the codec that checks every identity it decodes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::{Buf, BufMut};
use foca::{Codec, Header, Member, PostcardCodec};
use serde::{Deserialize, Serialize};

/// Longest node name (the config allows 63 characters).
pub const MAX_NAME: usize = 63;

/// Who a member is. Of two identities at the same gossip address, the one with the higher generation (a later
/// start) wins, so a restarted host replaces its old self everywhere without flapping.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    pub name: Arc<str>,
    /// Gossip address; the inbound listener is on the same IP.
    pub addr: SocketAddr,
    pub inbound_port: u16,
    /// Milliseconds since the Unix epoch when this agent started, bumped when it rejoins after being declared
    /// down.
    pub generation: u64,
}

impl NodeId {
    /// Where peer agents send requests for this node's endpoints.
    pub fn inbound(&self) -> SocketAddr {
        SocketAddr::new(self.addr.ip(), self.inbound_port)
    }

    /// An identity to announce to a seed whose name is not known yet (only its address is used).
    pub fn seed(addr: SocketAddr) -> NodeId {
        NodeId {
            name: Arc::from(""),
            addr,
            inbound_port: 0,
            generation: 0,
        }
    }

    pub fn is_seed_placeholder(&self) -> bool {
        self.name.is_empty()
    }

    /// Why a decoded identity cannot be a member, if it cannot.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.name.is_empty() {
            // Only seeds we announce to have no name; nobody may claim to be one.
            return Err("empty node name");
        }
        check_name(&self.name)?;
        check_ip(self.addr.ip())?;
        if self.addr.port() == 0 || self.inbound_port == 0 {
            return Err("port 0");
        }
        Ok(())
    }
}

/// Node names as the config allows them: 1-63 of a-z, A-Z, 0-9, '.', '-', '_'.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err("node name length");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
    {
        return Err("node name characters");
    }
    Ok(())
}

/// An address another host could be reached at.
pub fn check_ip(ip: IpAddr) -> Result<(), &'static str> {
    if ip.is_unspecified() || ip.is_multicast() {
        return Err("unusable address");
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Err("unusable address");
    }
    Ok(())
}

/// Foca's notion of "the same member" is the gossip address: an announce to a seed whose name is not known yet
/// is accepted by whoever listens there, and a host restarted at the same address (a higher generation)
/// replaces its old self. A host that comes back under the same name at another address is a new member;
/// the old one is declared down in seconds, and the name's newest generation owns its endpoints meanwhile.
impl foca::Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        // Declared down (say, after a long stall): come back under the next generation at once.
        Some(NodeId {
            generation: self.generation.saturating_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// Foca's postcard codec, refusing identities that could not be members (bad names, unusable addresses).
pub struct MeshCodec(PostcardCodec);

impl Default for MeshCodec {
    fn default() -> Self {
        MeshCodec(PostcardCodec)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("postcard: {0}")]
    Postcard(#[from] postcard::Error),
    #[error("invalid identity: {0}")]
    Identity(&'static str),
}

impl Codec<NodeId> for MeshCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), CodecError> {
        Ok(self.0.encode_header(header, buf)?)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<NodeId>, CodecError> {
        let h: Header<NodeId> = self.0.decode_header(buf)?;
        h.src.check().map_err(CodecError::Identity)?;
        // Announces go to seeds by address only, with a nameless placeholder as the destination.
        if !h.dst.is_seed_placeholder() {
            h.dst.check().map_err(CodecError::Identity)?;
        }
        Ok(h)
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), CodecError> {
        Ok(self.0.encode_member(member, buf)?)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeId>, CodecError> {
        let m: Member<NodeId> = self.0.decode_member(buf)?;
        m.id().check().map_err(CodecError::Identity)?;
        Ok(m)
    }
}
