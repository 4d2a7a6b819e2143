"""Triton kernels vs their naive PyTorch references.

CPU runs use Triton's interpreter (TRITON_INTERPRET=1, small shapes; fp32/fp16 because the
interpreter's bf16 `tl.dot` is wrong). The variable is set per test with monkeypatch, never for the
whole process: `dispatch.triton_modules` executes private interpreter copies of the kernel modules, so
it does not matter whether Triton or the compiled kernels were imported earlier. Tests marked `gpu`
run the compiled kernels on CUDA and skip without it.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from longembed.encoder import load_model
from longembed.encoder.jina_bert import alibi_slopes
from longembed.triton_kernels import dispatch, segment_spans
from longembed.triton_kernels.flash_attention import alibi_attention_reference
from longembed.triton_kernels.pooling import segment_mean_pool_normalize_reference
from longembed.triton_kernels.torch_ops import (
    mean_pool_normalize_torch,
    rotary_qk_torch_,
    varlen_attention_torch,
)
from tests.jina_reference import jina_config, reference_embed, write_checkpoint

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Segment-length mixes: one token; odd lengths; lengths off the interpreter's 16-row tile;
# one long segment among many short ones; a single sequence exactly one tile long.
LENGTH_MIXES = {
    "single-token": [1],
    "odd": [3, 17, 1, 31],
    "off-tile": [15, 16, 33],
    "long-and-short": [70, 1, 2, 5, 3, 9],
    "one-tile": [16],
}
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return dispatch.triton_modules(CPU)


def packed_qkv(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, device=CPU, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (
        torch.randn(total, heads, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3)
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("mix", LENGTH_MIXES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alibi", [True, False])
def test_attention_matches_reference(interpreter, mix, head_dim, dtype, alibi):
    lengths = LENGTH_MIXES[mix]
    heads = 3  # not a power of two: the slope sequence interleaves
    q, k, v, cu = packed_qkv(lengths, heads, head_dim, dtype)
    slopes = alibi_slopes(heads) if alibi else None
    out = interpreter["flash_attention"].alibi_flash_attention(q, k, v, cu, max(lengths), slopes)
    expected = alibi_attention_reference(q, k, v, cu, max(lengths), slopes)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_alibi_changes_the_result_and_scale_is_honoured(interpreter):
    # Guards against a kernel that ignores the bias or the scale yet matches a reference that does too.
    q, k, v, cu = packed_qkv([40], 2, 32, torch.float32)
    attn = interpreter["flash_attention"].alibi_flash_attention
    slopes = torch.tensor([0.5, 0.25])
    plain, biased = attn(q, k, v, cu, 40), attn(q, k, v, cu, 40, slopes)
    assert (plain - biased).abs().max() > 0.1
    scaled = attn(q, k, v, cu, 40, slopes, scale=0.05)
    torch.testing.assert_close(scaled, alibi_attention_reference(q, k, v, cu, 40, slopes, scale=0.05))
    assert (scaled - biased).abs().max() > 0.1


def test_segments_do_not_attend_across_boundaries(interpreter):
    # Changing one sequence's keys/values must leave every other sequence's output unchanged.
    q, k, v, cu = packed_qkv([7, 20, 5], 2, 64, torch.float32)
    attn = interpreter["flash_attention"].alibi_flash_attention
    before = attn(q, k, v, cu, 20, torch.tensor([0.5, 0.125]))
    k2, v2 = k.clone(), v.clone()
    k2[7:27] += 3.0
    v2[7:27] -= 2.0
    after = attn(q, k2, v2, cu, 20, torch.tensor([0.5, 0.125]))
    torch.testing.assert_close(after[:7], before[:7], atol=0, rtol=0)
    torch.testing.assert_close(after[27:], before[27:], atol=0, rtol=0)
    assert (after[7:27] - before[7:27]).abs().max() > 0.1


def test_attention_on_strided_qkv_views(interpreter):
    # The encoder passes q, k, v as views into one fused (T, 3, heads, d) projection.
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(29, 3, 2, 32, generator=gen)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 12, 29], dtype=torch.int32)
    slopes = torch.tensor([0.5, 0.0625])
    out = interpreter["flash_attention"].alibi_flash_attention(q, k, v, cu, 17, slopes)
    expected = alibi_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), cu, 17, slopes)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_reference_agrees_with_the_torch_fast_path():
    # The naive reference and the SDPA path are independent implementations of the same maths.
    q, k, v, cu = packed_qkv([5, 600, 33], 4, 32, torch.float32)
    slopes = alibi_slopes(4)
    fast = varlen_attention_torch(q, k, v, cu, 600, slopes)
    torch.testing.assert_close(
        fast, alibi_attention_reference(q, k, v, cu, 600, slopes), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            lambda q, k, v, cu: (
                q[..., :48].contiguous(),
                k[..., :48].contiguous(),
                v[..., :48].contiguous(),
                cu,
            ),
            "head_dim",
        ),
        (lambda q, k, v, cu: (q.double(), k.double(), v.double(), cu), "dtype"),
        (lambda q, k, v, cu: (q, k.half(), v, cu), "dtype"),
        (lambda q, k, v, cu: (q, k, v, cu.long()), "int32"),
        (lambda q, k, v, cu: (q, k[:-1], v, cu), "shape"),
        (lambda q, k, v, cu: (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu), "contiguous"),
        (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 5, 100], dtype=torch.int32)), "total_tokens"),
        (lambda q, k, v, cu: (q, k, v, torch.tensor([0, 30, 20], dtype=torch.int32)), "total_tokens"),
    ],
)
def test_attention_rejects_bad_input(interpreter, change, error):
    q, k, v, cu = packed_qkv([8, 12], 2, 64, torch.float32)
    with pytest.raises((ValueError, TypeError), match=error):
        interpreter["flash_attention"].alibi_flash_attention(*change(q, k, v, cu), 12)


def test_attention_rejects_wrong_slopes(interpreter):
    q, k, v, cu = packed_qkv([8], 2, 32, torch.float32)
    with pytest.raises(ValueError, match="alibi_slopes"):
        interpreter["flash_attention"].alibi_flash_attention(q, k, v, cu, 8, torch.ones(3))


def test_attention_empty_batch(interpreter):
    q, k, v, cu = packed_qkv([], 2, 32, torch.float16)
    out = interpreter["flash_attention"].alibi_flash_attention(q, k, v, cu, 0)
    assert out.shape == (0, 2, 32)


POOL_SPANS = {
    "whole-sequences": [(0, 1), (1, 18), (18, 50)],
    "overlapping-chunks": [(0, 20), (10, 30), (25, 50), (0, 50)],
    "single-rows": [(49, 50), (0, 1), (17, 18)],
}


@pytest.mark.parametrize("spans", POOL_SPANS)
@pytest.mark.parametrize("dim", [32, 48, 384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pooling_matches_reference(interpreter, spans, dim, dtype):
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(50, dim, generator=gen) + 0.5).to(dtype)  # a non-zero mean, like real states
    span_t = torch.tensor(POOL_SPANS[spans])
    out = interpreter["pooling"].segment_mean_pool_normalize(hidden, span_t)
    expected = segment_mean_pool_normalize_reference(hidden, span_t)
    assert out.dtype == torch.float32 and out.shape == (len(span_t), dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # both accumulate in fp32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(span_t)), atol=1e-5, rtol=0)


def test_pooling_reference_agrees_with_torch_fast_path():
    hidden = torch.randn(40, 16)
    spans = torch.tensor([(0, 40), (3, 9), (5, 6)])
    torch.testing.assert_close(
        mean_pool_normalize_torch(hidden, spans), segment_mean_pool_normalize_reference(hidden, spans)
    )


@pytest.mark.parametrize(
    ("spans", "error"),
    [
        (torch.tensor([(3, 3)]), "at least one token"),
        (torch.tensor([(5, 2)]), "at least one token"),
        (torch.tensor([(0, 11)]), "at least one token"),
        (torch.tensor([(-1, 2)]), "at least one token"),
        (torch.tensor([0, 2]), r"\(m, 2\)"),
        (torch.tensor([(0.0, 2.0)]), "integer"),
    ],
)
def test_pooling_rejects_bad_spans(interpreter, spans, error):
    with pytest.raises(ValueError, match=error):
        interpreter["pooling"].segment_mean_pool_normalize(torch.randn(10, 32), spans)


def test_pooling_no_spans(interpreter):
    assert interpreter["pooling"].segment_mean_pool_normalize(
        torch.randn(10, 32), torch.zeros(0, 2, dtype=torch.long)
    ).shape == (0, 32)


# --- dispatcher ---------------------------------------------------------------------------------


def test_dispatch_backends(monkeypatch):
    monkeypatch.delenv("LONGEMBED_KERNELS", raising=False)
    assert dispatch.backend(CPU) == "torch"
    assert dispatch.backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("LONGEMBED_KERNELS", "torch")
    assert dispatch.backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("LONGEMBED_KERNELS", "TRITON")
    assert dispatch.backend(CPU) == "triton"
    monkeypatch.setenv("LONGEMBED_KERNELS", "fast")
    with pytest.raises(ValueError, match="LONGEMBED_KERNELS"):
        dispatch.backend(CPU)


def test_dispatch_limits_match_the_kernels(interpreter):
    assert dispatch._ATTENTION_HEAD_DIMS == interpreter["flash_attention"].HEAD_DIMS
    assert dispatch._POOLING_MAX_DIM == interpreter["pooling"].MAX_DIM
    assert dispatch._ROTARY_MAX_HEAD_DIM == interpreter["rotary"].MAX_HEAD_DIM


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LONGEMBED_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, cu = packed_qkv([4], 2, 32, torch.float32)
    with pytest.raises(RuntimeError, match=r"need CUDA tensors.*TRITON_INTERPRET=1"):
        dispatch.attention(q, k, v, cu, 4)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        dispatch.mean_pool_normalize(q[:, 0], torch.tensor([(0, 4)]))


def test_forced_triton_runs_the_interpreter_and_matches_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, cu = packed_qkv([9, 21], 2, 32, torch.float32)
    slopes = alibi_slopes(2)
    spans = segment_spans(cu)
    monkeypatch.setenv("LONGEMBED_KERNELS", "torch")
    attn_torch, pool_torch = (
        dispatch.attention(q, k, v, cu, 21, slopes),
        dispatch.mean_pool_normalize(q[:, 0], spans),
    )
    monkeypatch.setenv("LONGEMBED_KERNELS", "triton")
    torch.testing.assert_close(dispatch.attention(q, k, v, cu, 21, slopes), attn_torch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dispatch.mean_pool_normalize(q[:, 0], spans), pool_torch)
    # The interpreter copies live beside, not in place of, the compiled module other callers import.
    copy = dispatch._interpreted_modules()["flash_attention"]
    assert copy.__name__ != "longembed.triton_kernels.flash_attention"
    assert sys.modules.get("longembed.triton_kernels.flash_attention") is not copy


# --- rotary ------------------------------------------------------------------------------------


def rotary_inputs(total: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """A packed (T, 3, heads, head_dim) projection and cos/sin tables of positions up to 8191."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(total, 3 * heads * head_dim, generator=gen).to(dtype).view(total, 3, heads, head_dim)
    positions = torch.randint(0, 8192, (total,), generator=gen).float()
    inv_freq = 1.0 / (1000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions[:, None] * inv_freq
    return qkv, angles.cos(), angles.sin()


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' formula on a (T, heads, head_dim) tensor: x * cos + rotate_half(x) * sin, with the
    (T, head_dim / 2) angles repeated over both halves; fp64."""
    x = x.double()
    c, s = torch.cat((cos, cos), dim=-1).double()[:, None], torch.cat((sin, sin), dim=-1).double()[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


@pytest.mark.parametrize(("heads", "head_dim"), [(1, 8), (3, 16), (6, 32), (12, 64), (2, 128), (4, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_kernel_matches_reference(interpreter, heads, head_dim, dtype):
    qkv, cos, sin = rotary_inputs(17, heads, head_dim, dtype)
    before = qkv.clone()
    interpreter["rotary"].rotary_qk_(qkv, cos, sin)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    for part in (0, 1):  # q and k rotated in place
        expected = rotate_half_reference(before[:, part], cos, sin)
        torch.testing.assert_close(qkv[:, part].double(), expected, atol=tolerance, rtol=tolerance)
    assert torch.equal(qkv[:, 2], before[:, 2])  # v untouched
    torch_path = before.clone()
    rotary_qk_torch_(torch_path, cos, sin)
    torch.testing.assert_close(qkv, torch_path, atol=tolerance, rtol=tolerance)


def test_rotary_torch_path_matches_reference():
    qkv, cos, sin = rotary_inputs(33, 4, 16, torch.float32, seed=1)
    before = qkv.clone()
    rotary_qk_torch_(qkv, cos, sin)
    for part in (0, 1):
        torch.testing.assert_close(qkv[:, part].double(), rotate_half_reference(before[:, part], cos, sin))
    assert torch.equal(qkv[:, 2], before[:, 2])
    assert (qkv[:, :2] - before[:, :2]).abs().max() > 0.1  # it did rotate


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda qkv, c, s: (qkv[:, :2], c, s), r"\(T, 3, heads, head_dim\)"),
        (lambda qkv, c, s: (qkv.double(), c, s), "fp16, bf16 or fp32"),
        (lambda qkv, c, s: (qkv, c[:, :-1], s), "cos must be"),
        (lambda qkv, c, s: (qkv, c, s.half()), "sin must be"),
        (lambda qkv, c, s: (qkv[..., :7], c[:, :3], s[:, :3]), "even"),
    ],
)
def test_rotary_rejects_bad_input(interpreter, change, error):
    qkv, cos, sin = rotary_inputs(5, 2, 16, torch.float32)
    with pytest.raises((ValueError, TypeError), match=error):
        interpreter["rotary"].rotary_qk_(*change(qkv, cos, sin))


def test_rotary_empty_batch(interpreter):
    qkv, cos, sin = rotary_inputs(0, 2, 16, torch.float32)
    interpreter["rotary"].rotary_qk_(qkv, cos, sin)
    assert qkv.shape == (0, 3, 2, 16)


# --- the whole encoder with the kernels on and off ---------------------------------------------

WIRE_TEXTS = [
    "",
    "a",
    "ALiBi biases attention by distance, so nearby tokens weigh more. " * 5,
    "Packed batches put many documents of different lengths in one launch. " * 3,
]


@pytest.fixture(scope="module")
def tiny_jina(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jina-kernels")
    config = jina_config(heads=2, hidden=64)  # head_dim 32, a size the kernel supports
    return folder, config, write_checkpoint(folder, config, seed=7)


def test_encoder_with_triton_kernels_matches_torch_path_and_reference(monkeypatch, tiny_jina):
    folder, config, state = tiny_jina
    model = load_model(folder, device="cpu")
    monkeypatch.setenv("LONGEMBED_KERNELS", "torch")
    with_torch = model.embed(WIRE_TEXTS)
    late_torch = model.embed_chunks(WIRE_TEXTS, mode="late", chunk_tokens=16, overlap=4)
    monkeypatch.setenv("LONGEMBED_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with_triton = model.embed(WIRE_TEXTS)
    late_triton = model.embed_chunks(WIRE_TEXTS, mode="late", chunk_tokens=16, overlap=4)
    assert np.abs(with_triton - with_torch).max() <= 1e-5
    # The encoder really goes through the Triton kernels: without the interpreter they refuse CPU tensors.
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        model.embed(["routed through the dispatcher"])
    assert np.abs(with_triton - reference_embed(folder, state, config, WIRE_TEXTS).numpy()).max() <= 1e-5
    assert [len(c) for c in late_triton] == [len(c) for c in late_torch] and len(late_triton[2]) > 2
    for doc_torch, doc_triton in zip(late_torch, late_triton, strict=True):
        for a, b in zip(doc_torch, doc_triton, strict=True):
            assert (a.start, a.end, a.n_tokens) == (b.start, b.end, b.n_tokens)
            assert np.abs(a.vector - b.vector).max() <= 1e-5


# --- GPU (compiled kernels; skipped without CUDA) -----------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("lengths", [[1, 300, 7, 1025, 64], [2048], [37] * 40])
def test_gpu_attention_matches_reference(monkeypatch, dtype, head_dim, lengths):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = dispatch.triton_modules(torch.device("cuda"))["flash_attention"]
    q, k, v, cu = packed_qkv(lengths, 12, head_dim, dtype, device=torch.device("cuda"))
    slopes = alibi_slopes(12).cuda()
    for s in (slopes, None):
        out = kernels.alibi_flash_attention(q, k, v, cu, max(lengths), s)
        expected = alibi_attention_reference(q, k, v, cu, max(lengths), s)
        torch.testing.assert_close(
            out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
        )


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp32_attention_goes_to_torch_under_auto_and_is_refused_when_forced(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, cu = packed_qkv([100, 3], 2, 64, torch.float32, device=torch.device("cuda"))
    monkeypatch.setenv("LONGEMBED_KERNELS", "auto")
    expected = alibi_attention_reference(q, k, v, cu, 100)
    torch.testing.assert_close(dispatch.attention(q, k, v, cu, 100), expected, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("LONGEMBED_KERNELS", "triton")
    with pytest.raises(TypeError, match="fp32 attention on CUDA"):
        dispatch.attention(q, k, v, cu, 100)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_pooling_matches_reference(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pooling = dispatch.triton_modules(torch.device("cuda"))["pooling"]
    hidden = torch.randn(9000, 768, device="cuda").to(dtype)
    spans = torch.tensor([(0, 8192), (8192, 8193), (100, 612), (8193, 9000)], device="cuda")
    out = pooling.segment_mean_pool_normalize(hidden, spans)
    torch.testing.assert_close(
        out, segment_mean_pool_normalize_reference(hidden, spans), atol=1e-5, rtol=1e-4
    )


def test_torch_pooling_keeps_precision_over_8192_similar_rows():
    """Mean pooling of one 8192-token document whose rows are alike (a repetitive text): a running fp32
    sum rounds the same way 8192 times and drifts by ~2e-5 (1.4e-5 measured on a NomicBERT vector of
    "word " * 8190); the mean must stay at float precision."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, generator=g).expand(8192, 64).contiguous()
    exact = torch.nn.functional.normalize(hidden.double().mean(0), dim=0)
    pooled = mean_pool_normalize_torch(hidden, torch.tensor([(0, 8192)]))[0]
    assert (pooled.double() - exact).abs().max() <= 1e-6


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_rotary_matches_reference(monkeypatch, dtype):
    """nomic-embed-text's layout (12 heads of 64) at 8192 tokens, compiled kernel on the GPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rotary = dispatch.triton_modules(torch.device("cuda"))["rotary"]
    qkv, cos, sin = rotary_inputs(8192, 12, 64, dtype)
    qkv, cos, sin = qkv.cuda(), cos.cuda(), sin.cuda()
    before = qkv.clone()
    rotary.rotary_qk_(qkv, cos, sin)
    for part in (0, 1):
        expected = rotate_half_reference(before[:, part], cos, sin).to(dtype)
        torch.testing.assert_close(qkv[:, part], expected, atol=2e-2, rtol=2e-2)
    assert torch.equal(qkv[:, 2], before[:, 2])
