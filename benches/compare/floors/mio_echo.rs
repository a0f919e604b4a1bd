//! The no-fork floor: every client served by one mio loop in one process.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::BANNER;

/// One client of the loop.
struct Conn {
    stream: TcpStream,
    /// Bytes owed to the client (the banner, then what it sent), written before reading more.
    owed: Vec<u8>,
}

/// In-process echo on one mio loop: no fork, no process per client.
pub fn mio_echo(port: u16) -> ! {
    let mut poll = Poll::new().unwrap();
    let mut listener = TcpListener::bind(([127, 0, 0, 1], port).into()).unwrap();
    const LISTENER: Token = Token(usize::MAX);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .unwrap();
    let mut conns: HashMap<usize, Conn> = HashMap::new();
    let mut next = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        poll.poll(&mut events, None).ok();
        for event in events.iter() {
            if event.token() == LISTENER {
                while let Ok((mut stream, _)) = listener.accept() {
                    let token = Token(next);
                    next += 1;
                    poll.registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .unwrap();
                    let owed = BANNER.to_vec();
                    conns.insert(token.0, Conn { stream, owed });
                }
                continue;
            }
            let id = event.token().0;
            let Some(conn) = conns.get_mut(&id) else {
                continue;
            };
            if !serve(conn, &mut buf) {
                if let Some(mut conn) = conns.remove(&id) {
                    let _ = poll.registry().deregister(&mut conn.stream);
                }
            }
        }
    }
}

/// Echoes what `conn` can take without blocking; false once it is done (EOF or an error).
fn serve(conn: &mut Conn, buf: &mut [u8]) -> bool {
    loop {
        // Flush what is owed before reading more.
        while !conn.owed.is_empty() {
            match conn.stream.write(&conn.owed) {
                Ok(n) => {
                    conn.owed.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        match conn.stream.read(buf) {
            Ok(0) => return false,
            Ok(n) => conn.owed.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}
