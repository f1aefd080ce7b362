"""Mixtral (mistralai/Mixtral-8x7B-v0.1, Mixtral-8x22B-v0.1 and their Instruct versions).

    python recipes/families/mixtral.py mistralai/Mixtral-8x7B-v0.1 --out mixtral-dynamoq

What the family is: every decoder layer is an MoE block of 8 experts, top-2, no shared expert and
no dense layer; experts are fused [8, 2I, H] / [8, H, I] (transformers calls the block
`mlp`, the original checkpoints `block_sparse_moe`: dynamoq's checkpoints follow the rename).
8x7B: H 4096, I 14336; 8x22B: H 6144, I 16384.

Settings and why:
- group_size 128: divides 4096, 6144, 14336 and 16384 (the input dims of gate_up and down), and
  costs 24/128 = 0.19 bits per weight for the scale and zero.
- target_bits 3.0 with GPTQ: the DynaMo baseline at the paper's operating point. With 8 large
  experts and top-2, each expert sees about a quarter of the tokens and significance is flatter
  than in fine-grained MoEs, so the allocation mostly moves single experts between 2/3/4 bits
  (raise --target-bits to 3.5 if 3.0 loses too much on your data).
- no shared experts, no dense layers: shared_bits / dense_bits have nothing to act on.
"""
from _recipe import Recipe, run

RECIPE = Recipe(
    family="Mixtral",
    model_types=("mixtral",),
    checkpoints=("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x22B-v0.1"),
    group_size=128,
    target_bits=3.0,
)


def main(argv=None):
    return run(RECIPE, argv, __doc__)


if __name__ == "__main__":
    main()
