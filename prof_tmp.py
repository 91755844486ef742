# throwaway: profile one SVG-XL training step (not committed)
import sys, torch, svg, train_dit
B, compile_ = int(sys.argv[1]), len(sys.argv) > 2
dev = torch.device("cuda")
svg.setup_precision("bf16")
m = svg.SiT(svg.SIT_PRESETS["SiT-XL"]).to(dev)
ema = svg.SiT(svg.SIT_PRESETS["SiT-XL"]).to(dev).requires_grad_(False)
f = torch.compile(m) if compile_ else m
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, betas=train_dit.ADAM_BETAS, weight_decay=0, fused=True)
x = torch.randn(B, 392, 16, 16, device=dev); y = torch.randint(0, 1000, (B,), device=dev)
def step():
    with svg.autocast("bf16", dev):
        loss = svg.flow_matching_loss(f, x, y)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); svg.update_ema(ema, m, 0.9999)
for _ in range(5): step()
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(3): step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
