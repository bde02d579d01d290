"""Checks docs/proposals/gptoss-fused-epilogues.patch in the interpreter: the gpt-oss block built on the
proposed glu_oss / glu_oss_bwd epilogues, the bias epilogue and gptoss_bias_reduce_kernel, against the
float64 reference (NaN-poisoned outputs). Apply the patch to a scratch checkout, then run this there."""
import os; os.environ["TRITON_INTERPRET"] = "1"
import warnings; warnings.simplefilter("ignore")
import torch, triton
from moe_tune.ops import launch
from moe_tune.ops.routing import build_routing
from moe_tune.problem import KernelConfig
from moe_tune.device import query_device
from moe_tune.kernels.gptoss import gptoss_bias_reduce_kernel, gptoss_bwd_kernel
from moe_tune.reference.gptoss import reference_gptoss_experts
torch.manual_seed(0)
info = query_device(torch.device("cpu"))
LIMIT, ALPHA = 1.5, 1.702

def run(T, H, I, E, k, cfg):
    x = torch.randn(T, H); W1 = 2 * torch.randn(E, H, 2 * I) / H**0.5; b1 = torch.randn(E, 2 * I)
    W2 = torch.randn(E, I, H) / I**0.5; b2 = torch.randn(E, H); w = torch.rand(T, k)
    idx = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)]); G = torch.randn(T, H)
    M = T * k; r = build_routing(idx, E); nan = lambda *s: torch.full(s, float("nan"))
    # forward: two launches and a sum
    h, act, xs, down = nan(M, 2 * I), nan(M, I), nan(M, H), nan(M, H)
    launch.grouped_mm(x, W1, act, r, None, trans_w=True, gather_a=True, gather_div=k, scatter_c=False, cfg=cfg,
                      info=info, epilogue="glu_oss", h=h, sorted_a=xs, bias=b1, limit=LIMIT, alpha=ALPHA)
    launch.grouped_mm(act, W2, down, r, w.reshape(M), trans_w=True, gather_a=False, gather_div=1, scatter_c=True,
                      cfg=cfg, info=info, bias=b2)
    out = down.view(T, k, H).sum(1)
    # backward
    i_blocks = triton.cdiv(I, cfg.BLOCK_N); h_blocks = triton.cdiv(H, 64)
    d_h, wa, gs = nan(M, 2 * I), nan(M, I), nan(M, H)
    dsp = nan(i_blocks + h_blocks, M); dbp = nan(triton.cdiv(M, cfg.BLOCK_M) + E, 2 * I)
    launch.grouped_mm(G, W2, d_h, r, w.reshape(M), trans_w=False, gather_a=True, gather_div=k, scatter_c=False, cfg=cfg,
                      info=info, epilogue="glu_oss_bwd", h=h, aux=wa, dsp=dsp, sorted_a=gs, dbp=dbp, limit=LIMIT,
                      alpha=ALPHA)
    db1, db2 = nan(E, 2 * I), nan(E, H)
    gptoss_bias_reduce_kernel[(E, triton.cdiv(2 * I, 64))](dbp, r.expert_offsets, db1, 2 * I, db1.stride(0), E=E,
                                                          E_POW2=triton.next_power_of_2(E + 1), ROW_BLOCK=cfg.BLOCK_M,
                                                          BLOCK_N=64)
    # the down-bias half of the standalone backward kernel: db2 and <G, b2[e]> (I_BLOCKS=0 programs of the activation)
    gptoss_bwd_kernel[(h_blocks, E)](wa, h, b1, G, b2, w.reshape(M), r.sorted_slots, r.expert_offsets, d_h, wa,
                                     dsp[i_blocks:], db1, db2, M, I, H, k, LIMIT, ALPHA, wa.stride(0), h.stride(0),
                                     b1.stride(0), G.stride(0), b2.stride(0), d_h.stride(0), wa.stride(0), db1.stride(0),
                                     db2.stride(0), I_BLOCKS=0, BLOCK_M=32, BLOCK_N=64)
    dw = dsp.sum(0).view(T, k)
    dW2 = nan(E, I, H); launch.grouped_mm_dw(wa, gs, dW2, r, None, gather_dy=False, dy_div=1, gather_x=False, x_div=1, cfg=cfg, info=info)
    rows = nan(M, H); launch.grouped_mm(d_h, W1, rows, r, None, trans_w=False, gather_a=False, gather_div=1, scatter_c=True, cfg=cfg, info=info)
    dx = rows.view(T, k, H).sum(1)
    dW1 = nan(E, H, 2 * I); launch.grouped_mm_dw(xs, d_h, dW1, r, None, gather_dy=False, dy_div=1, gather_x=False, x_div=1, cfg=cfg, info=info)
    leaves = [t.double().requires_grad_() for t in (x, W1, b1, W2, b2, w)]
    ref = reference_gptoss_experts(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], idx, leaves[5], limit=LIMIT, alpha=ALPHA)
    refs = torch.autograd.grad(ref, leaves, G.double())
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip((dx, dW1, db1, dW2, db2, dw), refs)]
    print(cfg.short(), (T, H, I, E, k), " ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < 1e-5, errs

for cfg in (KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1),
            KernelConfig(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1, TMA_LOAD=True)):
    run(11, 64, 48, 4, 2, cfg)
    run(5, 32, 24, 3, 2, cfg)
    run(1, 32, 16, 4, 2, cfg)
