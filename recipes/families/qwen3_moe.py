"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B, Qwen3-Coder-30B-A3B and Instruct versions).

    python recipes/families/qwen3_moe.py Qwen/Qwen3-30B-A3B --out qwen3moe-dynamoq

What the family is: 128 small experts per layer, top-8, routing weights renormalised over the
top-8, no shared expert, every layer MoE (mlp_only_layers empty).
30B-A3B: H 2048, expert I 768, 48 layers; 235B-A22B: H 4096, expert I 1536, 94 layers.

Settings and why:
- group_size 128: divides 2048, 4096, 768 (6 groups) and 1536.
- target_bits 3.0 with GPTQ: with 128 experts routing is the most skewed of the families here,
  which is where per-expert bits pay most (rare experts at 2 bits, busy ones at 4-8). Experts
  that get few calibration tokens borrow the Hessian of all tokens (DynaMoConfig.balanced, on by
  default); more --calib-tokens gives every expert more of its own.
- no shared experts: shared_bits has nothing to act on.
- Qwen models are bilingual: add `--data chinese` (a built-in domain) if Chinese matters to you.
"""
from _recipe import Recipe, run

RECIPE = Recipe(
    family="Qwen3-MoE",
    model_types=("qwen3_moe",),
    checkpoints=("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B"),
    group_size=128,
    target_bits=3.0,
)


def main(argv=None):
    return run(RECIPE, argv, __doc__)


if __name__ == "__main__":
    main()
