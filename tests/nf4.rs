//! NF4 and double quantization bit for bit against vectors bitsandbytes produced itself
//! (`scripts/nf4_fixture.py`, bitsandbytes 0.50 on CPU): the same packed codes, the same fp32
//! absmax (or nested 8-bit codes, nested absmax and offset), the same dequantized values.

use strata::quant::nf4::{dequantize_absmax, dequantize_nf4, dynamic_map, quantize_absmax, quantize_nf4};

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| f32::from_le_bytes(hex_bytes(h.as_str().unwrap()).try_into().unwrap()))
        .collect()
}

#[test]
fn nf4_and_double_quantization_match_bitsandbytes_bit_for_bit() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4_bnb.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    let (mut plain, mut nested) = (0, 0);
    for (k, c) in cases.iter().enumerate() {
        let bs = c["blocksize"].as_u64().unwrap() as usize;
        let x: Vec<f32> = hex_bytes(c["input_bf16_hex"].as_str().unwrap())
            .chunks(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let (packed, absmax) = quantize_nf4(&x, bs);
        assert_eq!(
            packed,
            hex_bytes(c["packed_hex"].as_str().unwrap()),
            "case {k}: packed codes"
        );
        let used_absmax = if c["double_quant"].as_bool().unwrap() {
            nested += 1;
            let n = quantize_absmax(&absmax);
            let want_offset = f32s(&serde_json::json!([c["offset_hex"]]))[0];
            assert_eq!(n.offset.to_bits(), want_offset.to_bits(), "case {k}: offset");
            assert_eq!(
                n.absmax2.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                f32s(&c["absmax2_hex"]).iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                "case {k}: nested absmax"
            );
            assert_eq!(
                n.codes,
                hex_bytes(c["qabsmax_hex"].as_str().unwrap()),
                "case {k}: nested codes"
            );
            assert_eq!(
                dynamic_map().map(f32::to_bits).to_vec(),
                f32s(&c["code8_hex"]).iter().map(|a| a.to_bits()).collect::<Vec<_>>()
            );
            dequantize_absmax(&n)
        } else {
            plain += 1;
            let want: Vec<u32> = f32s(&c["absmax_hex"]).iter().map(|a| a.to_bits()).collect();
            assert_eq!(
                absmax.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                want,
                "case {k}: absmax"
            );
            absmax
        };
        if let Some(d) = c.get("dequant_f32_hex") {
            // bitsandbytes computes in fp32 and returns the input's dtype (bf16 here).
            let got: Vec<f32> = dequantize_nf4(&packed, &used_absmax, bs, x.len())
                .into_iter()
                .map(|v| half::bf16::from_f32(v).to_f32())
                .collect();
            let want = f32s(d);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "case {k}: dequantized value {i}: {g} vs {w}");
            }
        }
    }
    assert!(plain >= 3 && nested >= 4);
}
