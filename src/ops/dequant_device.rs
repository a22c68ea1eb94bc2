//! The NF4 frozen projection for weights resident on a candle device (CUDA under the `cuda`
//! feature): `y = x W^T` and `dx = g W`, the weight decoded a slab of rows at a time into the
//! device's own GEMM, with a backward that returns dL/dx only.
//!
//! The CPU op (`ops::dequant_linear`) decodes with a byte-pair table in Rust. Here the same
//! decode is written in candle's backend storage operations, generic over the backend: one
//! `index_select` of the packed bytes into the 256-entry pair table gives two NF4 levels per
//! byte, and one broadcast multiply applies the block scales. On CUDA those are candle's own
//! kernels and cuBLAS; on the CPU the very same code runs, which is how the tests hold it to the
//! CPU op without a GPU. No decoded slab outlives the product it feeds.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor};
use std::sync::Arc;

use crate::quant::nf4::{dynamic_map, Nf4Tensor, Scales, NESTED_BLOCK, NF4_PAIRS};

/// Block scales on the device.
#[derive(Debug)]
enum DeviceScales {
    /// One f32 absmax per block.
    Plain(Tensor),
    /// Double quantization: 8-bit codes (padded to whole groups of 256), the dynamic map, one
    /// f32 absmax per group, and the offset.
    Nested {
        codes: Tensor,
        map: Tensor,
        absmax2: Tensor,
        offset: f32,
    },
}

/// An NF4 weight `[rows, cols]` (plain or double-quantized scales) held on a device: the packed
/// codes as stored (half a byte a parameter), the scales, and the 256-entry pair table.
#[derive(Debug)]
pub struct DeviceNf4 {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    blocksize: usize,
    codes: Tensor,
    pairs: Tensor,
    scales: DeviceScales,
}

impl DeviceNf4 {
    /// Copies `q` onto `dev`. Rows must be whole blocks (true of every transformer projection:
    /// widths are multiples of 64), so that a slab of rows is a run of whole blocks.
    pub fn upload(q: &Nf4Tensor, dev: &Device) -> Result<Self> {
        if q.blocksize == 0 || !q.blocksize.is_multiple_of(2) || !q.cols.is_multiple_of(q.blocksize) {
            candle_core::bail!(
                "NF4 on a device: rows of {} values are not whole blocks of {} (block size must be even \
                 and divide the row width); keep this weight on the CPU",
                q.cols,
                q.blocksize
            );
        }
        let blocks = q.rows * q.cols / q.blocksize;
        let pairs: Vec<f32> = NF4_PAIRS.iter().flatten().copied().collect();
        let scales = match &q.scales {
            Scales::Plain(a) if a.len() == blocks => DeviceScales::Plain(Tensor::from_slice(a, blocks, dev)?),
            Scales::Nested(n) if n.codes.len() == blocks && n.absmax2.len() == blocks.div_ceil(NESTED_BLOCK) => {
                let groups = n.absmax2.len();
                let mut codes = n.codes.clone();
                // Pad the last group so the scales decode as a whole [groups, 256] product.
                codes.resize(groups * NESTED_BLOCK, 0);
                DeviceScales::Nested {
                    codes: Tensor::from_vec(codes, groups * NESTED_BLOCK, dev)?,
                    map: Tensor::from_slice(&dynamic_map(), 256, dev)?,
                    absmax2: Tensor::from_slice(&n.absmax2, groups, dev)?,
                    offset: n.offset,
                }
            }
            _ => candle_core::bail!(
                "NF4 on a device: the scales do not match {blocks} blocks of a [{}, {}] weight",
                q.rows,
                q.cols
            ),
        };
        if q.packed.len() != q.rows * q.cols / 2 {
            candle_core::bail!(
                "NF4 on a device: {} code bytes for a [{}, {}] weight (expected {})",
                q.packed.len(),
                q.rows,
                q.cols,
                q.rows * q.cols / 2
            );
        }
        Ok(Self {
            rows: q.rows,
            cols: q.cols,
            blocksize: q.blocksize,
            codes: Tensor::from_slice(&q.packed, q.packed.len(), dev)?,
            pairs: Tensor::from_vec(pairs, (256, 2), dev)?,
            scales,
        })
    }

