//! NF4 (4-bit NormalFloat) quantization, bit for bit as bitsandbytes does it (docs/formats.md), with
//! double quantization of the block scales. Proven against vectors bitsandbytes produced itself
//! (`scripts/nf4_fixture.py` -> `tests/fixtures/nf4_bnb.json`).

/// The 16 NF4 levels by code (`get_4bit_type("nf4")`).
// The literals are bitsandbytes' table as it prints it (float64 repr of f32 values), kept
// verbatim so they can be checked against the source; each parses to the exact f32.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The two values a packed byte stands for (high nibble first), before scaling.
pub(crate) const NF4_PAIRS: [[f32; 2]; 256] = {
    let mut t = [[0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [NF4_CODE[b >> 4], NF4_CODE[b & 15]];
        b += 1;
    }
    t
};

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), as f32 bits,
/// taken from bitsandbytes' own output: the double-quantization code.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed 8-bit dynamic map.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// Index of the nearest entry of a sorted `code`, ties to the lower index.
fn nearest(code: &[f32], x: f32) -> u8 {
    // The first midpoint that `x` does not exceed closes its bucket (torch.bucketize, right=False).
    let mut i = 0;
    while i + 1 < code.len() && x > (code[i] + code[i + 1]) / 2.0 {
        i += 1;
    }
    i as u8
}

/// Per-block absolute maxima of `x` (the last block may be short).
fn block_absmax(x: &[f32], blocksize: usize) -> Vec<f32> {
    x.chunks(blocksize)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect()
}

/// Quantizes `x` (row-major, already rounded to the checkpoint's 16-bit type) to NF4: packed codes
/// (two per byte, first element in the high nibble; an odd count is padded with code 0) and one
/// fp32 absmax per block.
pub fn quantize_nf4(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let absmax = block_absmax(x, blocksize);
    let mut codes = Vec::with_capacity(x.len() + 1);
    for (b, block) in x.chunks(blocksize).enumerate() {
        let inv = 1.0 / absmax[b].max(1e-38);
        codes.extend(block.iter().map(|&v| nearest(&NF4_CODE, (v * inv).clamp(-1.0, 1.0))));
    }
    if codes.len() % 2 == 1 {
        codes.push(0);
    }
    (codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect(), absmax)
}

/// NF4 codes back to values: `code[nibble] * absmax[block]` in fp32 (bitsandbytes then casts to
/// the compute dtype).
pub fn dequantize_nf4(packed: &[u8], absmax: &[f32], blocksize: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let byte = packed[i / 2];
            let c = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
            NF4_CODE[c as usize] * absmax[i / blocksize]
        })
        .collect()
}

/// Double-quantized block scales: 8-bit codes of `absmax - offset` in blocks of 256 with their
/// own fp32 absmax, and the offset (the mean of the scales).
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    /// One byte per first-level block.
    pub codes: Vec<u8>,
    /// One fp32 absmax per 256 first-level blocks.
    pub absmax2: Vec<f32>,
    /// Mean of the first-level scales.
    pub offset: f32,
}

/// Nested block size of double quantization.
pub const NESTED_BLOCK: usize = 256;

/// Double quantization of NF4 block scales (bitsandbytes' `compress_statistics=True`).
pub fn quantize_absmax(absmax: &[f32]) -> NestedAbsmax {
    // The mean summed in f64 and rounded once: torch's f32 mean gives the same bits on the
    // fixture's sizes (up to 325 scales); for very long tensors the two may differ in the last bit.
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let map = dynamic_map();
    let absmax2 = block_absmax(&centred, NESTED_BLOCK);
    let mut codes = Vec::with_capacity(centred.len());
    for (b, block) in centred.chunks(NESTED_BLOCK).enumerate() {
        let inv = 1.0 / absmax2[b].max(1e-38);
        codes.extend(block.iter().map(|&v| nearest(&map, (v * inv).clamp(-1.0, 1.0))));
    }
    NestedAbsmax { codes, absmax2, offset }
}

/// The first-level scales a [`NestedAbsmax`] stands for: `code8[q] * absmax2[i / 256] + offset`.
pub fn dequantize_absmax(n: &NestedAbsmax) -> Vec<f32> {
    let map = dynamic_map();
    n.codes
        .iter()
        .enumerate()
        .map(|(i, &q)| map[q as usize] * n.absmax2[i / NESTED_BLOCK] + n.offset)
        .collect()
}

/// Block scales of an [`Nf4Tensor`].
#[derive(Clone, Debug)]
pub enum Scales {
    /// One fp32 absmax per block.
    Plain(Vec<f32>),
    /// Double-quantized.
    Nested(NestedAbsmax),
}

