"""Memory per GPU of selfdistill training states, computed from parameter counts (not measured).

    python scripts/memory_estimate.py            # the tables in docs/scaling.md

Model states only: weights, gradients, Adam moments (fp32 master weights where mixed precision keeps them) and the
teacher copy. Activations, logits, the KV cache of generation and vLLM's share come on top (docs/scaling.md).
"""

from __future__ import annotations

GB = 1e9
MODELS = {  # published configs: hidden, intermediate, layers, attention heads, kv heads, head dim, vocab, tied
    "Qwen3-1.7B": dict(h=2048, ff=6144, layers=28, heads=16, kv=8, hd=128, vocab=151936, tied=True),
    "Qwen3-8B": dict(h=4096, ff=12288, layers=36, heads=32, kv=8, hd=128, vocab=151936, tied=False),
}


def linears(m: dict) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of one decoder block: q, k, v, o, gate, up, down."""
    q, kv = m["heads"] * m["hd"], m["kv"] * m["hd"]
    return [(m["h"], q), (m["h"], kv), (m["h"], kv), (q, m["h"]), (m["h"], m["ff"]), (m["h"], m["ff"]),
            (m["ff"], m["h"])]


def params(m: dict) -> int:
    block = sum(i * o for i, o in linears(m)) + 2 * m["h"] + 2 * m["hd"]  # two RMSNorms, q/k norms
    embed = m["vocab"] * m["h"] * (1 if m["tied"] else 2)
    return m["layers"] * block + embed + m["h"]


def lora_params(m: dict, r: int = 64) -> int:
    return m["layers"] * sum(r * (i + o) for i, o in linears(m))


def table(name: str, m: dict, n: int = 8) -> list[tuple[str, float]]:
    p, a = params(m), lora_params(m)
    rows = [
        # DDP with bf16 autocast: fp32 weights 4 + grads 4 + Adam 8 = 16 B/param; teacher copy fp32 4 B/param.
        ("DDP, full fine-tuning, teacher live", 16 * p),
        ("DDP, full fine-tuning, teacher initial/ema/sync", 20 * p),
        # DeepSpeed bf16: weights 2 + grads 2 + fp32 master 4 + Adam 8; teacher copy in the weights' dtype (2 B).
        (f"ZeRO-2 on {n} GPUs, teacher initial/ema/sync", 2 * p + 14 * p / n + 2 * p),
        (f"ZeRO-3 on {n} GPUs, teacher initial/ema/sync", 18 * p / n),
        ("LoRA r64 (all linears), bf16 base, teacher initial", 2 * p + 16 * a),
        ("LoRA r64, teacher ema (adapter copy)", 2 * p + 18 * a),
    ]
    return [(label, b / GB) for label, b in rows]


if __name__ == "__main__":
    for name, m in MODELS.items():
        print(f"\n{name}: {params(m) / 1e9:.2f} B parameters, LoRA r64 adapter {lora_params(m) / 1e6:.0f} M")
        for label, gb in table(name, m):
            print(f"  {label:<52} {gb:7.1f} GB per GPU")
