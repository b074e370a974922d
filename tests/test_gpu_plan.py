"""The GPU plan: XLA's dump read back (hand-made dumps), attention paths decided up front, CLIP's padding for
cuDNN, and the tiny recipe compiled for an H100 (needs jax's CUDA plugin and cuDNN, not a GPU)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dcp_jax import gpu_program, gpu_targets
from dcp_jax.models import compute

ROOT = Path(__file__).resolve().parents[1]

# A dump in the format XLA 0.10 writes (dcp_jax/gpu_program.py): a graph of two kernels, a loop of 8 trips
# outside any graph whose body is one graph (a gemm and a dynamic-update-slice fusion), a copy, cuDNN
# attention and a convolution outside graphs.
HLO = r"""HloModule jit_step, is_scheduled=true

%fused_add (param_0: f32[1024], param_1: f32[1024]) -> f32[1024] {
  %param_0 = f32[1024]{0} parameter(0)
  %param_1 = f32[1024]{0} parameter(1)
  ROOT %add.1 = f32[1024]{0} add(%param_0, %param_1), metadata={op_name="jit(step)/add"}
}

%fused_dus (param_0.1: f32[8,1024], param_1.1: f32[1024], param_2: s32[]) -> f32[8,1024] {
  %param_0.1 = f32[8,1024]{1,0} parameter(0)
  %param_1.1 = f32[1024]{0} parameter(1)
  %bitcast.1 = f32[1,1024]{1,0} bitcast(%param_1.1)
  %param_2 = s32[] parameter(2)
  %constant.0 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[8,1024]{1,0} dynamic-update-slice(%param_0.1, %bitcast.1, %param_2, %constant.0)
}

%fused_slice (param_0.2: f32[8,1024], param_1.2: s32[]) -> f32[1,1024] {
  %param_0.2 = f32[8,1024]{1,0} parameter(0)
  %param_1.2 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-slice.1 = f32[1,1024]{1,0} dynamic-slice(%param_0.2, %param_1.2, %constant.1), dynamic_slice_sizes={1,1024}
}

%body (p.0: (s32[], f32[8,1024], bf16[64,128], bf16[128,32])) -> (s32[], f32[8,1024], bf16[64,128], bf16[128,32]) {
  %p.0 = (s32[], f32[8,1024]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%p.0), index=0
  %gte.1 = f32[8,1024]{1,0} get-tuple-element(%p.0), index=1
  %gte.2 = bf16[64,128]{1,0} get-tuple-element(%p.0), index=2
  %gte.3 = bf16[128,32]{1,0} get-tuple-element(%p.0), index=3
  %cublas-lt-matmul.1 = (bf16[64,32]{1,0}, s8[4194304]{0}) custom-call(%gte.2, %gte.3), custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0","gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %loop_slice_fusion.1 = f32[1,1024]{1,0} fusion(%gte.1, %gte.0), kind=kLoop, calls=%fused_slice
  %bitcast.2 = f32[1024]{0} bitcast(%loop_slice_fusion.1)
  %loop_dynamic_update_slice_fusion.1 = f32[8,1024]{1,0} fusion(%gte.1, %bitcast.2, %gte.0), kind=kLoop, calls=%fused_dus
  ROOT %tuple.1 = (s32[], f32[8,1024]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) tuple(%gte.0, %loop_dynamic_update_slice_fusion.1, %gte.2, %gte.3)
}

%cond (p.1: (s32[], f32[8,1024], bf16[64,128], bf16[128,32])) -> pred[] {
  %p.1 = (s32[], f32[8,1024]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) parameter(0)
  %gte.4 = s32[] get-tuple-element(%p.1), index=0
  %constant.2 = s32[] constant(8)
  ROOT %loop_compare_fusion.1 = pred[] compare(%gte.4, %constant.2), direction=LT
}