    /// The device the weight lives on.
    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// Bytes held on the device (codes, scales, table).
    pub fn bytes(&self) -> usize {
        let n = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        n(&self.codes)
            + n(&self.pairs)
            + match &self.scales {
                DeviceScales::Plain(a) => n(a),
                DeviceScales::Nested {
                    codes, map, absmax2, ..
                } => n(codes) + n(map) + n(absmax2) + 4,
            }
    }
}

/// The storage of `t` as backend `S` and its layout, or an error naming what is elsewhere.
fn storage_of<'a, S: 'a>(
    t: &'a Tensor,
    pick: &impl Fn(&Storage) -> Option<&S>,
) -> Result<(impl std::ops::Deref<Target = Storage> + 'a, Layout)> {
    let (g, l) = t.storage_and_layout();
    if pick(&g).is_none() {
        candle_core::bail!("NF4 on a device: the weight and the activations are on different devices");
    }
    Ok((g, l.clone()))
}

/// Byte codes as u32 lookup ids. candle's `index_select` reads an id equal to its type's
/// maximum as "no row" and yields zeros, so the byte 255 (two top NF4 levels, or the dynamic
/// map's 1.0) would decode to 0 if looked up as u8.
fn widen_ids<S: BackendStorage>(codes: &S, l: &Layout) -> Result<S> {
    codes.to_dtype(l, DType::U32)
}

/// Decodes into `S` storages: the whole tensor's f32 scales once per product, then slabs.
struct Decoder<'a, S> {
    w: &'a DeviceNf4,
    codes: &'a S,
    pairs: (&'a S, &'a Layout),
    absmax: S,
}

impl<S: BackendStorage> Decoder<'_, S> {
    /// Rows `r0 .. r0 + nc` in f32, contiguous `[nc, cols]`: each code byte looked up in the
    /// pair table (two levels), each block times its scale, exactly the CPU op's arithmetic.
    fn rows(&self, r0: usize, nc: usize) -> Result<S> {
        let (k, bs) = (self.w.cols, self.w.blocksize);
        let ids = widen_ids(self.codes, &Layout::contiguous_with_offset(nc * k / 2, r0 * k / 2))?;
        let levels = self
            .pairs
            .0
            .index_select(&ids, self.pairs.1, &Layout::contiguous(nc * k / 2), 0)?;
        let blocks = nc * k / bs;
        let scale = Layout::contiguous_with_offset((blocks, 1), r0 * k / bs).broadcast_as((blocks, bs))?;
        levels.binary_impl::<Mul>(&self.absmax, &Layout::contiguous((blocks, bs)), &scale)
    }
}

/// f32 block scales of the whole tensor: as uploaded, or `map[code] * absmax2[group] + offset`
/// (the CPU op's order of operations, so the values agree to the bit).
fn absmax<S: BackendStorage>(w: &DeviceNf4, pick: &impl Fn(&Storage) -> Option<&S>) -> Result<S> {
    match &w.scales {
        DeviceScales::Plain(a) => {
            let (g, l) = storage_of(a, pick)?;
            pick(&g).expect("checked").try_clone(&l)
        }
        DeviceScales::Nested {
            codes,
            map,
            absmax2,
            offset,
        } => {
            let groups = absmax2.elem_count();
            let (cg, cl) = storage_of(codes, pick)?;
            let (mg, ml) = storage_of(map, pick)?;
            let (ag, _) = storage_of(absmax2, pick)?;
            let ids = widen_ids(pick(&cg).expect("checked"), &cl)?;
            let q = pick(&mg)
                .expect("checked")
                .index_select(&ids, &ml, &Layout::contiguous(cl.shape()), 0)?;
            let per_group = Layout::contiguous((groups, 1)).broadcast_as((groups, NESTED_BLOCK))?;
            let grid = Layout::contiguous((groups, NESTED_BLOCK));
            let s = q.binary_impl::<Mul>(pick(&ag).expect("checked"), &grid, &per_group)?;
            s.affine(&grid, 1.0, *offset as f64)
        }
    }
}

