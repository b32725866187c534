//! sock_diag (NETLINK_SOCK_DIAG): the IPv4 UDP sockets of the calling thread's network namespace,
//! and destroying one (SOCK_DESTROY, as `ss -K` does), which makes its owner's next call fail with
//! ECONNABORTED. Run it inside a namespace with [`crate::NetNs::run`].

use std::io;
use std::net::{IpAddr, SocketAddrV4};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    AF_INET, IPPROTO_UDP, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// One UDP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSocket {
    /// Its socket cookie (what `bpf_get_socket_cookie` returns for it).
    pub cookie: u64,
    /// Local address.
    pub src: SocketAddrV4,
    /// Connected peer (0.0.0.0:0 when not connected).
    pub dst: SocketAddrV4,
    id: SocketId,
}

fn v4(ip: IpAddr, port: u16) -> SocketAddrV4 {
    match ip {
        IpAddr::V4(a) => SocketAddrV4::new(a, port),
        IpAddr::V6(_) => SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port),
    }
}

fn connect() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn send<T: netlink_packet_core::NetlinkSerializable>(
    socket: &Socket,
    flags: u16,
    payload: T,
) -> io::Result<()>
where
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, payload.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// Reads replies until the kernel says it is done; calls `each` for every socket reported.
/// An error reply becomes an `io::Error` with its errno.
fn receive(socket: &Socket, mut each: impl FnMut(UdpSocket)) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = r.header.socket_id;
                    each(UdpSocket {
                        cookie: u64::from_ne_bytes(id.cookie),
                        src: v4(id.source_address, id.source_port),
                        dst: v4(id.destination_address, id.destination_port),
                        id,
                    });
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// Every IPv4 UDP socket of the calling thread's network namespace.
pub fn udp4_sockets() -> io::Result<Vec<UdpSocket>> {
    let socket = connect()?;
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_DUMP,
        SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId::new_v4(),
        }),
    )?;
    let mut out = Vec::new();
    receive(&socket, |s| out.push(s))?;
    Ok(out)
}

/// Destroys a socket returned by [`udp4_sockets`] (in the same namespace). A socket that is
/// already gone is not an error.
pub fn destroy(sock: &UdpSocket) -> io::Result<()> {
    let socket = connect()?;
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_ACK,
        SockDiagDestroy::new(SockDiagMessage::InetRequest(InetRequest {
            family: AF_INET,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: sock.id.clone(),
        })),
    )?;
    match receive(&socket, |_| {}) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connected_socket_is_listed_and_destroyed() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: SOCK_DESTROY needs root");
            return;
        }
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect("127.0.0.1:9").unwrap();
        let local = match s.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let found = udp4_sockets()
            .unwrap()
            .into_iter()
            .find(|u| u.src == local)
            .expect("our socket is listed");
        assert_eq!(found.dst, "127.0.0.1:9".parse().unwrap());
        destroy(&found).unwrap();
        // The owner learns at once: its next receive fails with ECONNABORTED, and the socket is
        // no longer connected (a send has no destination).
        s.set_nonblocking(true).unwrap();
        let err = s.recv(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED), "{err}");
        let err = s.send(b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EDESTADDRREQ), "{err}");
        assert!(!udp4_sockets().unwrap().iter().any(|u| u.src == local));
    }
}
