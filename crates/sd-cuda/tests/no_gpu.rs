//! Checks that need no GPU: build ids, and the errors a machine without CUDA gets.

use sd_cuda::{CudaBackend, CudaError, CudaPrecision, kernel_build_id};

#[test]
fn kernel_build_id_depends_on_arch_and_nvrtc() {
    let a = kernel_build_id("sm_89", (13, 0));
    assert_eq!(a, kernel_build_id("sm_89", (13, 0)), "deterministic");
    assert_ne!(a, kernel_build_id("sm_90a", (13, 0)));
    assert_ne!(a, kernel_build_id("sm_89", (13, 1)));
    assert_eq!(a.len(), 32);
}

#[test]
fn missing_libraries_are_named() {
    match CudaBackend::new(0, CudaPrecision::Bf16) {
        // A machine with a GPU and the libraries: nothing to check here.
        Ok(b) => eprintln!("GPU present: {}", b.gpu_name()),
        Err(CudaError::MissingLibrary { lib, file, hint }) => {
            let msg = CudaError::MissingLibrary { lib, file, hint }.to_string();
            assert!(msg.contains(file), "{msg}");
            assert!(msg.contains("LD_LIBRARY_PATH"), "{msg}");
        }
        // Libraries present but no device / no headers: the error must say so.
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[test]
fn no_fp8_message_suggests_bf16() {
    let e = CudaError::NoFp8 {
        gpu: "NVIDIA A100".into(),
        major: 8,
        minor: 0,
    };
    let m = e.to_string();
    assert!(m.contains("--precision bf16") && m.contains("8.0"), "{m}");
}

#[test]
fn packed_fp8_weight_dequantizes_to_the_cpu_simulation() {
    use sd_model::{LinearQuant, LinearSpec, WeightQuant};
    let (out, inp) = (5usize, 32usize);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
        .collect();
    for scales in [
        vec![0.002f32],
        (1..=out).map(|o| 0.001 * o as f32).collect(),
    ] {
        let q = WeightQuant {
            format: sd_fp8::Fp8Format::E4M3,
            scales,
        };
        let spec = LinearSpec {
            name: "l".into(),
            in_features: inp,
            out_features: out,
            quant: LinearQuant::None,
        };
        let cpu = sd_cpu::fp8_weight(&spec, &w, &q).expect("cpu weight");
        let p = sd_cuda::pack_fp8_weight(&w, out, inp, &q);
        assert_eq!(p.scales.len(), out);
        for (i, (&c, &want)) in p.codes.iter().zip(&cpu).enumerate() {
            let got = sd_fp8::dequantize(sd_fp8::Fp8Format::E4M3, c, p.scales[i / inp]);
            assert_eq!(got, want, "element {i}");
        }
    }
}

#[test]
fn hopper_gets_sm_90a_kernels_and_others_no_wgmma_tiling() {
    assert_eq!(sd_cuda::arch_for((9, 0)), "sm_90a");
    assert_eq!(sd_cuda::arch_for((8, 9)), "sm_89");
    assert_eq!(sd_cuda::arch_for((12, 0)), "sm_120");
    use sd_cuda::FlashVariant;
    let hopper_only: Vec<_> = FlashVariant::ALL
        .iter()
        .filter(|v| v.needs_hopper())
        .collect();
    assert_eq!(hopper_only.len(), 9, "the five wgmma and four TMA tilings");
    // A wgmma tiling chosen for the process falls back to mma.sync off Hopper.
    sd_cuda::set_flash_variant(FlashVariant::Wg3N128);
    assert_eq!(sd_cuda::flash_variant_for(true), FlashVariant::Wg3N128);
    assert_eq!(sd_cuda::flash_variant_for(false), FlashVariant::W8M2);
    sd_cuda::set_flash_variant(FlashVariant::W4M2);
    assert_eq!(sd_cuda::flash_variant_for(false), FlashVariant::W4M2);
}

#[test]
fn fp8_gemm_modes_parse_by_name_and_unknown_names_are_refused() {
    use sd_cuda::Fp8Gemm;
    for m in Fp8Gemm::ALL {
        assert_eq!(Fp8Gemm::parse(m.name()).unwrap(), m);
    }
    let e = Fp8Gemm::parse("fast").unwrap_err().to_string();
    assert!(e.contains("\"fast\"") && e.contains("fast-accum"), "{e}");
}