/// `x W^T` (forward) or `g W` (input gradient) against a device-resident NF4 weight.
pub struct DeviceNf4Linear {
    /// The weight.
    pub w: Arc<DeviceNf4>,
    /// Weight rows decoded per slab.
    pub slab: usize,
    /// `true`: `x [m, cols] -> [m, rows]`; `false`: `g [m, rows] -> [m, cols]`.
    pub forward: bool,
}

/// Decoded elements per slab on a device: 8M f32 (32 MiB), a few slabs per large projection,
/// each one GEMM large enough to keep the device busy.
const SLAB_ELEMS: usize = 8 << 20;

impl DeviceNf4Linear {
    fn run<S>(&self, a: &S, al: &Layout, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let w = &*self.w;
        let (n, k) = (w.rows, w.cols);
        let (m, width) = al.shape().dims2()?;
        let expect = if self.forward { k } else { n };
        if width != expect {
            candle_core::bail!("NF4 linear: input has {width} features, the weight expects {expect}");
        }
        if a.dtype() != DType::F32 {
            candle_core::bail!("NF4 linear: activations must be f32, got {:?}", a.dtype());
        }
        let Some((a0, _)) = al.contiguous_offsets() else {
            candle_core::bail!("NF4 linear: the input must be contiguous");
        };
        let (cg, _) = storage_of(&w.codes, &pick)?;
        let (pg, pl) = storage_of(&w.pairs, &pick)?;
        let dec = Decoder {
            w,
            codes: pick(&cg).expect("checked"),
            pairs: (pick(&pg).expect("checked"), &pl),
            absmax: absmax(w, &pick)?,
        };
        let dev = a.device();
        let slab = self.slab.max(1);
        if self.forward {
            // y[:, r0..r0+nc] = x [m, k] * ws^T, the slab read transposed in place.
            // SAFETY: every column range r0..r0+nc is written below before `y` is returned.
            let mut y = unsafe { dev.alloc_uninit(&Shape::from((m, n)), DType::F32)? };
            for r0 in (0..n).step_by(slab) {
                let nc = slab.min(n - r0);
                let ws = dec.rows(r0, nc)?;
                let part = a.matmul(&ws, (1, m, nc, k), al, &Layout::contiguous((nc, k)).transpose(0, 1)?)?;
                part.copy2d(&mut y, m, nc, nc, n, 0, r0)?;
            }
            return Ok((y, Shape::from((m, n))));
        }
        // dx = sum over slabs of g[:, r0..r0+nc] (copied contiguous, as cuBLAS needs) * ws.
        let mut dx: Option<S> = None;
        let out = Layout::contiguous((m, k));
        for r0 in (0..n).step_by(slab) {
            let nc = slab.min(n - r0);
            let ws = dec.rows(r0, nc)?;
            // SAFETY: filled by the copy on the next line.
            let mut gs = unsafe { dev.alloc_uninit(&Shape::from((m, nc)), DType::F32)? };
            a.copy2d(&mut gs, m, nc, n, nc, a0 + r0, 0)?;
            let part = gs.matmul(
                &ws,
                (1, m, k, nc),
                &Layout::contiguous((m, nc)),
                &Layout::contiguous((nc, k)),
            )?;
            dx = Some(match dx {
                None => part,
                Some(d) => d.binary_impl::<Add>(&part, &out, &out)?,
            });
        }
        match dx {
            Some(d) => Ok((d, Shape::from((m, k)))),
            // No rows: the gradient through an empty product is zero.
            None => Ok((dev.zeros_impl(&Shape::from((m, k)), DType::F32)?, Shape::from((m, k)))),
        }
    }
}

impl CustomOp1 for DeviceNf4Linear {
    fn name(&self) -> &'static str {
        "nf4-device-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, |st| match st {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.run(s, l, |st| match st {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !self.forward {
            candle_core::bail!("NF4 linear: the input-gradient op has no backward of its own");
        }
        let g = if g.is_contiguous() { g.clone() } else { g.contiguous()? };
        Ok(Some(g.apply_op1_no_bwd(&DeviceNf4Linear {
            w: self.w.clone(),
            slab: self.slab,
            forward: false,
        })?))
    }
}

