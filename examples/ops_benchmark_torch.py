"""Eager PyTorch timings of ConvNeXt-T's pointwise GEMMs and stage-0 ops in each form (docs/dispatch.md).

    python examples/ops_benchmark_torch.py

Median of 5 calls under no_grad, in ms; the forms are the ones `backend_ops` can choose between on a CPU.
"""

import time

import torch
import torch.nn.functional as F


def median_ms(fn, n=5):
    fn()
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def main():
    torch.manual_seed(0)
    print("oneDNN bfloat16:", torch.ops.mkldnn._is_mkldnn_bf16_supported(), "| torch CPU capability:",
          torch.backends.cpu.get_cpu_capability())
    with torch.no_grad():
        for m, k, n in [(50176, 96, 384), (50176, 384, 96), (3136, 384, 1536), (784, 768, 3072)]:
            for dtype in (torch.float32, torch.bfloat16):
                x, w, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype), torch.randn(n).to(dtype)
                row = {"addmm+gelu": median_ms(lambda: F.gelu(torch.addmm(b, x, w)))}
                try:
                    wt = w.t()
                    row["onednn linear+gelu"] = median_ms(
                        lambda: torch.ops.mkldnn._linear_pointwise(x, wt, b, "gelu", [], "none"))
                except RuntimeError as e:  # no such kernel on this CPU
                    row["onednn linear+gelu"] = f"unavailable ({str(e)[:60]})"
                if dtype == torch.bfloat16:
                    w32, b32 = w.float(), b.float()
                    row["f32 upcast addmm+gelu"] = median_ms(lambda: F.gelu(torch.addmm(b32, x.float(), w32)).to(dtype))
                print(f"{m} x {k} -> {n}", str(dtype)[6:], {key: round(v, 1) if isinstance(v, float) else v
                                                            for key, v in row.items()}, flush=True)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(16, 56, 56, 96).to(dtype)
            w, b = torch.randn(96, 1, 7, 7).to(dtype), torch.randn(96).to(dtype)
            gamma, beta = torch.ones(96), torch.zeros(96)
            row = {"depthwise channels-last": median_ms(lambda: F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=3,
                                                                         groups=96)),
                   "layernorm": median_ms(lambda: F.layer_norm(x, (96,), gamma.to(dtype) if dtype == torch.float32
                                                               else gamma, beta.to(dtype) if dtype == torch.float32
                                                               else beta, 1e-6))}
            if dtype == torch.bfloat16:
                w32, b32 = w.float(), b.float()
                row["depthwise f32 upcast"] = median_ms(
                    lambda: F.conv2d(x.float().permute(0, 3, 1, 2), w32, b32, padding=3, groups=96).to(dtype))
            print("stage-0 map", str(dtype)[6:], {key: round(v, 1) for key, v in row.items()}, flush=True)


if __name__ == "__main__":
    main()
