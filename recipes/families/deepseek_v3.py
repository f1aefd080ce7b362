"""DeepSeek-V3 architecture (deepseek-ai/DeepSeek-V3, DeepSeek-R1, moonshotai/Moonlight-16B-A3B,
moonshotai/Kimi-K2-Instruct: all model_type "deepseek_v3").

    python recipes/families/deepseek_v3.py moonshotai/Moonlight-16B-A3B --out moonlight-dynamoq
    python recipes/families/deepseek_v3.py deepseek-ai/DeepSeek-V3 --out dsv3-dynamoq --device-map auto

What the family is: the first `first_k_dense_replace` layers have a dense MLP (V3: 3, Moonlight: 1),
the others an MoE block of many routed experts (V3: 256 top-8, Kimi-K2: 384 top-8, Moonlight: 64
top-6) plus shared experts (V3: 1, Moonlight: 2) that see every token; sigmoid router scores with a
correction bias and group-limited routing; MLA attention.
V3: H 7168, expert I 2048, dense I 18432; Moonlight: H 2048, expert I 1408, dense I 11264.
DeepSeek-V3/R1 and Kimi-K2 ship FP8 weights in 128 x 128 blocks: the recipe dequantizes them on
load (transformers' FineGrainedFP8Config(dequantize=True)) and quantizes from 16 bit.

Settings and why:
- group_size 128: divides every input dim above (7168 = 56 x 128, 2048, 1408 = 11 x 128, 18432),
  the same 128 the FP8 checkpoint uses along its inputs.
- shared_bits 8: the shared experts process every token; their error is not diluted by routing.
- dense_bits None: the dense first layers stay 16 bit. In V3 they are 3 x 3 x 7168 x 18432 = 1.2B
  of 671B weights (0.2%): quantizing them saves little and they feed every later layer.
- target_bits 3.0 with GPTQ for the routed experts: 256 fine-grained experts give the allocation
  the most room of any family here. The router's correction bias and MLA stay untouched.
- size: V3/R1 hold 671B parameters (about 1.3 TB in 16 bit) and need a multi-GPU node
  (--device-map auto spreads them over its GPUs); Moonlight (16B) fits one large GPU or CPU memory.
"""
from _recipe import Recipe, run

RECIPE = Recipe(
    family="DeepSeek-V3",
    model_types=("deepseek_v3",),
    checkpoints=("deepseek-ai/DeepSeek-V3", "moonshotai/Moonlight-16B-A3B", "moonshotai/Kimi-K2-Instruct"),
    group_size=128,
    target_bits=3.0,
    shared_bits=8,
    dense_bits=None,
)


def main(argv=None):
    return run(RECIPE, argv, __doc__)


if __name__ == "__main__":
    main()