ENTRY %main (a: f32[1024], b: f32[1024], buf: f32[8,1024], x: bf16[64,128], w: bf16[128,32], q: bf16[2,16,4,64], k: bf16[2,16,4,64], v: bf16[2,16,4,64], img: bf16[2,8,8,16], f: bf16[3,3,16,32]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %b = f32[1024]{0} parameter(1)
  %buf = f32[8,1024]{1,0} parameter(2)
  %x = bf16[64,128]{1,0} parameter(3)
  %w = bf16[128,32]{1,0} parameter(4)
  %q = bf16[2,16,4,64]{3,2,1,0} parameter(5)
  %k = bf16[2,16,4,64]{3,2,1,0} parameter(6)
  %v = bf16[2,16,4,64]{3,2,1,0} parameter(7)
  %img = bf16[2,8,8,16]{3,2,1,0} parameter(8)
  %f = bf16[3,3,16,32]{3,2,1,0} parameter(9)
  %loop_add_fusion.1 = f32[1024]{0} fusion(%a, %b), kind=kLoop, calls=%fused_add
  %loop_add_fusion.2 = f32[1024]{0} fusion(%a, %loop_add_fusion.1), kind=kLoop, calls=%fused_add
  %zero = s32[] constant(0)
  %tuple.2 = (s32[], f32[8,1024]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) tuple(%zero, %buf, %x, %w)
  %while.1 = (s32[], f32[8,1024]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) while(%tuple.2), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
  %copy.1 = f32[1024]{0} copy(%loop_add_fusion.2)
  %dot_product_attention_fwd.1 = (bf16[2,4,16,64]{3,1,2,0}, f32[2,4,16]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"operation_queue_id": "0", "cudnn_fmha_backend_config": {"fmha_scale": 0.125, "intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2","4","16","16"]}}}
  %cudnn-conv.1 = (bf16[2,8,8,32]{3,2,1,0}, u8[0]{0}) custom-call(%img, %f), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  ROOT %out = f32[1024]{0} copy(%copy.1)
}
"""

THUNKS = """000: kCommandBuffer  [source          | next=003 (1)   ] 
    001: kCustomKernel [source       | next=002 (1)] loop_add_fusion_1 grid: [8, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
    002: kCustomKernel [prev=001 (1) | sink        ] loop_add_fusion_2 grid: [8, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
003: kWhile          [prev=000 (1)  | next=009 (1) ]   
condition:
    004: kCustomKernel [source | sink] loop_compare_fusion_1 grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
  body:
    000: kCommandBuffer [source | sink] 
        005: kCublasLtMatmul [source        | next=006 (1)] kCublasLtMatmul
        006: kCustomKernel   [prev=005 (1)  | sink        ] loop_dynamic_update_slice_fusion_1 grid: [8, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
    007: kDynamicSliceFusion [source | sink] params=1, results=1
        008: kCopy [source | sink] kCopy
009: kCopy           [prev=003 (1)  | next=010 (1)   ] kCopy
010: kCuDnn          [prev=009 (1)  | next=011 (1)   ] kCuDnn
011: kConvolution    [prev=010 (1)  | sink           ] kConvolution
"""

METADATA = "\n".join(
    f'thunk_metadata {{\n  thunk_info {{\n    profile_annotation: "{name}"\n    thunk_id: {i}\n  }}\n'
    f'  thunk_kind: "{kind}"\n}}'
    for i, name, kind in [(1, "loop_add_fusion.1", "kCustomKernel"), (2, "loop_add_fusion.2", "kCustomKernel"),
                          (3, "while.1", "kWhile"), (4, "loop_compare_fusion.1", "kCustomKernel"),
                          (5, "cublas-lt-matmul.1", "kCublasLtMatmul"),
                          (6, "loop_dynamic_update_slice_fusion.1", "kCustomKernel"),
                          (7, "loop_slice_fusion.1", "kDynamicSliceFusion"), (8, "loop_slice_fusion.1", "kCopy"),
                          (9, "copy.1", "kCopy"), (10, "dot_product_attention_fwd.1", "kCuDnn"),
                          (11, "cudnn-conv.1", "kConvolution")])


@pytest.fixture
def dump(tmp_path):
    (tmp_path / "module_0001.jit_step.sm_9.0a_gpu_after_optimizations.txt").write_text(HLO)
    (tmp_path / "module_0001.jit_step.thunk_sequence_after_thunk_passes.txt").write_text(THUNKS)
    (tmp_path / "module_0001.jit_step.thunk_metadata.txt").write_text(METADATA)
    return tmp_path


def test_kernels_of_a_dump(dump):
    program = gpu_program.read_program(dump)
    by_name = {k.name: k for k in program.kernels}
    # loop bodies run once per trip, the condition once more; graphs: the top one and the body's, 8 times
    assert by_name["cublas-lt-matmul.1"].runs == 8 and by_name["loop_compare_fusion.1"].runs == 9
    assert program.graph_launches == 1 + 8 and program.host_loop_iterations == 8
    assert program.launches() == 2 + 9 + 8 * 3 + 3
    assert program.launches(in_graph=True) == 2 + 8 * 2
    assert {k: program.launches(k) for k in gpu_program.KINDS if program.launches(k)} == {
        "fusion": 2 + 9 + 8, "gemm": 8, "dynamic slice": 8, "copy": 1, "cudnn attention": 1, "convolution": 1}
    # FLOPs by hand: gemm 2*64*32*128; attention 2 matmuls of 2*B*N*T*S*H; conv 2 * out elements * 3*3 * 16
    assert by_name["cublas-lt-matmul.1"].flops == 2 * 64 * 32 * 128
    assert by_name["dot_product_attention_fwd.1"].flops == 2 * 2 * (2 * 4 * 16 * 16 * 64)
    assert by_name["cudnn-conv.1"].flops == 2 * (2 * 8 * 8 * 32) * 9 * 16
    # bytes: an add reads two f32[1024] and writes one; the in-place update moves the row, not the buffer;
    # the gemm's workspace is not traffic; a copy reads and writes
    assert by_name["loop_add_fusion.1"].bytes == 3 * 4096
    assert by_name["loop_dynamic_update_slice_fusion.1"].bytes == 2 * 4096 + 4  # and the s32 index
    assert by_name["cublas-lt-matmul.1"].bytes == 2 * (64 * 128 + 128 * 32 + 64 * 32)
    assert by_name["copy.1"].bytes == 2 * 4096


def test_estimate_adds_roofline_and_launches(dump):
    program = gpu_program.read_program(dump)
    costs = gpu_program.LaunchCosts(in_graph_us=1, host_us=4, graph_us=5, host_loop_iteration_us=10)
    tflops, bandwidth = 100.0, 1e12
    got = gpu_program.estimate(program, tflops, bandwidth, costs)
    expect_kernels = sum(k.runs * max(k.flops / (tflops * 1e12 * gpu_program.RATE_BY_DTYPE.get(k.dtype, 0.5)),
                                      k.bytes / bandwidth) for k in program.kernels)
    expect_launch = 1e-6 * (1 * 18 + 4 * (program.launches() - 18) + 5 * 9 + 10 * 8)
    assert got["kernel_seconds"] == pytest.approx(expect_kernels)
    assert got["launch_seconds"] == pytest.approx(expect_launch)
    assert got["seconds"] == pytest.approx(expect_kernels + expect_launch)
    assert sum(got["seconds_by_kind"].values()) == pytest.approx(expect_kernels)


def test_a_missing_dump_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="thunk_sequence_after_thunk_passes"):
        (tmp_path / "module_0001.x.sm_9.0a_gpu_after_optimizations.txt").write_text(HLO)
        (tmp_path / "module_0001.x.thunk_metadata.txt").write_text(METADATA)
        gpu_program.read_program(tmp_path)


def test_target_configs_hold_the_chips_figures():
    h100 = gpu_targets.gpu_target("H100")
    text = h100.config_text()
    assert "core_count: 132" in text and f"device_memory_size: {h100.memory_bytes}" in text
    assert 'name: "NVIDIA H100 80GB HBM3"' in text and "major: 9 minor: 0" in text
    assert 'driver_version: "13.0.0"' in text  # >= 12.3: XLA keeps gemms and cuDNN calls in CUDA graphs
    with pytest.raises(ValueError, match="unknown GPU; known: h100, h200, a100"):
        gpu_targets.gpu_target("v100")


# ---------------------------------------------------------------------------------------------
# Attention paths
# ---------------------------------------------------------------------------------------------

def test_attention_paths_by_backend_and_request():
    shape = (4, 577, 12, 64)
    assert compute.attention_path(shape, shape, jnp.float32).path == "reference"  # this CPU
    assert compute.attention_path(shape, shape, jnp.bfloat16, return_probs=True).reason == "its probabilities are used"
    with compute.compiling_for("tpu"):
        assert compute.attention_path(shape, shape, jnp.bfloat16).path == "xla"
    with compute.compiling_for("gpu"):
        choice = compute.attention_path(shape, shape, jnp.float32, site="clip.vision")
        assert (choice.path, choice.site) == ("xla", "clip.vision") and "float32" in choice.reason
        with pytest.raises(ValueError, match="model.attention=cudnn: cuDNN cannot compute clip.vision"):
            compute.attention_path(shape, shape, jnp.float32, impl="cudnn", site="clip.vision")
    with pytest.raises(ValueError, match="config.model.attention='flash'"):
        compute.attention_path(shape, shape, jnp.bfloat16, impl="flash")


def test_cudnn_rules_on_gpu_shapes(monkeypatch):
    """jax's training rule refuses odd lengths (577 tokens), which are padded; a head dim over 128 is refused
    before Hopper. Without cuDNN installed the path is XLA's, with the install line."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)  # as if cuDNN 9.10 were installed
    clip, wide = (4, 577, 12, 64), (4, 576, 4, 192)

    class Device:
        def __init__(self, capability):
            self.compute_capability = capability

    with compute.compiling_for("gpu", Device("9.0")):
        padded = compute.attention_path(clip, clip, jnp.bfloat16, site="clip.vision")
        assert padded.path == "cudnn" and padded.padded == (584, 584) and "padded to 584" in padded.reason
        assert compute.attention_path(wide, (4, 36, 4, 192), jnp.bfloat16).path == "cudnn"  # Hopper: up to 256
    with compute.compiling_for("gpu", Device("8.0")):
        refused = compute.attention_path(wide, (4, 36, 4, 192), jnp.bfloat16)
        assert refused.path == "xla" and "192" in refused.reason
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: (_ for _ in ()).throw(RuntimeError("cuDNN not found.")))
    with compute.compiling_for("gpu", Device("9.0")):
        missing = compute.attention_path(clip, clip, jnp.bfloat16)
        assert missing.path == "xla" and "cuDNN not found" in missing.reason and "gpu-plan" in missing.reason


def test_recorded_sites_of_the_tiny_model():
    from dcp_jax.configs import tiny
    from dcp_jax.models import build

    model = build.create_model(tiny.get_config())
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    text = jnp.asarray(np.random.default_rng(0).standard_normal((5, 1, 32)), jnp.float32)
    with compute.recording_attention_paths() as sites:
        jax.eval_shape(lambda: model(images, text, num_slots=4, train=True))
    assert {s.site for s in sites} >= {"clip.vision", "clip.vision.last", "tga.cross", "tga.self", "decoder.swin"}
    assert {s.path for s in sites} == {"reference"}  # the CPU


def test_padded_clip_blocks_equal_unpadded(monkeypatch):
    """CLIP's stream padded for cuDNN (kv_length masking the padding, cut off at the end) gives the blocks'
    outputs and gradients of the unpadded stream (float32, highest precision; rtol 1e-5). The padding is
    forced on the reference path, which masks the same way."""
    from dcp_jax.configs import tiny
    from dcp_jax.models import build
    from dcp_jax.models import clip as clip_lib

    clip = build.random_clip(build.clip_config_for(tiny.get_config()), seed=0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 65, 64)), jnp.float32)

    def run(x):
        out, hidden = clip.vision_model.encoder(x, collect=True, site="clip.vision")
        return jnp.sum(out ** 2) + jnp.sum(hidden ** 2), (out, hidden)

    with jax.default_matmul_precision("highest"):
        (_, plain), grad_plain = jax.value_and_grad(run, has_aux=True)(x)
        real = compute.attention_path

        def padded(q, k, dtype, **kw):
            return dataclasses.replace(real(q, k, dtype, **kw), padded=(72, 72))

        monkeypatch.setattr(clip_lib, "attention_path", padded)
        (_, pad), grad_pad = jax.value_and_grad(run, has_aux=True)(x)
    # float32 sums over 72 instead of 65 keys (the 7 masked ones add exact zeros, in another order): agreement
    # to 1e-5 relative, or 1e-6 of the largest magnitude for entries near zero
    for a, b in [*zip(plain, pad), (grad_plain, grad_pad)]:
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(a))))


