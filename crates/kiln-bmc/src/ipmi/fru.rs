//! FRU inventory data (IPMI Platform Management FRU Information Storage
//! Definition v1.0), as far as identity goes: the request builders for Get
//! FRU Inventory Area Info and Read FRU Data, and the serial numbers in a
//! FRU image's product and board areas. Pure: bytes in, values out; the
//! driver (`mod.rs`) does the reading.
//!
//! IPMI has the machine's serial only here (Get System GUID gives the
//! UUID). The *product* serial is the system's (what SMBIOS type 1 and the
//! agent report); the *board* serial, the mainboard's, is the fallback. The
//! chassis serial is not used: a blade enclosure's is shared by its blades.

use super::codec::Request;

pub const NETFN_STORAGE: u8 = 0x0a;

/// The FRU device kiln reads: 0, the BMC's own (the system's) FRU.
pub const SYSTEM_FRU: u8 = 0;

/// Bytes asked per Read FRU Data: what every BMC can return in one
/// answer (ipmitool starts at 16 too); halved when a BMC says it is too
/// many.
pub const READ_CHUNK: u8 = 16;

/// The largest FRU image kiln reads areas from (the spec's offsets reach
/// 2 KiB; anything beyond is not a FRU image kiln understands).
pub const MAX_FRU_SIZE: usize = 2048;

/// Get FRU Inventory Area Info (§34.1).
pub fn get_area_info(fru: u8) -> Request {
    Request::new(NETFN_STORAGE, 0x10, vec![fru])
}

/// Its answer: the image's size in bytes, and whether the device is
/// addressed in 16-bit words (kiln reads byte-addressed devices only).
pub fn parse_area_info(data: &[u8]) -> Result<(usize, bool), String> {
    match data {
        [lo, hi, access, ..] => Ok((u16::from_le_bytes([*lo, *hi]) as usize, access & 0x01 != 0)),
        _ => Err(format!(
            "Get FRU Inventory Area Info: {} data bytes, expected 3",
            data.len()
        )),
    }
}

/// Read FRU Data (§34.2): `count` bytes from `offset`.
pub fn read_data(fru: u8, offset: u16, count: u8) -> Request {
    let [lo, hi] = offset.to_le_bytes();
    Request::new(NETFN_STORAGE, 0x11, vec![fru, lo, hi, count])
}

/// Its answer: the bytes read (the first byte is their count; a BMC may
/// return fewer than asked).
pub fn parse_read(data: &[u8]) -> Result<&[u8], String> {
    let (&n, rest) = data.split_first().ok_or("Read FRU Data: empty answer")?;
    rest.get(..n as usize)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| format!("Read FRU Data: the answer says {n} bytes but holds {}", rest.len()))
}

/// Where the areas are, from the 8-byte common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub board: Option<usize>,
    pub product: Option<usize>,
}

/// The bytes sum to 0 (mod 256): every FRU header and area ends so.
fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

pub fn parse_header(h: &[u8]) -> Result<Header, String> {
    let h: &[u8; 8] = h
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or("the FRU common header is shorter than 8 bytes")?;
    if h[0] & 0x0f != 0x01 {
        return Err(format!("FRU format version {:#04x}, expected 1", h[0]));
    }
    if !checksum_ok(h) {
        return Err("the FRU common header's checksum is wrong".into());
    }
    // Offsets in multiples of 8 bytes; 0 means "no such area".
    let at = |i: usize| (h[i] != 0).then_some(h[i] as usize * 8);
    Ok(Header {
        board: at(3),
        product: at(4),
    })
}

/// An area's length from its first two bytes (version, length in 8s).
pub fn area_len(first: &[u8]) -> Result<usize, String> {
    match first {
        [version, len, ..] if version & 0x0f == 0x01 && *len > 0 => Ok(*len as usize * 8),
        [version, len, ..] => Err(format!(
            "a FRU area starts {version:#04x} {len:#04x}, not version 1 and a length"
        )),
        _ => Err("a FRU area is shorter than 2 bytes".into()),
    }
}

/// Reads a serial number out of one kind of area.
pub type SerialOf = fn(&[u8]) -> Result<Option<String>, String>;

/// The serial number in a product info area: its fifth field, after
/// manufacturer, product name, part/model number and version.
pub fn product_serial(area: &[u8]) -> Result<Option<String>, String> {
    area_field(area, 3, 4)
}

/// The serial number in a board info area: its third field, after
/// manufacturer and product name (the area header has the 3-byte
/// manufacturing date as well).
pub fn board_serial(area: &[u8]) -> Result<Option<String>, String> {
    area_field(area, 6, 2)
}

/// Field `index` of an area whose fields start at `start`; byte 2 is the
/// language (English, 0 or 25, unless it says otherwise). `None` for a
/// missing or blank field.
fn area_field(area: &[u8], start: usize, index: usize) -> Result<Option<String>, String> {
    let len = area_len(area)?;
    let area = area.get(..len).ok_or("a FRU area is shorter than its length")?;
    if !checksum_ok(area) {
        return Err("a FRU area's checksum is wrong".into());
    }
    let english = matches!(area[2], 0 | 25);
    let mut rest = area.get(start..).ok_or("a FRU area is shorter than its header")?;
    let mut i = 0;
    loop {
        let (&tl, tail) = rest.split_first().ok_or("a FRU area ends without its end marker")?;
        if tl == 0xc1 {
            return Ok(None);
        }
        let n = (tl & 0x3f) as usize;
        let bytes = tail.get(..n).ok_or("a FRU field runs past its area")?;
        if i == index {
            let text = decode(tl >> 6, bytes, english);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
            return Ok((!text.is_empty()).then(|| text.to_string()));
        }
        rest = &tail[n..];
        i += 1;
    }
}

