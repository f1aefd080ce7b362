"""GPT-OSS (openai/gpt-oss-20b, openai/gpt-oss-120b).

    python recipes/families/gpt_oss.py openai/gpt-oss-20b --out gpt-oss-dynamoq

What the family is: every layer an MoE block (20b: 32 experts, 120b: 128 experts; top-4), no
shared expert; H 2880, expert I 2880. Experts are stored transposed, gate_up_proj [E, H, 2I]
(gate and up columns interleaved) and down_proj [E, I, H], each with a bias
(gate_up_proj_bias [E, 2I], down_proj_bias [E, H]); the activation is a clamped SwiGLU.
The published checkpoints hold the experts in MXFP4 (4-bit values with an 8-bit shared exponent
per 32: 4.25 bits per weight): the recipe dequantizes them on load (transformers'
Mxfp4Config(dequantize=True)) and quantizes from 16 bit.

Settings and why:
- group_size 64: 2880 = 2^6 x 45, so 128 does not divide it; 64 does (45 groups), at 24/64 = 0.375
  bits per weight for the scale and zero.
- target_bits 3.5 with GPTQ: the experts were trained for MXFP4, so they are already at 4.25
  bits; a target below that is where dynamoq saves memory over the checkpoint (3.5 mixes mostly
  3- and 4-bit experts, a few 2/6/8). Try 3.0 if memory matters more than the last bit of quality.
- transposed storage and biases: dynamoq quantizes along the input dim of the stored layout (H for
  gate_up, I for down) and keeps both biases in full precision, added after the low-bit product.
- no shared experts, no dense layers; routers (with their bias) and attention sinks stay as they are.
"""
from _recipe import Recipe, run

RECIPE = Recipe(
    family="GPT-OSS",
    model_types=("gpt_oss",),
    checkpoints=("openai/gpt-oss-20b", "openai/gpt-oss-120b"),
    group_size=64,
    target_bits=3.5,
)


def main(argv=None):
    return run(RECIPE, argv, __doc__)


if __name__ == "__main__":
    main()
