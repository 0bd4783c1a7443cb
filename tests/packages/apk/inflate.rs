//! Inflate (RFC 1951, raw deflate): apk's "ADBd" files are raw deflate after the 4-byte
//! magic.

use super::*;

pub(super) struct Bits<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
    pub(super) buf: u32,
    pub(super) have: u32,
}

impl Bits<'_> {
    pub(super) fn bits(&mut self, n: u32) -> Result<u32, String> {
        while self.have < n {
            let b = *self.data.get(self.pos).ok_or("deflate: input ends early")?;
            self.pos += 1;
            self.buf |= u32::from(b) << self.have;
            self.have += 8;
        }
        let v = self.buf & ((1u32 << n) - 1);
        self.buf >>= n;
        self.have -= n;
        Ok(v)
    }
}

/// A canonical Huffman code: how many codes of each length, and the symbols in code order.
pub(super) struct Huffman {
    pub(super) count: [u16; 16],
    pub(super) symbol: Vec<u16>,
}

impl Huffman {
    pub(super) fn new(lengths: &[u8]) -> Result<Self, String> {
        let mut count = [0u16; 16];
        for &l in lengths {
            count[usize::from(l)] += 1;
        }
        let mut left: i32 = 1;
        for &c in &count[1..] {
            left = (left << 1) - i32::from(c);
            if left < 0 {
                return Err(s("deflate: over-subscribed code"));
            }
        }
        let mut offs = [0u16; 16];
        for len in 1..15 {
            offs[len + 1] = offs[len] + count[len];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (sym, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbol[usize::from(offs[usize::from(l)])] = sym as u16;
                offs[usize::from(l)] += 1;
            }
        }
        count[0] = 0;
        Ok(Self { count, symbol })
    }

    pub(super) fn decode(&self, bits: &mut Bits<'_>) -> Result<u16, String> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.bits(1)? as i32;
            let count = i32::from(self.count[len]);
            if code - count < first {
                return Ok(self.symbol[(index + code - first) as usize]);
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err(s("deflate: bad code"))
    }
}

pub(super) const LBASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
pub(super) const LEXT: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
pub(super) const DBASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
pub(super) const DEXT: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

pub(super) fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut bits = Bits {
        data,
        pos: 0,
        buf: 0,
        have: 0,
    };
    let mut out: Vec<u8> = Vec::new();
    loop {
        let last = bits.bits(1)?;
        match bits.bits(2)? {
            0 => {
                bits.buf = 0;
                bits.have = 0;
                let p = bits.pos;
                let hdr = data.get(p..p + 4).ok_or("deflate: stored block cut")?;
                let len = usize::from(u16::from_le_bytes([hdr[0], hdr[1]]));
                let nlen = u16::from_le_bytes([hdr[2], hdr[3]]);
                if nlen != !(len as u16) {
                    return Err(s("deflate: stored block length check"));
                }
                let body = data
                    .get(p + 4..p + 4 + len)
                    .ok_or("deflate: stored block cut")?;
                out.extend_from_slice(body);
                bits.pos = p + 4 + len;
            }
            kind @ (1 | 2) => {
                let (lit, dist) = if kind == 1 {
                    let mut l = [8u8; 288];
                    l[144..256].fill(9);
                    l[256..280].fill(7);
                    (Huffman::new(&l)?, Huffman::new(&[5u8; 30])?)
                } else {
                    let nlen = bits.bits(5)? as usize + 257;
                    let ndist = bits.bits(5)? as usize + 1;
                    let ncode = bits.bits(4)? as usize + 4;
                    const ORDER: [usize; 19] = [
                        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
                    ];
                    let mut cl = [0u8; 19];
                    for &o in &ORDER[..ncode] {
                        cl[o] = bits.bits(3)? as u8;
                    }
                    let clh = Huffman::new(&cl)?;
                    let mut lengths = Vec::with_capacity(nlen + ndist);
                    while lengths.len() < nlen + ndist {
                        let sym = clh.decode(&mut bits)?;
                        let (value, times) = match sym {
                            0..=15 => (sym as u8, 1),
                            16 => (
                                *lengths.last().ok_or("deflate: repeat of nothing")?,
                                3 + bits.bits(2)?,
                            ),
                            17 => (0, 3 + bits.bits(3)?),
                            _ => (0, 11 + bits.bits(7)?),
                        };
                        for _ in 0..times {
                            lengths.push(value);
                        }
                    }
                    if lengths.len() != nlen + ndist || lengths[256] == 0 {
                        return Err(s("deflate: bad code lengths"));
                    }
                    (
                        Huffman::new(&lengths[..nlen])?,
                        Huffman::new(&lengths[nlen..])?,
                    )
                };
                loop {
                    let sym = usize::from(lit.decode(&mut bits)?);
                    if sym < 256 {
                        out.push(sym as u8);
                    } else if sym == 256 {
                        break;
                    } else {
                        let i = sym - 257;
                        if i >= 29 {
                            return Err(s("deflate: bad length symbol"));
                        }
                        let len = usize::from(LBASE[i]) + bits.bits(u32::from(LEXT[i]))? as usize;
                        let d = usize::from(dist.decode(&mut bits)?);
                        if d >= 30 {
                            return Err(s("deflate: bad distance symbol"));
                        }
                        let back = usize::from(DBASE[d]) + bits.bits(u32::from(DEXT[d]))? as usize;
                        if back > out.len() {
                            return Err(s("deflate: distance beyond the start"));
                        }
                        let from = out.len() - back;
                        for k in 0..len {
                            out.push(out[from + k]);
                        }
                    }
                }
            }
            _ => return Err(s("deflate: block type 3")),
        }
        if last == 1 {
            break;
        }
    }
    if bits.pos != data.len() {
        return Err(format!(
            "deflate: {} bytes after the end",
            data.len() - bits.pos
        ));
    }
    Ok(out)
}
