"""MasterWeightAdamW: fp32 master weights and AdamW state behind bf16 parameters."""
import torch

from parallel.optimizer import MasterWeightAdamW, param_groups


def test_bf16_params_follow_fp32_adamw_through_master_weights():
    """A bf16 model stepped by MasterWeightAdamW holds the bf16 rounding of what torch's AdamW does to
    fp32 copies fed the same gradients; updates far below bf16's resolution still accumulate."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(16, 8, generator=gen) * 4, torch.randn(8, generator=gen) + 2]
    low = [torch.nn.Parameter(t.bfloat16()) for t in init]
    ref = [torch.nn.Parameter(t.bfloat16().float()) for t in init]
    opt = MasterWeightAdamW(param_groups([("w", low[0]), ("b", low[1])], 0.1), lr=1e-4)
    ref_opt = torch.optim.AdamW(param_groups([("w", ref[0]), ("b", ref[1])], 0.1), lr=1e-4, betas=(0.9, 0.95),
                                eps=1e-8)
    for _ in range(20):
        grads = [torch.randn(p.shape, generator=gen) for p in low]
        for p, r, g in zip(low, ref, grads):
            p.grad, r.grad = g.bfloat16(), g.bfloat16().float()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
    for p, r, m in zip(low, ref, opt.masters):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p, m.bfloat16())
    # 20 steps of ~1e-4 moved the fp32 masters, while a bf16-only update would have rounded most away
    assert (opt.masters[0] - low[0].float()).abs().max() > 0
    assert (opt.masters[0] - init[0].bfloat16().float()).abs().max() > 1e-3
