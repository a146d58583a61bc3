//! Any packet that decodes through `kiln_boot::dhcp::handle`, in full and
//! proxy mode, as sent and as if relayed (giaddr and option 82), against
//! several fixed sets of facts: it never panics, and a reply encodes,
//! decodes again and keeps what RFC 2131 / 3046 say it must keep.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: kiln_fuzz::let_dhcproto_panics_unwind(), |data: &[u8]| {
    kiln_fuzz::dhcp::check_every_way(data);
});