/// Weight rows a slab holds by default: 8M decoded values (`SLAB_ELEMS`).
pub fn default_slab(w: &DeviceNf4) -> usize {
    (SLAB_ELEMS / w.cols.max(1)).max(1)
}

/// `x W^T` for f32 `x [m, cols]` on `w`'s device; backward gives dL/dx only.
pub fn nf4_device_linear(x: &Tensor, w: &Arc<DeviceNf4>) -> Result<Tensor> {
    nf4_device_linear_slab(x, w, default_slab(w))
}

/// [`nf4_device_linear`] with an explicit slab height (tests use small ones to cross slabs).
pub fn nf4_device_linear_slab(x: &Tensor, w: &Arc<DeviceNf4>, slab: usize) -> Result<Tensor> {
    if !x.device().same_device(w.device()) {
        candle_core::bail!(
            "NF4 linear: activations on {:?}, weight on {:?}; move one to the other",
            x.device().location(),
            w.device().location()
        );
    }
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    x.apply_op1(DeviceNf4Linear {
        w: w.clone(),
        slab,
        forward: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::dequant_linear::{Compact, DequantLinear};
    use candle_core::Var;

    /// The device path, run on the CPU backend, decodes exactly the CPU op's weights (x = I
    /// gives W^T bit for bit) and its forward and dx match the CPU op's f32 path, for plain and
    /// double-quantized scales, across slab boundaries and a partial last scale group.
    #[test]
    fn device_path_matches_cpu_op() -> Result<()> {
        let dev = Device::Cpu;
        // 300 x 128 = 600 blocks: two full groups of 256 and a partial one.
        let (n, k, m) = (300, 128, 19);
        let mut wv: Vec<f32> = Tensor::randn(0f32, 0.05, (n, k), &dev)?.flatten_all()?.to_vec1()?;
        // A byte holding two top levels (0xFF), which a u8 lookup id would turn into zeros.
        wv[0] = 0.5;
        wv[1] = 0.5;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &dev)?)?;
        let probe = Tensor::randn(0f32, 1., (m, n), &dev)?;
        for dq in [false, true] {
            let q = Arc::new(Nf4Tensor::quantize(&wv, n, k, 64, dq));
            assert_eq!(q.packed[0], 0xFF);
            let d = Arc::new(DeviceNf4::upload(&q, &dev)?);
            assert!(d.bytes() < n * k, "{} bytes on the device", d.bytes());
            let eye = Tensor::eye(k, DType::F32, &dev)?;
            let wt = nf4_device_linear_slab(&eye, &d, 7)?;
            let want = Tensor::from_vec(q.dequantize(), (n, k), &dev)?.t()?;
            let (a, b) = (
                wt.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
            );
            let bad: Vec<_> = a
                .iter()
                .zip(&b)
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .take(5)
                .collect();
            assert!(bad.is_empty(), "dq {dq}: decoded weights differ {bad:?}");
            let y_ref = x.as_tensor().apply_op1(DequantLinear {
                w: Compact::Nf4(q.clone()),
                kernel: false,
            })?;
            for slab in [1, 7, 64, n] {
                let y = nf4_device_linear_slab(x.as_tensor(), &d, slab)?;
                let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-4, "dq {dq}, slab {slab}: forward differs by {diff}");
                let diff = crate::testing::dx_gap(&y, &y_ref, &x, &probe)?;
                assert!(diff < 1e-4, "dq {dq}, slab {slab}: dx differs by {diff}");
            }
        }
        Ok(())
    }

    /// Shapes the device path cannot hold are refused with a message, not decoded wrongly.
    #[test]
    fn rows_that_split_blocks_are_refused() -> Result<()> {
        let wv = vec![0.01f32; 4 * 96];
        let q = Nf4Tensor::quantize(&wv, 4, 96, 64, false);
        let e = DeviceNf4::upload(&q, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("not whole blocks"), "{e}");
        let q = Nf4Tensor::quantize(&vec![0.01f32; 4 * 128], 4, 128, 64, true);
        let d = Arc::new(DeviceNf4::upload(&q, &Device::Cpu)?);
        let e = nf4_device_linear(&Tensor::zeros((2, 64), DType::F32, &Device::Cpu)?, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expects 128"), "{e}");
        Ok(())
    }
}
