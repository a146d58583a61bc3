//! Any bytes through `kiln_boot::dhcp::decode` (every packet the DHCP
//! listener receives goes through it) and, when they decode, through
//! `request_identity`: neither may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: kiln_fuzz::let_dhcproto_panics_unwind(), |data: &[u8]| {
    if let Some(msg) = kiln_boot::dhcp::decode(data)
        && let Some((mac, _circuit, _remote)) = kiln_boot::dhcp::request_identity(&msg)
    {
        assert_eq!(&mac.0[..], &msg.chaddr()[..6]);
    }
});
