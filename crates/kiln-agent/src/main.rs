//! `kiln-agent`: the ramdisk's agent binary.

fn main() {}
