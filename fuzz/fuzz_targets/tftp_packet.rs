//! Any datagram through kiln's TFTP parser: it never panics; whatever parses
//! encodes back to the same packet; a read request's options negotiate to
//! values inside their RFC ranges and drive the sender's state machine
//! without panicking, whatever ACK numbers follow.

#![no_main]

use kiln_boot::tftp::{
    Limits, MAX_BLKSIZE, MIN_BLKSIZE, Packet, ReadTransfer, Step, negotiate, to_netascii,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Packet::parse(data) else { return };
    let bytes = packet.to_vec();
    assert_eq!(Packet::parse(&bytes).as_ref(), Ok(&packet), "encode/parse round trip");
    if let Packet::Rrq(req) | Packet::Wrq(req) = &packet {
        let len = data.len() as u64 * 997;
        let limits = Limits::default();
        let n = negotiate(&req.options, len, &limits);
        assert!((MIN_BLKSIZE..=MAX_BLKSIZE).contains(&n.blksize) || n.blksize == 512);
        assert!(n.windowsize >= 1 && n.windowsize <= limits.max_windowsize);
        assert!(n.timeout.is_none_or(|t| t >= 1 && t <= limits.max_timeout));
        if !n.oack.is_empty() {
            assert!(matches!(Packet::parse(&n.oack_packet()), Ok(Packet::Oack(o)) if o.len() == n.oack.len()));
        }
        let mut t = ReadTransfer::new(len, n.blksize, n.windowsize, !n.oack.is_empty(), 3);
        let mut step = t.start();
        // The datagram's bytes, read as ACK numbers and timeouts.
        for pair in data.chunks(2) {
            step = match pair {
                [a, b] => t.on_ack(u16::from_be_bytes([*a, *b])),
                _ => t.on_timeout(),
            };
            if let Step::Send { first, count } = step {
                assert!(first >= 1 && count >= 1 && first + count - 1 <= t.blocks());
                assert!(count <= u64::from(n.windowsize));
            }
        }
        let _ = step;
        let _ = to_netascii(req.filename.as_bytes());
    }
});
