"""Batch-1 decode step and a training step of GPT-2 124M's shape with the project's Linear, W (in, out), against
nn.Linear's layout, W (out, in); interleaved rounds (docs/benchmarks.md).

    python scripts/linear_layout.py 2 4    # torch threads, rounds
"""
import statistics, sys, time
import torch
import torch.nn as nn
from torch.nn import functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
import model as M

class LinearOutIn(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
cfg = dict(block_size=1024, vocab_size=50304)
models = {}
for name, cls in (("in_out", M.Linear), ("out_in", LinearOutIn)):
    orig = M.Linear
    M.Linear = cls
    torch.manual_seed(0)
    models[name] = M.GPT(M.GPTConfig(**cfg))
    M.Linear = orig
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
res = {n: {"decode": [], "train": []} for n in models}
idx = torch.randint(0, 50257, (1, 64))
for r in range(rounds):
    order = list(models) if r % 2 == 0 else list(models)[::-1]
    for n in order:
        m = models[n].eval()
        with torch.no_grad():
            cache = M.KVCache.for_model(m, 1)
            m(idx, kv_cache=cache)
            tok = idx[:, :1]
            times = []
            for _ in range(12):
                t = time.perf_counter(); m(tok, kv_cache=cache); times.append(time.perf_counter() - t)
        res[n]["decode"].append(statistics.median(times[2:]) * 1000)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        x = torch.randint(0, 50257, (1, 128))
        times = []
        for _ in range(3):
            t = time.perf_counter()
            _, loss = m(x, x)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        res[n]["train"].append(statistics.median(times[1:]) * 1000)
        print(r, n, f"decode {res[n]['decode'][-1]:.1f} ms  train {res[n]['train'][-1]:.0f} ms", flush=True)
for n in res:
    print(n, "median decode ms", round(statistics.median(res[n]["decode"]), 2), "train ms",
          round(statistics.median(res[n]["train"])))
print("ratio out_in/in_out decode", statistics.median(res["out_in"]["decode"]) / statistics.median(res["in_out"]["decode"]),
      "train", statistics.median(res["out_in"]["train"]) / statistics.median(res["in_out"]["train"]))
