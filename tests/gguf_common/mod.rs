//! Helpers of the GGUF tests.

use std::path::Path;

/// GPT-2's byte-to-character table: each byte as the character byte-level BPE writes for it.
fn byte_characters() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(&chars) {
        table[*b as usize] = char::from_u32(*c).unwrap();
    }
    table
}

/// Writes a byte-level BPE tokenizer with one token per byte (ids 0..256, no merges): what
/// the fixtures' 256-token vocabularies can carry into a GGUF.
pub fn write_byte_tokenizer(dir: &Path) {
    // The fixtures' configs name special tokens of the real models' vocabularies (OLMoE's
    // end-of-text is 50279); here every id must be one of the 256 bytes.
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if config
            .get(key)
            .and_then(|v| v.as_u64())
            .is_some_and(|id| id >= 256)
        {
            config[key] = serde_json::json!(0);
        }
    }
    std::fs::write(&config_path, config.to_string()).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = byte_characters()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), serde_json::json!(i)))
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}
