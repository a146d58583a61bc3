//! Shared pieces of kiln's fuzz targets (`fuzz_targets/*.rs`): the panic
//! policy and the DHCP fixtures.

pub mod dhcp;

/// libFuzzer's panic hook aborts on every panic, before it can unwind. But
/// `kiln_boot::dhcp::decode` deliberately catches panics raised inside
/// dhcproto (its decoder `debug_assert!`s lengths taken from the packet):
/// that is its contract, not a crash. Panics located in dhcproto's source
/// are let unwind; if one is not caught it still reaches libfuzzer-sys's
/// `catch_unwind`, which aborts. Every other panic aborts at once, as
/// libFuzzer expects.
pub fn let_dhcproto_panics_unwind() {
    let abort = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_dhcproto = info.location().is_some_and(|l| l.file().contains("dhcproto-"));
        if !in_dhcproto {
            abort(info);
        }
    }));
}
