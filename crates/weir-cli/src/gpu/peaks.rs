//! The FP32 peak of known GPUs, for `weir bench gpu`'s "% of peak" column and `weir gpu info`.
//!
//! Figures are the vendors' datasheet numbers for plain (non-tensor, non-sparse) FP32 at the
//! boost clock: shader cores × 2 (FMA) × boost clock, ×2 again where the vendor counts
//! dual-issue or packed FP32 (RDNA 3, CDNA 2/3). Sources:
//! - NVIDIA H100 datasheet (Tensor Core GPU, 2023): FP32 67 TFLOPS SXM, 51 PCIe, 60 NVL;
//!   SXM5: 16896 cores × 2 × 1.98 GHz = 66.9, PCIe: 14592 × 2 × 1.755 GHz = 51.2.
//! - NVIDIA H200 datasheet (2024): FP32 67 TFLOPS SXM, 60 NVL; GH200 datasheet: 67 TFLOPS.
//! - NVIDIA A100 datasheet (2021): FP32 19.5 TFLOPS (SXM4 and PCIe).
//! - NVIDIA L40S datasheet: 91.6 TFLOPS; L40 datasheet: 90.5; L4 datasheet: 30.3; T4
//!   datasheet: 8.1.
//! - NVIDIA Ada (RTX 4090) whitepaper: 82.6 TFLOPS (16384 × 2 × 2.52 GHz); Ampere GA102
//!   whitepaper: RTX 3090 35.6 (10496 × 2 × 1.695 GHz), RTX 3090 Ti 40.0.
//! - AMD Instinct MI300X datasheet: FP32 vector 163.4 TFLOPs; MI250X datasheet: packed FP32
//!   95.7 TFLOPs (47.9 unpacked).
//! - AMD Radeon RX 7900 XTX specifications: 61.4 TFLOPs (dual-issue: 6144 × 2 × 2 × 2.5 GHz).

/// A known card: the words its adapter name contains (in a row, case-insensitive), its FP32
/// peak in TFLOP/s and where the figure comes from.
struct Card {
    words: &'static str,
    tflops: f64,
    source: &'static str,
}

const CARDS: &[Card] = &[
    Card { words: "h100 sxm", tflops: 66.9, source: "NVIDIA H100 SXM datasheet" },
    // The SXM5 board's Vulkan name ("NVIDIA H100 80GB HBM3"); the PCIe board has HBM2e.
    Card { words: "h100 80gb hbm3", tflops: 66.9, source: "NVIDIA H100 SXM datasheet" },
    Card { words: "h100 pcie", tflops: 51.2, source: "NVIDIA H100 PCIe datasheet" },
    Card { words: "h100 nvl", tflops: 60.0, source: "NVIDIA H100 NVL datasheet" },
    Card { words: "h100", tflops: 66.9, source: "NVIDIA H100 SXM datasheet (variant not in the name: SXM assumed)" },
    Card { words: "h200 nvl", tflops: 60.0, source: "NVIDIA H200 NVL datasheet" },
    Card { words: "h200", tflops: 66.9, source: "NVIDIA H200 SXM datasheet" },
    Card { words: "gh200", tflops: 66.9, source: "NVIDIA GH200 datasheet" },
    Card { words: "a100", tflops: 19.5, source: "NVIDIA A100 datasheet" },
    Card { words: "l40s", tflops: 91.6, source: "NVIDIA L40S datasheet" },
    Card { words: "l40", tflops: 90.5, source: "NVIDIA L40 datasheet" },
    Card { words: "l4", tflops: 30.3, source: "NVIDIA L4 datasheet" },
    Card { words: "t4", tflops: 8.1, source: "NVIDIA T4 datasheet" },
    Card { words: "rtx 4090", tflops: 82.6, source: "NVIDIA Ada whitepaper (RTX 4090)" },
    Card { words: "rtx 3090", tflops: 35.6, source: "NVIDIA Ampere GA102 whitepaper (RTX 3090)" },
    Card { words: "rtx 3090 ti", tflops: 40.0, source: "NVIDIA RTX 3090 Ti specifications" },
    Card { words: "mi300x", tflops: 163.4, source: "AMD Instinct MI300X datasheet (FP32 vector)" },
    Card { words: "mi250x", tflops: 95.7, source: "AMD Instinct MI250X datasheet (packed FP32)" },
    Card { words: "rx 7900 xtx", tflops: 61.4, source: "AMD Radeon RX 7900 XTX specifications (dual-issue)" },
];

/// A known card's FP32 peak.
pub struct Peak {
    /// TFLOP/s.
    pub tflops: f64,
    /// Where the figure comes from.
    pub source: &'static str,
}

/// Lower-case alphanumeric words of an adapter name ("NVIDIA A100-SXM4-80GB" → nvidia a100 sxm4 80gb).
fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_ascii_lowercase).collect()
}

/// The FP32 peak of the adapter named `name`: the entry whose words appear in a row in the name,
/// the entry with the most words (then the longest) when several do, so that "H100 PCIe" wins
/// over "H100". None for unknown adapters (llvmpipe, laptop variants of desktop cards).
pub fn fp32_peak(name: &str) -> Option<Peak> {
    let have = words(name);
    if have.iter().any(|w| w == "laptop" || w == "mobile") {
        return None;
    }
    CARDS
        .iter()
        .filter(|c| {
            let want = words(c.words);
            have.windows(want.len()).any(|w| w == want.as_slice())
        })
        .max_by_key(|c| (words(c.words).len(), c.words.len()))
        .map(|c| Peak { tflops: c.tflops, source: c.source })
}

#[cfg(test)]
mod tests {
    use super::fp32_peak;

    #[test]
    fn the_most_specific_entry_wins() {
        let peak = |n: &str| fp32_peak(n).map(|p| p.tflops);
        assert_eq!(peak("NVIDIA H100 80GB HBM3"), Some(66.9));
        assert_eq!(peak("NVIDIA H100 PCIe"), Some(51.2));
        assert_eq!(peak("NVIDIA H100 NVL"), Some(60.0));
        assert_eq!(peak("NVIDIA H200 NVL"), Some(60.0));
        assert_eq!(peak("NVIDIA H200"), Some(66.9));
        assert_eq!(peak("NVIDIA GH200 480GB"), Some(66.9));
        assert_eq!(peak("NVIDIA A100-SXM4-80GB"), Some(19.5));
        assert_eq!(peak("NVIDIA L40S"), Some(91.6));
        assert_eq!(peak("NVIDIA L4"), Some(30.3));
        assert_eq!(peak("Tesla T4"), Some(8.1));
        assert_eq!(peak("NVIDIA GeForce RTX 3090 Ti"), Some(40.0));
        assert_eq!(peak("NVIDIA GeForce RTX 4090"), Some(82.6));
        assert_eq!(peak("NVIDIA GeForce RTX 4090 Laptop GPU"), None);
        assert_eq!(peak("AMD Radeon RX 7900 XTX (RADV NAVI31)"), Some(61.4));
        assert_eq!(peak("llvmpipe (LLVM 15.0.6, 256 bits)"), None);
    }
}
