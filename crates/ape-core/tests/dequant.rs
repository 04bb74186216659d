//! Dequantization of every tensor type in the two test models matches gguf-py, the
//! reference implementation shipped with llama.cpp (fixture: scripts/reference/make_dequant_fixtures.py).

use ape_core::kernels::quant::{dequantize, GgmlType};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    entries: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    tensor: String,
    #[serde(rename = "type")]
    type_name: String,
    ggml_type: u32,
    raw_hex: String,
    values: Vec<f32>,
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("fixture hex is valid"))
        .collect()
}

#[test]
fn every_model_tensor_type_dequantizes_like_the_reference() {
    let text = include_str!("fixtures/dequant.json");
    let fixture: Fixture = serde_json::from_str(text).expect("fixture parses");
    let mut seen = std::collections::BTreeSet::new();
    for entry in &fixture.entries {
        let ty = GgmlType::from_id(entry.ggml_type)
            .unwrap_or_else(|| panic!("{} of {} is not loadable", entry.type_name, entry.tensor));
        let mut out = vec![0f32; entry.values.len()];
        dequantize(ty, &hex_bytes(&entry.raw_hex), &mut out);
        for (i, (got, want)) in out.iter().zip(&entry.values).enumerate() {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{} ({}) element {i}: {got} vs {want}",
                entry.tensor,
                entry.type_name
            );
        }
        seen.insert(entry.type_name.clone());
    }
    for needed in ["F32", "Q4_1", "Q8_0", "Q5_0", "Q6_K", "Q4_K"] {
        assert!(seen.contains(needed), "fixture lacks a {needed} tensor");
    }
}