/// A weight `[rows, cols]` in NF4, as bitsandbytes stores it.
#[derive(Clone, Debug)]
pub struct Nf4Tensor {
    /// Codes, two per byte (high nibble first), over the row-major flattened weight.
    pub packed: Vec<u8>,
    /// Block scales.
    pub scales: Scales,
    /// Elements per block.
    pub blocksize: usize,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
}

impl Nf4Tensor {
    /// Quantizes a row-major `[rows, cols]` weight (rounded to bf16 first, as a bf16 checkpoint
    /// holds it, so the codes are the ones bitsandbytes would produce from that checkpoint).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, blocksize: usize, double_quant: bool) -> Self {
        let rounded: Vec<f32> = w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let (packed, absmax) = quantize_nf4(&rounded, blocksize);
        let scales = if double_quant {
            Scales::Nested(quantize_absmax(&absmax))
        } else {
            Scales::Plain(absmax)
        };
        Self {
            packed,
            scales,
            blocksize,
            rows,
            cols,
        }
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.scales {
                Scales::Plain(a) => 4 * a.len(),
                Scales::Nested(n) => n.codes.len() + 4 * n.absmax2.len() + 4,
            }
    }

    fn scale(&self, block: usize) -> f32 {
        match &self.scales {
            Scales::Plain(a) => a[block],
            Scales::Nested(n) => {
                f32::from_bits(DYNAMIC_MAP_BITS[n.codes[block] as usize]) * n.absmax2[block / NESTED_BLOCK] + n.offset
            }
        }
    }

    /// Dequantizes rows `r0..r0 + out.len() / cols` into `out` (f32, row-major).
    pub fn dequant_rows(&self, r0: usize, out: &mut [f32]) {
        self.decode_rows(r0, out, |s| NF4_CODE.map(|c| c * s));
    }

    /// [`Self::dequant_rows`] rounded to bf16 (nearest even) as it decodes: the values
    /// `bf16::from_f32(code * scale)`, with one rounding per block level instead of one per value.
    pub fn dequant_rows_bf16(&self, r0: usize, out: &mut [half::bf16]) {
        self.decode_rows(r0, out, |s| NF4_CODE.map(|c| half::bf16::from_f32(c * s)));
    }

    /// Decodes rows from `r0` into `out` a block at a time: `levels(scale)` gives the block's 16
    /// values, then each code byte is two table reads (high nibble first).
    fn decode_rows<T: Copy>(&self, r0: usize, out: &mut [T], levels: impl Fn(f32) -> [T; 16]) {
        let start = r0 * self.cols;
        let n = out.len();
        let mut i = 0;
        while i < n {
            let block = (start + i) / self.blocksize;
            let t = levels(self.scale(block));
            let end = ((block + 1) * self.blocksize - start).min(n);
            let mut j = i;
            if (start + j) % 2 == 1 {
                out[j] = t[(self.packed[(start + j) / 2] & 15) as usize];
                j += 1;
            }
            let pairs = (end - j) / 2;
            let bytes = &self.packed[(start + j) / 2..(start + j) / 2 + pairs];
            for (o, &byte) in out[j..j + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
                o[0] = t[(byte >> 4) as usize];
                o[1] = t[(byte & 15) as usize];
            }
            j += 2 * pairs;
            if j < end {
                out[j] = t[(self.packed[(start + j) / 2] >> 4) as usize];
            }
            i = end;
        }
    }

    /// The whole weight dequantized (for export and tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequant_rows(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row-wise dequantization agrees with the reference at every offset, including rows that
    /// start mid-block and mid-byte (odd widths).
    #[test]
    fn dequant_rows_matches_reference_at_any_offset() {
        for (rows, cols) in [(5, 64), (7, 37), (3, 130)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
                .collect();
            let q = Nf4Tensor::quantize(&w, rows, cols, 64, false);
            let Scales::Plain(absmax) = &q.scales else {
                unreachable!()
            };
            let reference = dequantize_nf4(&q.packed, absmax, 64, rows * cols);
            for r in 0..rows {
                for take in 1..=rows - r {
                    let mut out = vec![0f32; take * cols];
                    q.dequant_rows(r, &mut out);
                    assert_eq!(
                        out,
                        reference[r * cols..(r + take) * cols],
                        "{rows}x{cols} rows {r}+{take}"
                    );
                    let mut b = vec![half::bf16::ZERO; take * cols];
                    q.dequant_rows_bf16(r, &mut b);
                    let rounded: Vec<half::bf16> = out.iter().map(|&v| half::bf16::from_f32(v)).collect();
                    assert_eq!(b, rounded, "bf16 {rows}x{cols} rows {r}+{take}");
                }
            }
        }
    }
}