/// A type/length field's bytes as text (§13): 0 binary (shown as hex),
/// 1 BCD plus, 2 6-bit packed ASCII, 3 8-bit text (Latin-1 in English,
/// else UTF-16LE). Control characters become `?`: the BMC chooses them.
fn decode(kind: u8, b: &[u8], english: bool) -> String {
    let text: String = match kind {
        0 => b.iter().map(|x| format!("{x:02X}")).collect(),
        1 => b
            .iter()
            .flat_map(|x| [x >> 4, x & 0x0f])
            .map(|d| match d {
                0..=9 => (b'0' + d) as char,
                0xa => ' ',
                0xb => '-',
                0xc => '.',
                _ => '?',
            })
            .collect(),
        2 => b
            .chunks(3)
            .flat_map(|c| {
                let v = c.iter().rev().fold(0u32, |a, x| (a << 8) | *x as u32);
                // Each 3 bytes hold four 6-bit characters, least significant first.
                (0..c.len() * 8 / 6).map(move |i| ((v >> (6 * i)) & 0x3f) as u8 + 0x20)
            })
            .map(char::from)
            .collect(),
        _ if english => b.iter().map(|x| char::from(*x)).collect(),
        _ => char::decode_utf16(b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])))
            .map(|c| c.unwrap_or('?'))
            .collect(),
    };
    text.chars()
        .map(|c| if c.is_control() && c != '\0' { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An area: version 1, length, the header bytes, the fields (8-bit
    /// text), the end marker, padding and the checksum.
    fn area(header: &[u8], fields: &[&str]) -> Vec<u8> {
        let mut a = vec![0x01, 0x00];
        a.extend_from_slice(header);
        for f in fields {
            a.push(0xc0 | f.len() as u8);
            a.extend_from_slice(f.as_bytes());
        }
        a.push(0xc1);
        while (a.len() + 1) % 8 != 0 {
            a.push(0);
        }
        a[1] = ((a.len() + 1) / 8) as u8;
        let sum = a.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        a.push(0u8.wrapping_sub(sum));
        a
    }

    #[test]
    fn header_and_areas() {
        let mut h = [0x01, 0, 0, 1, 3, 0, 0, 0];
        h[7] = 0u8.wrapping_sub(h.iter().fold(0u8, |s, b| s.wrapping_add(*b)));
        assert_eq!(
            parse_header(&h),
            Ok(Header {
                board: Some(8),
                product: Some(24)
            })
        );
        let mut bad = h;
        bad[7] ^= 1;
        assert!(parse_header(&bad).unwrap_err().contains("checksum"));
        assert!(
            parse_header(&[0x02, 0, 0, 0, 0, 0, 0, 0xfe])
                .unwrap_err()
                .contains("version")
        );

        let board = area(&[0, 0x10, 0x20, 0x30], &["Acme", "X11-board", "BRD-0042", "PN-1"]);
        assert_eq!(area_len(&board), Ok(board.len()));
        assert_eq!(board_serial(&board), Ok(Some("BRD-0042".into())));
        let product = area(&[0], &["Acme", "R740", "PN-9", "v1", " SYS-7Q4 ", "asset-1"]);
        assert_eq!(product_serial(&product), Ok(Some("SYS-7Q4".into())), "trimmed");
        let blank = area(&[0], &["Acme", "R740", "PN-9", "v1", "   "]);
        assert_eq!(product_serial(&blank), Ok(None));
        let short = area(&[0], &["Acme", "R740"]);
        assert_eq!(product_serial(&short), Ok(None), "no serial field");
        let mut corrupt = product.clone();
        corrupt[5] ^= 0x20;
        assert!(product_serial(&corrupt).unwrap_err().contains("checksum"));
    }

    #[test]
    fn field_encodings() {
        // 6-bit packed ASCII: "IPMI" is 0x29 0x30 0x2d 0x29.
        assert_eq!(decode(2, &[0x29, 0xdc, 0xa6], true), "IPMI");
        // BCD plus: "12-3.4 ".
        assert_eq!(decode(1, &[0x12, 0xb3, 0xc4, 0xaa], true), "12-3.4  ");
        assert_eq!(decode(0, &[0xde, 0xad], true), "DEAD");
        assert_eq!(decode(3, b"SN\x1b[31m", true), "SN?[31m", "no terminal escapes");
        assert_eq!(decode(3, &[0x41, 0, 0x42, 0], false), "AB", "UTF-16LE outside English");
    }

    #[test]
    fn requests_and_answers() {
        let r = read_data(SYSTEM_FRU, 0x0108, 16);
        assert_eq!((r.netfn, r.cmd, r.data), (0x0a, 0x11, vec![0, 0x08, 0x01, 16]));
        assert_eq!(get_area_info(0).data, vec![0]);
        assert_eq!(parse_area_info(&[0x00, 0x01, 0x00]), Ok((256, false)));
        assert_eq!(parse_area_info(&[0x00, 0x01, 0x01]), Ok((256, true)));
        assert_eq!(parse_read(&[2, 0xaa, 0xbb, 0xcc]), Ok(&[0xaa, 0xbb][..]));
        assert!(parse_read(&[3, 0xaa]).is_err());
        assert!(parse_read(&[0]).is_err(), "zero bytes would loop forever");
    }
}
