//! lema's dequantizer and type table against gguf-py, an implementation we did not
//! write: tests/fixtures/gguf_dequant_reference.json holds random blocks of every
//! supported type and gguf-py's f32 values for them (regenerate with
//! tools/fixtures/gen_gguf_dequant_reference.py).

use lema::import::dequant;
use lema::import::gguf::GgmlType;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture() -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf_dequant_reference.json");
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(format!("bad hex at {i}"))
        })
        .collect()
}

#[test]
fn type_ids_and_block_sizes_match_gguf_py() -> TestResult {
    let f = fixture()?;
    let types = f["types"].as_array().ok_or("no types")?;
    assert!(types.len() > 30);
    for t in types {
        let name = t["name"].as_str().ok_or("name")?;
        let id = t["id"].as_u64().ok_or("id")? as u32;
        let ty = GgmlType::from_id(id).ok_or(format!("{name} (id {id}) unknown to lema"))?;
        assert_eq!(ty.name(), name, "id {id}");
        assert_eq!(
            ty.block_size(),
            t["block_size"].as_u64().ok_or("bs")?,
            "{name}"
        );
        if name == "Q8_1" {
            // gguf-py lists 40 bytes (an old f32 layout); ggml's block_q8_1 is two
            // halves + 32 int8 = 36 bytes (static_assert in ggml-common.h).
            assert_eq!(ty.block_bytes(), 36);
            continue;
        }
        assert_eq!(
            ty.block_bytes(),
            t["type_size"].as_u64().ok_or("ts")?,
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn dequantization_matches_gguf_py_bit_for_bit() -> TestResult {
    let f = fixture()?;
    let cases = f["cases"].as_array().ok_or("no cases")?;
    let mut seen = Vec::new();
    for c in cases {
        let name = c["type"].as_str().ok_or("type")?;
        let ty = (0..64)
            .filter_map(GgmlType::from_id)
            .find(|t| t.name() == name)
            .ok_or(name.to_string())?;
        let bytes = hex(c["bytes_hex"].as_str().ok_or("hex")?)?;
        let want: Vec<u32> = c["values_bits"]
            .as_array()
            .ok_or("values")?
            .iter()
            .map(|v| v.as_u64().map(|x| x as u32).ok_or("bits"))
            .collect::<Result<_, _>>()?;
        let mut got = vec![f32::NAN; want.len()];
        dequant::dequantize(ty, &bytes, &mut got)?;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                *w,
                "{name}[{i}]: lema {g}, gguf-py {}",
                f32::from_bits(*w)
            );
        }
        seen.push(ty);
    }
    for ty in dequant::SUPPORTED {
        assert!(seen.contains(ty), "no reference case for {ty}");
    }
    Ok(())
}