# ---------------------------------------------------------------------------------------------
# The tiny recipe compiled for an H100
# ---------------------------------------------------------------------------------------------

def plugin_path() -> str | None:
    """Where jax's CUDA plugin and cuDNN are importable from: $DCP_GPU_PLAN_PATH, the checkout's .gpu-plan
    folder (.ci/run fills it), or this environment (pip install -e ".[gpu-plan]"); None if nowhere."""
    candidates = [os.environ.get("DCP_GPU_PLAN_PATH", ""), str(ROOT / ".gpu-plan"), ""]
    for path in dict.fromkeys(candidates):
        if path and not Path(path).is_dir():
            continue
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p)}
        probe = subprocess.run([sys.executable, "-c", "import jax_plugins.xla_cuda12, nvidia.cudnn"], env=env,
                               capture_output=True)
        if probe.returncode == 0:
            return path
    return None


@pytest.mark.timeout(900)
def test_tiny_recipe_compiles_for_an_h100(tmp_path):
    """The tiny recipe's train step and its two slide-inference stages, default config, compiled for an H100
    without one: a trace or compile failure only a GPU would meet fails here. The CLIP blocks' attention
    (65 tokens) runs on cuDNN padded to 72, the head's sites on cuDNN; nearly every kernel in CUDA graphs."""
    path = plugin_path()
    if path is None:
        pytest.skip("needs jax's CUDA plugin and cuDNN (no GPU): pip install -e \".[gpu-plan]\", or .ci/run's "
                    "pip install --target .gpu-plan (docs/tests.md)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (path, str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    out = tmp_path / "plan"
    result = subprocess.run(
        [sys.executable, "-m", "dcp_jax.bench", "--suite", "plan", "--gpu", "h100", "--config", "configs/tiny.py",
         "--large-config", "configs/tiny.py", "--only", "B/16 train K=32 batch 4,B/16 slide", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "gpu_plan.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["train", "slide 1", "slide 2"]
    for r in rows:
        assert r["launches"] > 50 and r["in_graphs"] >= 0.8 * r["launches"], r["program"]
        assert 0 < r["memory_gib"]["total"] < 1 and r["fits"] and r["estimate_ms"] > 0
        assert r["gflop_model"] > 0 and r["gflop_kernels"] > 0.5 * r["gflop_model"]
    paths = {(s["site"], s["path"]) for s in rows[0]["attention"]}
    assert paths == {("clip.vision", "cudnn"), ("clip.vision.last", "reference"), ("tga.cross", "cudnn"),
                     ("tga.self", "cudnn"), ("decoder.swin", "cudnn")}
    vision = next(s for s in rows[0]["attention"] if s["site"] == "clip.vision")
    assert vision["q"][1] == 72 and vision["valid_keys"] == 65
    assert rows[0]["kernels"]["cudnn attention"] > 0 and rows[0]["dtype"] == "bfloat16"
    assert "| h100 | tiny train K=32 batch 4 |" in result.stdout


def test_scan_layers_auto_is_a_loop_on_gpus_only():
    from dcp_jax.configs import tiny
    from dcp_jax.models import dcp

    config = tiny.get_config()
    assert config.clip.scan_layers == "auto" and dcp.scan_layers(config)  # this CPU: the scan
    with compute.compiling_for("gpu"):
        assert not dcp.scan_layers(config)
    with compute.compiling_for("tpu"):
        assert dcp.scan_layers(config)
    config.clip.scan_layers = "false"
    assert not dcp.scan_layers(config)
    saved = ml_collections.ConfigDict({"clip": {"scan_layers": True}})  # configs saved before "auto" hold a bool
    assert dcp.scan_layers(saved)
    config.clip.scan_layers = "sometimes"
    with pytest.raises(ValueError, match="config.clip.scan_layers='sometimes': expected one of"):
        dcp.scan_layers(config)
